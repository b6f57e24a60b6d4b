"""ZeRO stage 1/2 for the Horovod API: ``hvd.DistributedOptimizer(...,
shard_optimizer_state=True)``.

Each rank keeps the optimizer state of one shard of the parameters only, so
the state's memory per rank falls as 1/N. How a step runs, step by step:

1. At construction the buckets are built as for ``DistributedOptimizer``
   (one parameter group, dtype and device per bucket). Bucket ``b``'s flat
   parameters are cut into block-aligned shards (the same bounds as
   :meth:`Communicator.reduce_scatter`); this rank's shard becomes a new
   parameter tensor, and the wrapped optimizer's param groups hold these
   shard tensors instead of the model's parameters.
2. As backward makes a bucket's gradients ready, they are copied into the
   bucket's flat buffer, the model's ``p.grad`` is released (ZeRO-2), and a
   compressed reduce-scatter starts (each rank encodes its gradient once;
   sums in fp32).
3. ``synchronize()`` waits for the reduce-scatters and gives every shard
   tensor its reduced gradient.
4. ``step()`` runs the wrapped optimizer on the shards only.
5. The updated shards are all-gathered uncompressed (parameters are never
   quantized) and copied into the model's parameters, identical on every
   rank.

Gradient clipping: the model's ``p.grad`` are gone after step 2, so clip
with :meth:`clip_grad_norm_`: the global norm of the reduced gradient, from
the shards (one exact float64 allreduce). Checkpoints hold each rank's
shard state: save one optimizer ``state_dict()`` per rank.
"""

from __future__ import annotations

import math

import torch

from squinchcomm.collectives.algorithms import shard_bounds
from squinchcomm.torch.optimizer import _DistributedOptimizer

__all__ = ["check_shardable"]  # the optimizer: hvd.DistributedOptimizer(shard_optimizer_state=True)


def check_shardable(optimizer, compression):
    """Refuse what the sharded variant cannot do, before any hook exists."""
    if any(optimizer.state.values()):
        raise ValueError("shard_optimizer_state=True needs an optimizer that has not "
                         "stepped yet (its state would cover whole parameters): wrap it "
                         "before training, or load a sharded state_dict afterwards")
    if compression.hierarchical:
        raise ValueError("shard_optimizer_state=True reduce-scatters the gradients; "
                         "hierarchical compression is for allreduce: drop hierarchical=True")


class _ShardedOptimizer(_DistributedOptimizer):
    """Mixin for the ZeRO variant (see the module docstring)."""

    def _sq_shard_setup(self):
        comm = self._sq_comm
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        kept = [[p for p in g["params"] if not p.requires_grad] for g in self.param_groups]
        self._sq_sparse_as_dense = True  # a sparse gradient joins its bucket densely
        self._sq_shards = []  # per bucket: (shard tensor, lo, hi)
        for b in self._sq_buckets:
            groups = {group_of[id(p)] for p in b.params}
            if len(groups) != 1:  # buckets are built per group in this mode
                raise AssertionError("a bucket spans parameter groups")
            bounds = shard_bounds(b.numel, comm.size)
            lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
            shard = torch.empty(hi - lo, dtype=b.dtype, device=b.device, requires_grad=True)
            kept[groups.pop()].append(shard)
            self._sq_shards.append((shard, lo, hi))
        for g, params in zip(self.param_groups, kept):
            g["params"] = params
        self._sq_pull()  # the shards' values, from the model

    def _sq_pull(self):
        """The shards from the model's parameters: whatever changed them since
        the last step (hvd.broadcast_parameters after wrapping, a loaded
        checkpoint) is what the step starts from."""
        with torch.no_grad():
            for b, (shard, lo, hi) in zip(self._sq_buckets, self._sq_shards):
                for p, off in zip(b.params, b.offsets):
                    a, z = max(lo, off), min(hi, off + p.numel())
                    if a < z:
                        shard[a - lo:z - lo].copy_(p.detach().reshape(-1)[a - off:z - off])

    def _sq_slot_params(self):
        return [p for b in self._sq_buckets for p in b.params]

    # ------------------------------------------------------------ step 2
    def _sq_start(self, b):
        self._sq_fill(b, release=True)  # ZeRO-2: the full gradient is not kept
        options = {k: v for k, v in self._sq_bucket_options(b).items() if k != "hierarchical"}
        b.handle = self._sq_comm.reduce_scatter_async(b.buffer, name=b.name, **options)

    # ------------------------------------------------------------ step 3
    def _sq_collect(self, i, b, handle):
        """(in ``synchronize()``) The bucket's reduced shard, as the gradient
        of this rank's shard tensor (clip with :meth:`clip_grad_norm_`)."""
        shard = self._sq_shards[i][0]
        reduced, _ = handle.wait()
        shard.grad = reduced.to(shard.dtype).view_as(shard)
        return None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the global norm of the reduced gradient, computed from the
        shards (synchronizes first if needed); returns the norm (float64)."""
        if not self._sq_synchronized:
            self.synchronize()
        grads = [s.grad for s, *_ in self._sq_shards if s.grad is not None]
        norm_type = float(norm_type)
        if math.isinf(norm_type):
            local = torch.stack([g.abs().max().double() for g in grads if g.numel()]
                                or [torch.zeros((), dtype=torch.float64)]).max()
            total = self._sq_comm.allreduce(local.reshape(1), op="max",
                                            name="zero.clip_grad_norm")[0]
        else:
            local = sum((g.double().abs() ** norm_type).sum() for g in grads)
            local = torch.as_tensor(local, dtype=torch.float64).reshape(1)
            total = self._sq_comm.allreduce(local, op="sum",
                                            name="zero.clip_grad_norm")[0] ** (1 / norm_type)
        coef = float(max_norm) / (float(total) + 1e-6)
        if coef < 1:
            for g in grads:
                g.mul_(coef)
        return total

    # ------------------------------------------------------------ steps 4-5
    def step(self, closure=None):
        if self._sq_should_synchronize and not self._sq_synchronized:
            self.synchronize()
        self._sq_synchronized = False
        self._sq_steps += 1
        self._sq_pull()
        # Step 4: the wrapped optimizer's own step, on this rank's shards
        result = super(_DistributedOptimizer, self).step(closure)
        # Step 5: every rank's updated shard, exact, into the model
        handles = [self._sq_comm.allgather_async(shard.detach(), name=f"{b.name}.params")
                   for b, (shard, *_) in zip(self._sq_buckets, self._sq_shards)]
        with torch.no_grad():
            for b, h in zip(self._sq_buckets, handles):
                full = h.wait()
                for p, off in zip(b.params, b.offsets):
                    p.copy_(full[off:off + p.numel()].view_as(p))
        return result

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none=set_to_none)
        for p in self._sq_slot_params():  # the model's gradients too (hooks re-fill them)
            p.grad = None

