"""Hugging Face Accelerate: ``register(accelerator, model, optimizer)`` after ``prepare``.

Accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` accepts only its
own ``DDPCommunicationHookType`` (no, fp16, bf16, power_sgd,
batched_power_sgd), so a custom hook cannot go there. :func:`register`:

1. checks that ``model`` is what ``accelerator.prepare()`` returned for a
   multi-process run, a ``DistributedDataParallel``, and registers
   :func:`~squinchcomm.torch.ddp_hooks.squinch_hook` on it (one process: no
   DDP, nothing to compress, nothing registered);
2. registers the hook state with ``accelerator.register_for_checkpointing``,
   so ``accelerator.save_state`` stores every rank's error-feedback residuals
   (gathered from all ranks into the file the main process writes) and
   ``accelerator.load_state`` gives each rank its own back;
3. after the optimizer's first real step (gradient accumulation skips steps)
   checks that the hook reduced the gradients and sent fewer bytes than
   uncompressed, raising
   :class:`~squinchcomm.integrations.CompressionNotActiveError` otherwise.

Example::

    from accelerate import Accelerator
    from squinchcomm.integrations.accelerate import register

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = register(accelerator, model, optimizer)   # SquinchHookState(), or pass state=
    ...
    accelerator.save_state("ckpt")                    # residuals of every rank included
"""

from __future__ import annotations

from squinchcomm.errors import require

require("accelerate", "accelerate", "squinchcomm.integrations.accelerate")

from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from squinchcomm.integrations._common import (check_compressed, gather_hook_state,  # noqa: E402
                                              load_hook_state)
from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook  # noqa: E402

__all__ = ["register"]


class _Checkpointed:
    """What ``register_for_checkpointing`` holds: every rank's hook state."""

    def __init__(self, state: SquinchHookState):
        self.state = state

    def state_dict(self) -> dict:
        return gather_hook_state(self.state)  # save_state runs on every process

    def load_state_dict(self, saved: dict) -> None:
        load_hook_state(self.state, saved)


def register(accelerator, model, optimizer, state: SquinchHookState | None = None
             ) -> SquinchHookState:
    """Compress ``model``'s gradient allreduce with Squinch (see the module docstring).

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared ``model``.
        model: the model ``accelerator.prepare()`` returned.
        optimizer: the optimizer ``accelerator.prepare()`` returned (its first
            step checks the compression).
        state: the hook's state (default ``SquinchHookState()``: Squinch,
            error feedback on).

    Returns:
        The hook state.
    """
    # Step 1: the hook on the prepared DDP model.
    state = SquinchHookState() if state is None else state
    if not isinstance(state, SquinchHookState):
        raise ValueError(f"state is a {type(state).__name__}: pass a SquinchHookState")
    if accelerator.num_processes > 1:
        if not isinstance(model, DistributedDataParallel):
            raise ValueError(
                f"model is a {type(model).__name__}, not the DistributedDataParallel that "
                "accelerator.prepare() returns for a multi-process run: pass the prepared model "
                "(FSDP and DeepSpeed plugins do not use DDP hooks; squinchcomm.torch.fsdp "
                "compresses FSDP2)")
        model.register_comm_hook(state, squinch_hook)
    # Step 2: the residuals in save_state / load_state.
    accelerator.register_for_checkpointing(_Checkpointed(state))
    # Step 3: the first real step proves the compression.
    inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps one
    if not hasattr(inner, "register_step_post_hook"):
        raise ValueError(f"optimizer is a {type(optimizer).__name__}: pass the optimizer "
                         "accelerator.prepare() returned")
    if accelerator.num_processes > 1:
        def first_step(*_):
            handle.remove()
            check_compressed(state, "squinchcomm.integrations.accelerate")

        handle = inner.register_step_post_hook(first_step)
    return state
