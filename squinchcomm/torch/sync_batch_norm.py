"""Horovod's ``hvd.SyncBatchNorm``: batch normalization over the whole global batch.

In training, the per-channel mean and variance are those of every rank's
batch together (ranks may hold different batch sizes), computed in two exact
float64 allreduces of per-channel sums (the mean, then the squared deviations
from it: stable where ``E[x^2] - E[x]^2`` is not). The allreduces are the
differentiable ones of :mod:`squinchcomm.torch._autograd`, so backward sends
the statistics' gradients back across the ranks: each rank's input gradient is
that of the sum of every rank's loss, as with ``torch.nn.SyncBatchNorm``. In
evaluation (with running statistics) nothing is communicated. Statistics are
never compressed (a few numbers per channel).

Every rank must run the same layers in the same order in forward and backward
(each layer is two collectives), as in Horovod.

Example:
    >>> model = torchvision.models.resnet50(norm_layer=hvd.SyncBatchNorm)   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from squinchcomm.torch import _ops

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.BatchNorm{1,2,3}d`` whose training statistics span every
    rank's batch (Horovod's and torch's SyncBatchNorm). Same arguments as
    ``torch.nn.BatchNorm2d``; inputs ``(N, C, ...)`` of any rank >= 2."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x):
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm({self.num_features}) got {x.shape[1]} channels "
                             f"(input shape {tuple(x.shape)})")
        batch_stats = self.training or not self.track_running_stats
        if not batch_stats or _ops.size() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Step 1: the global mean, from per-channel sums and the local count.
        local = torch.cat([x.sum(dims, dtype=torch.float64),
                           x.new_tensor([x.numel() // x.shape[1]], dtype=torch.float64)])
        total = _ops.allreduce(local, op=_ops.Sum)
        count = total[-1].detach()
        if count < 2:
            raise ValueError(f"SyncBatchNorm needs more than one value per channel over all "
                             f"ranks (got {int(count)}, input shape {tuple(x.shape)})")
        mean = total[:-1] / count
        # Step 2: the global (biased) variance, from the deviations from it
        # (in float32, or float64 for float64 input).
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        dev = x.to(work) - mean.to(work).view(shape)
        var = _ops.allreduce((dev * dev).sum(dims, dtype=torch.float64), op=_ops.Sum) / count
        # Step 3: the running statistics (unbiased variance, as torch does).
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(
                    (var * (count / (count - 1))).to(self.running_var.dtype), alpha=m)
        # Step 4: normalize, then the affine transform.
        y = dev * torch.rsqrt(var + self.eps).to(work).view(shape)
        if self.affine:
            y = y * self.weight.to(work).view(shape) + self.bias.to(work).view(shape)
        return y.to(x.dtype)
