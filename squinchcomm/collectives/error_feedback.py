"""Error-feedback state: per-rank residuals keyed by tensor name.

An explicit object that can be saved and restored per rank, in the spirit of
PyTorch's ``PowerSGDState``: a Communicator has one (``comm.error_feedback``),
and a caller may pass its own to a collective (``error_feedback=state``), as
the DistributedOptimizer does to keep its buckets' residuals to itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from squinchcomm.codec.cast import array_module

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Per-rank error-feedback residuals, keyed by tensor name.

    ``state[name]`` holds the first-stage residual (the whole tensor) and
    the second-stage residual (this rank's shard), plus the step count that
    seeds stochastic rounding. Save it with the model: without it a restored
    run loses the error it still owed.
    """

    def __init__(self):
        self.state: dict[str, dict[str, Any]] = {}

    def get(self, name: str, n: int, shard: int, like, world: int):
        """The residual entry of ``name``, created as zeros beside ``like``."""
        entry = self.state.get(name)
        xp = array_module(like)
        if entry is None:
            entry = {"residual": xp.zeros(n, xp.float32), "shard_residual": xp.zeros(shard, xp.float32),
                     "world": world, "step": 0}
            self.state[name] = entry
        elif array_module(entry["residual"]) is not xp:
            # Restored from a host checkpoint while the tensor lives on the GPU (or back).
            for key in ("residual", "shard_residual"):
                entry[key] = xp.asarray(entry[key]) if xp is not np else _host(entry[key])
        if entry["residual"].size != n or entry["shard_residual"].size != shard:
            raise ValueError(f"tensor '{name}' has {n} elements now but its error-feedback "
                             f"residual has {entry['residual'].size} (world {entry['world']}): "
                             "use a new name for a differently shaped tensor, or reset()")
        return entry

    def reset(self, name: str | None = None):
        """Forget one tensor's residual, or all of them."""
        if name is None:
            self.state.clear()
        else:
            self.state.pop(name, None)

    def state_dict(self) -> dict:
        """Host copies of every residual, picklable (torch.save / np.savez)."""
        out = {}
        for name, e in self.state.items():
            out[name] = {"residual": _host(e["residual"]), "shard_residual": _host(e["shard_residual"]),
                         "world": e["world"], "step": e["step"]}
        return out

    def load_state_dict(self, state: dict, world: int | None = None):
        """Restore residuals saved by :meth:`state_dict` on the same rank."""
        for name, e in state.items():
            if world is not None and e["world"] != world:
                raise ValueError(f"error-feedback state of '{name}' was saved at world size "
                                 f"{e['world']}, this job has {world}: the shard residuals do "
                                 "not fit; reset() and start the residuals from zero instead")
            self.state[name] = {"residual": np.array(e["residual"], np.float32),
                                "shard_residual": np.array(e["shard_residual"], np.float32),
                                "world": e["world"], "step": int(e["step"])}


def _host(a):
    return a.copy() if isinstance(a, np.ndarray) else a.get()
