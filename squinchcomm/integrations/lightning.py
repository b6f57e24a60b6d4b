"""PyTorch Lightning: ``Trainer(strategy=SquinchDDPStrategy())``.

Lightning's ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`` registers
the hook only when the root device is CUDA (``_register_ddp_hooks``), so on
CPU/gloo a Squinch hook passed there is dropped without a word. This strategy:

1. registers :func:`~squinchcomm.torch.ddp_hooks.squinch_hook` with its
   :class:`~squinchcomm.torch.ddp_hooks.SquinchHookState` on the DDP model on
   every device type, right where Lightning would register its own;
2. after the first optimizer step checks that the hook reduced the gradients
   and sent fewer bytes than uncompressed
   (:func:`~squinchcomm.integrations.check_compressed`), raising
   :class:`~squinchcomm.integrations.CompressionNotActiveError` otherwise;
3. puts every rank's error-feedback residuals into the checkpoint Lightning
   writes on rank 0 (``checkpoint["squinchcomm"]``, gathered from all ranks at
   save time) and gives each rank its own back when training resumes.

Everything else is Lightning's ``DDPStrategy``: its launchers (``start_method``
"popen" re-runs the script per device, "spawn"; torchrun and mpirun-style
environments are detected by Lightning), devices, precision and options.

Example::

    import lightning as L
    from squinchcomm.integrations.lightning import SquinchDDPStrategy
    from squinchcomm.torch.ddp_hooks import SquinchHookState

    trainer = L.Trainer(accelerator="cpu", devices=2,
                        strategy=SquinchDDPStrategy(hook_state=SquinchHookState(error_feedback=True)))
    trainer.fit(module, data)
"""

from __future__ import annotations

from squinchcomm.errors import require

require("lightning", "lightning", "squinchcomm.integrations.lightning")

from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from squinchcomm.integrations._common import (check_compressed, gather_hook_state,  # noqa: E402
                                              load_hook_state)
from squinchcomm.torch import fsdp  # noqa: E402
from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook  # noqa: E402

__all__ = ["SquinchDDPStrategy", "SquinchFSDP"]

_KEY = "squinchcomm"


class SquinchDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with the Squinch DDP hook on every device.

    Args:
        hook_state: the hook's state (compression, rounding, error feedback,
            warm-up, opt-outs; see ``SquinchHookState``); default
            ``SquinchHookState()`` (Squinch, error feedback on).
        *args, **kwargs: ``DDPStrategy``'s, except the comm-hook and
            model-averaging ones, which this strategy replaces.
    """

    strategy_name = "squinch_ddp"

    def __init__(self, *args, hook_state: SquinchHookState | None = None, **kwargs):
        taken = [k for k in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper",
                             "model_averaging_period") if kwargs.get(k) is not None]
        if taken:
            raise ValueError(f"SquinchDDPStrategy registers the Squinch hook itself: drop "
                             f"{', '.join(taken)} (pass hook_state=SquinchHookState(...) for "
                             "its options)")
        if hook_state is not None and not isinstance(hook_state, SquinchHookState):
            raise ValueError(f"hook_state is a {type(hook_state).__name__}: pass a "
                             "squinchcomm.torch.ddp_hooks.SquinchHookState")
        super().__init__(*args, **kwargs)
        self.hook_state = SquinchHookState() if hook_state is None else hook_state
        self._checked = False

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        """Register nothing under DDP's names (``strategy=SquinchDDPStrategy()``)."""

    # Step 1: the hook, on every device type (Lightning's own: CUDA only).
    def _register_ddp_hooks(self) -> None:
        self.model.register_comm_hook(self.hook_state, squinch_hook)

    # Step 2: the first optimizer step proves the compression.
    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if not self._checked:
            check_compressed(self.hook_state, "SquinchDDPStrategy")
            self._checked = True
        return out

    # Step 3: every rank's residuals in rank 0's checkpoint, and back.
    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        checkpoint[_KEY] = gather_hook_state(self.hook_state)  # collective: every rank is here
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        load_hook_state(self.hook_state, checkpoint.get(_KEY))
        return checkpoint


class SquinchFSDP(Callback):
    """FSDP2 under Lightning's ``ModelParallelStrategy``: every FSDP2 unit's
    gradient reduce-scatter compressed by :func:`squinchcomm.torch.fsdp.compress`.

    Apply ``fully_shard`` in ``LightningModule.configure_model`` as Lightning
    documents; at ``on_fit_start`` (after it) this callback compresses every
    unit of the module, and after the first training batch it checks that the
    reduce-scatters ran and sent fewer bytes than uncompressed
    (:class:`~squinchcomm.integrations.CompressionNotActiveError` otherwise).
    The residuals (``error_feedback=True``) of every rank go into Lightning's
    checkpoint as this callback's state (gathered from all ranks when the
    checkpoint is made) and each rank gets its own back on resume.

    Args:
        **options: :func:`squinchcomm.torch.fsdp.compress`'s (compression,
            error_feedback, min_compress_bytes, uncompressed, ...).

    Example::

        trainer = L.Trainer(strategy=ModelParallelStrategy(), callbacks=[SquinchFSDP()])
    """

    def __init__(self, **options):
        self.options, self.state, self._checked, self._restored = options, None, False, None

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):  # every rank runs this: all raise
            raise ValueError(
                "SquinchFSDP compresses FSDP2 units (torch.distributed.fsdp.fully_shard), but "
                "Lightning's FSDPStrategy wraps the model in FSDP1 (FullyShardedDataParallel), "
                "which squinchcomm does not compress: use strategy=ModelParallelStrategy() and "
                "call fully_shard on the blocks and the model in configure_model")
        if self.state is None:
            self.state = fsdp.compress(pl_module, **self.options)
        self._apply_restored()

    def _apply_restored(self) -> None:
        """A resumed run: this rank's residuals, once the units exist."""
        if self._restored is not None and self.state is not None:
            restored, self._restored = self._restored, None
            load_hook_state(self.state, restored)

    def state_dict(self) -> dict:
        """Every rank's residuals (collective: Lightning asks every rank)."""
        return gather_hook_state(self.state)

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict  # applied now or at on_fit_start, once the units exist
        self._apply_restored()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._checked and trainer.world_size > 1:
            check_compressed(self.state, "SquinchFSDP")
        self._checked = True

