"""Hugging Face Trainer: ``SquinchTrainer(..., hook_state=SquinchHookState())``.

The ``Trainer`` builds Accelerate's DDP handler itself from its own
``TrainingArguments`` (``ddp_bucket_cap_mb``, ``ddp_broadcast_buffers``, ...),
so no comm hook reaches the DDP it wraps. ``SquinchTrainer`` is the
``Trainer`` plus a callback that:

1. at ``on_train_begin`` (after the Trainer has wrapped the model) registers
   :func:`~squinchcomm.torch.ddp_hooks.squinch_hook` on ``trainer.model_wrapped``,
   which must be a ``DistributedDataParallel`` when more than one process trains;
2. after the first optimizer step checks that the hook reduced the gradients
   with fewer bytes than uncompressed
   (:class:`~squinchcomm.integrations.CompressionNotActiveError` otherwise);
3. at every checkpoint writes this rank's error-feedback residuals into the
   checkpoint folder (``squinchcomm_rank<r>.pt``, beside the Trainer's own
   per-process ``rng_state_<r>.pth``), and ``train(resume_from_checkpoint=...)``
   gives each rank its own back.

Example::

    from squinchcomm.integrations.transformers import SquinchTrainer
    trainer = SquinchTrainer(model=model, args=args, train_dataset=ds,
                             hook_state=SquinchHookState(error_feedback=True))
    trainer.train()
"""

from __future__ import annotations

import os

from squinchcomm.errors import require

require("transformers", "transformers", "squinchcomm.integrations.transformers")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402

from squinchcomm.integrations._common import check_compressed  # noqa: E402
from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook  # noqa: E402
from squinchcomm.torch.optimizer import residuals_to_torch  # noqa: E402

__all__ = ["SquinchTrainer"]


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _residual_file(folder: str) -> str:
    return os.path.join(folder, f"squinchcomm_rank{_rank()[0]}.pt")


class _SquinchCallback(TrainerCallback):
    """Steps 1-3 of the module docstring, for one trainer."""

    def __init__(self, trainer: "SquinchTrainer"):
        self.trainer, self.registered, self.checked = trainer, None, False

    # Step 1: the hook on the DDP the Trainer built.
    def on_train_begin(self, args, state, control, **kwargs):
        wrapped, (_, world) = self.trainer.model_wrapped, _rank()
        if world == 1 or wrapped is self.registered:
            return
        if not isinstance(wrapped, DistributedDataParallel):
            raise ValueError(f"SquinchTrainer: the Trainer wrapped the model in a "
                             f"{type(wrapped).__name__}, not DistributedDataParallel: the "
                             "Squinch DDP hook needs DDP (FSDP and DeepSpeed do not use DDP "
                             "hooks)")
        wrapped.register_comm_hook(self.trainer.hook_state, squinch_hook)
        self.registered = wrapped

    # Step 2: the first step proves the compression.
    def on_step_end(self, args, state, control, **kwargs):
        if not self.checked and _rank()[1] > 1:
            check_compressed(self.trainer.hook_state, "SquinchTrainer")
        self.checked = True

    # Step 3: this rank's residuals beside the checkpoint.
    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)  # a node without rank 0's file system too
        torch.save(residuals_to_torch(self.trainer.hook_state.state_dict()),
                   _residual_file(folder))


class SquinchTrainer(Trainer):
    """The Hugging Face ``Trainer`` with Squinch-compressed DDP gradients.

    Args:
        hook_state: the hook's state (default ``SquinchHookState()``: Squinch,
            error feedback on).
        *args, **kwargs: the ``Trainer``'s.
    """

    def __init__(self, *args, hook_state: SquinchHookState | None = None, **kwargs):
        if hook_state is not None and not isinstance(hook_state, SquinchHookState):
            raise ValueError(f"hook_state is a {type(hook_state).__name__}: pass a "
                             "squinchcomm.torch.ddp_hooks.SquinchHookState")
        super().__init__(*args, **kwargs)
        self.hook_state = SquinchHookState() if hook_state is None else hook_state
        self.add_callback(_SquinchCallback(self))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; a resumed run gets this rank's residuals back
        (they start from zero, with a warning, when the checkpoint has none)."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, str):
            path = _residual_file(folder)
            if os.path.exists(path):
                self.hook_state.load_state_dict(torch.load(path, weights_only=True))
            else:
                import warnings

                warnings.warn(f"{path} does not exist: the error-feedback residuals start "
                              "from zero", stacklevel=2)
        return super().train(resume_from_checkpoint, *args, **kwargs)
