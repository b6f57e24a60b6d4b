"""What every framework job saves, and how the torchrun ones end."""

import os
import sys

import torch


def finish(result: dict, state, grads, params, path, exit_now: bool) -> None:
    """Save this rank's ``result`` with the hook's counters, gradients and
    parameters to ``path``; ``exit_now`` skips the interpreter's teardown
    (tearing down gloo at exit sometimes aborts a rank in torch 2.13 after all
    the work is done; torchrun waits for both ranks)."""
    result.update(grads=grads, params=params, buckets_reduced=state.buckets_reduced,
                  wire_bytes=state.wire_bytes, uncompressed_bytes=state.uncompressed_bytes)
    torch.save(result, path)
    if exit_now:
        sys.stdout.flush()
        os._exit(0)
