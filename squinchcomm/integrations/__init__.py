"""Squinch where users already train: PyTorch Lightning, Hugging Face Accelerate and Trainer.

A leaf of the package: each submodule imports its framework only when it is
imported itself, and nothing else in squinchcomm imports this package.

- :mod:`squinchcomm.integrations.lightning`: ``SquinchDDPStrategy``, a
  ``DDPStrategy`` that registers the Squinch DDP hook on every device type
  (Lightning's own ``ddp_comm_hook`` is registered on CUDA only: on CPU/gloo it
  is silently dropped) and keeps every rank's error-feedback residuals in
  Lightning's checkpoints.
- :mod:`squinchcomm.integrations.accelerate`: ``register(accelerator, model,
  optimizer)`` after ``accelerator.prepare()`` (Accelerate's own
  ``DistributedDataParallelKwargs(comm_hook=...)`` takes only its enum of
  PyTorch's hooks), with the residuals in ``accelerator.save_state``.
- :mod:`squinchcomm.integrations.transformers`: ``SquinchTrainer``, the
  Hugging Face ``Trainer`` (which builds its own DDP handler and passes no
  hook) with the hook registered on the model it wraps and each rank's
  residuals beside every checkpoint.

All three check after the first optimizer step that compression really happened
(the hook ran and this rank sent fewer bytes than the same buffers
uncompressed) and raise :class:`CompressionNotActiveError` otherwise, so a
framework change can never fall back to uncompressed training unnoticed.
"""

from squinchcomm.integrations._common import CompressionNotActiveError, check_compressed

__all__ = ["CompressionNotActiveError", "check_compressed"]
