"""What the framework integrations share: the first-step check, and every
rank's hook state in a checkpoint that only rank 0 writes."""

from __future__ import annotations

import warnings

import torch.distributed as dist

from squinchcomm.torch.optimizer import residuals_to_torch

__all__ = ["CompressionNotActiveError", "check_compressed", "gather_hook_state",
           "load_hook_state"]

_KEY = "squinchcomm_ddp_hook"


class CompressionNotActiveError(RuntimeError):
    """The training step ran without the compression that was asked for."""


def check_compressed(state, where: str) -> None:
    """Raise unless the hook of ``state`` ran and this rank sent fewer bytes
    than the same gradient buffers uncompressed (with one rank nothing is
    sent, so only that the hook ran is checked).

    Args:
        state: the DDP hook's ``SquinchHookState`` or FSDP2's ``FSDPCompression``
            (both count what they reduced and sent).
        where: the integration, for the message.
    """
    if state.buckets_reduced == 0:
        raise CompressionNotActiveError(
            f"{where}: the first optimizer step ran, but the Squinch DDP hook or FSDP "
            "reduce-scatter reduced no gradient bucket, so this training is not compressed: "
            "the model is not wrapped in DistributedDataParallel (or sharded by FSDP2), or the "
            "framework did not register the hook")
    if state.compression == "none" or state.wire_bytes < state.uncompressed_bytes:
        return
    if state.uncompressed_bytes == 0:  # one rank: no bytes to compare
        return
    raise CompressionNotActiveError(
        f"{where}: the hook ran but sent {state.wire_bytes:,.0f} bytes, no fewer than the "
        f"{state.uncompressed_bytes:,.0f} of the same buffers uncompressed: every bucket "
        f"went uncompressed (buckets below min_compress_bytes, a warm-up start_step, or "
        f"compression='auto' choosing none); lower min_compress_bytes or raise the bucket "
        "size, or pass compression='none' to train uncompressed on purpose")


def gather_hook_state(state, group=None) -> dict:
    """Every rank's ``state.state_dict()`` (a ``SquinchHookState`` or an
    ``FSDPCompression``), gathered on every rank (collective): the value to put
    in a checkpoint that one rank writes."""
    # Tensors, not NumPy arrays: checkpoints load with torch.load(weights_only=True).
    mine = residuals_to_torch(state.state_dict())
    if not (dist.is_available() and dist.is_initialized()):
        return {_KEY: 1, "world": 1, "ranks": [mine]}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return {_KEY: 1, "world": len(everyone), "ranks": everyone}


def load_hook_state(state, saved: dict | None, group=None) -> None:
    """Load this rank's part of :func:`gather_hook_state`'s value (None: a
    checkpoint without it, residuals start from zero with a warning)."""
    if saved is None or saved.get(_KEY) != 1:
        warnings.warn("the checkpoint holds no squinchcomm hook state: the error-feedback "
                      "residuals start from zero", stacklevel=3)
        return
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank(group) if world > 1 else 0
    if saved["world"] != world:
        warnings.warn(f"the checkpoint's squinchcomm hook state was saved by {saved['world']} "
                      f"ranks, this job has {world}: the error-feedback residuals start from "
                      "zero", stacklevel=3)
        return
    state.load_state_dict(saved["ranks"][rank])
