"""What every framework job saves, and how the jobs end."""

import os
import sys

import torch


def record_first_local_grads(params) -> list:
    """A list that the first backward pass fills with each parameter's own
    gradient on this rank, before DDP averages it (a tensor hook runs before
    the gradient is accumulated, so before DDP's reducer sees it)."""
    params = list(params)
    local = [None] * len(params)

    def keep(i):
        def hook(g):
            if local[i] is None:
                local[i] = g.detach().clone()
        return hook

    for i, p in enumerate(params):
        p.register_hook(keep(i))
    return local


def finish(result: dict, state, grads, params, path, local=None, children=()) -> None:
    """Save this rank's ``result`` with the hook's counters, gradients (and
    ``local``, its own first gradients) and parameters to ``path``, then leave
    without the interpreter's teardown, which these tests do not check (the
    README's "At exit" bullet: torch 2.13's gloo can abort a finished rank
    there; squinchcomm's exit handler guards against it, and
    ``tests/test_engine.py`` tests that). ``children``: the processes this one
    launched (Lightning starts rank 1 from rank 0), waited for first (at most
    120 s each), their failure becoming this process's."""
    result.update(grads=grads, params=params, local=local, buckets_reduced=state.buckets_reduced,
                  wire_bytes=state.wire_bytes, uncompressed_bytes=state.uncompressed_bytes)
    torch.save(result, path)
    codes = [c.wait(timeout=120) for c in children]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(next((c for c in codes if c), 0))
