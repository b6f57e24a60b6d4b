"""Autograd through the collectives, as in Horovod.

The synchronous collectives of :mod:`squinchcomm.torch` (``allreduce``,
``allgather``, ``broadcast``, ``alltoall``, ``reducescatter`` and the grouped
forms) go through these functions when an input requires grad, so a loss
computed from their results backpropagates to every rank's input. With the
total loss L the sum of every rank's own loss:

1. allreduce (average or sum): the gradient is the same allreduce of the
   output gradients (same op, prescale/postscale and compression).
2. allgather: the sum over ranks of the output gradient, this rank's rows.
3. broadcast: the sum over ranks of the output gradient on the root,
   zeros on every other rank.
4. alltoall: the output gradient sent back along the received splits.
5. reducescatter: the allgather of the output gradients, times the
   reduction's scale (1/N for an average, then prescale * postscale).
6. The grouped forms: the grouped collective of the gradients.

Min, max and product have no gradient here (backward raises). Backward runs
the collectives in the order autograd reaches them, which is the same on
every rank when every rank runs the same graph.
"""

from __future__ import annotations

import torch

from squinchcomm.torch import _ops

__all__ = ["allreduce", "grouped_allreduce", "allgather", "grouped_allgather", "broadcast",
           "alltoall", "reducescatter", "grouped_reducescatter", "needs_grad"]


def needs_grad(*tensors) -> bool:
    """True when autograd should record a collective of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _no_gradient(op: str):
    raise RuntimeError(f"allreduce with op={op} has no gradient in squinchcomm: detach the "
                       "input, or reduce with hvd.Average / hvd.Sum")


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, options):
        ctx.options = options
        return _ops.allreduce_async(tensor, **options).wait()

    @staticmethod
    def backward(ctx, grad):
        # Step 1: the same reduction of the gradients.
        op = _ops._op(ctx.options.get("average"), ctx.options.get("op"))
        if op not in ("average", "sum"):
            _no_gradient(op)
        options = dict(ctx.options, name=None)
        return _ops.allreduce_async(grad.contiguous(), **options).wait(), None


class _GroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options, *tensors):
        ctx.options = options
        return tuple(_ops.grouped_allreduce_async(list(tensors), **options).wait())

    @staticmethod
    def backward(ctx, *grads):
        # Step 6 (of step 1).
        op = _ops._op(ctx.options.get("average"), ctx.options.get("op"))
        if op not in ("average", "sum"):
            _no_gradient(op)
        options = dict(ctx.options, name=None)
        return (None, *_ops.grouped_allreduce_async([g.contiguous() for g in grads],
                                                    **options).wait())


def _my_rows(rows: int, process_set) -> tuple[int, int]:
    """(offset, rows) of this rank's block in an allgather of ``rows`` rows each."""
    comm = _ops._check_process_set(process_set)
    counts = comm.allgather_object(rows)
    return sum(counts[:comm.rank]), rows


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.rows, ctx.process_set = tensor.shape[0], process_set
        return _ops.allgather_async(tensor, name, process_set).wait()

    @staticmethod
    def backward(ctx, grad):
        # Step 2: every rank's gradient of this rank's rows, summed.
        total = _ops.allreduce_async(grad.contiguous(), op=_ops.Sum,
                                     process_set=ctx.process_set).wait()
        offset, rows = _my_rows(ctx.rows, ctx.process_set)
        return total.narrow(0, offset, rows), None, None


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return _ops.broadcast_async(tensor, root_rank, name, process_set).wait()

    @staticmethod
    def backward(ctx, grad):
        # Step 3: the root's value reached every rank: their gradients sum there.
        total = _ops.allreduce_async(grad.contiguous(), op=_ops.Sum,
                                     process_set=ctx.process_set).wait()
        if _ops.rank() != ctx.root_rank:  # root_rank is global, as in Horovod
            total.zero_()
        return total, None, None, None


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, compression, process_set):
        out, received = _ops.alltoall_async(tensor, splits, name, process_set,
                                            compression).wait()
        ctx.received, ctx.compression, ctx.process_set = received, compression, process_set
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, _):
        # Step 4: each received row's gradient goes back to its sender.
        back, _ = _ops.alltoall_async(grad.contiguous(), ctx.received, None, ctx.process_set,
                                      ctx.compression).wait()
        return back, None, None, None, None


def _reducescatter_scale(options) -> float:
    op = _ops._op(None, options.get("op"))
    world = _ops._check_process_set(options.get("process_set")).size
    scale = 1.0 / world if op == "average" else 1.0
    return scale * float(options.get("prescale_factor", 1.0)) * float(
        options.get("postscale_factor", 1.0))


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, options):
        ctx.scale, ctx.process_set = _reducescatter_scale(options), options.get("process_set")
        return _ops.reducescatter_async(tensor, **options).wait()

    @staticmethod
    def backward(ctx, grad):
        # Step 5: every rank's rows of the gradient, scaled as the reduction was.
        full = _ops.allgather_async(grad.contiguous(), None, ctx.process_set).wait()
        return full * ctx.scale, None


class _GroupedReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options, *tensors):
        ctx.scale, ctx.process_set = _reducescatter_scale(options), options.get("process_set")
        return tuple(_ops.grouped_reducescatter_plain(list(tensors), **options))

    @staticmethod
    def backward(ctx, *grads):
        handles = [_ops.allgather_async(g.contiguous(), None, ctx.process_set) for g in grads]
        return (None, *[h.wait() * ctx.scale for h in handles])


class _GroupedAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, names, *tensors):
        name, process_set = names
        ctx.rows, ctx.process_set = [t.shape[0] for t in tensors], process_set
        handles = [_ops.allgather_async(t, None if name is None else f"{name}.{i}", process_set)
                   for i, t in enumerate(tensors)]
        return tuple(h.wait() for h in handles)

    @staticmethod
    def backward(ctx, *grads):
        handles = [_ops.allreduce_async(g.contiguous(), op=_ops.Sum, process_set=ctx.process_set)
                   for g in grads]
        totals = [h.wait() for h in handles]
        out = []
        for total, rows in zip(totals, ctx.rows):
            offset, rows = _my_rows(rows, ctx.process_set)
            out.append(total.narrow(0, offset, rows))
        return (None, *out)


# ----------------------------------------------------------------------------
# Entry points (called by squinchcomm.torch's collectives when grad is needed)
# ----------------------------------------------------------------------------
def allreduce(tensor, **options):
    return _Allreduce.apply(tensor, options)


def grouped_allreduce(tensors, **options):
    return list(_GroupedAllreduce.apply(options, *tensors))


def allgather(tensor, name=None, process_set=None):
    return _Allgather.apply(tensor, name, process_set)


def grouped_allgather(tensors, name=None, process_set=None):
    return list(_GroupedAllgather.apply((name, process_set), *tensors))


def broadcast(tensor, root_rank, name=None, process_set=None):
    return _Broadcast.apply(tensor, root_rank, name, process_set)


def alltoall(tensor, splits, name, compression, process_set=None):
    return _Alltoall.apply(tensor, splits, name, compression, process_set)


def reducescatter(tensor, **options):
    return _Reducescatter.apply(tensor, options)


def grouped_reducescatter(tensors, **options):
    return list(_GroupedReducescatter.apply(options, *tensors))
