"""The Horovod-compatible functional API over the default communicator.

Every function here is a thin wrapper over one
:class:`~squinchcomm.collectives.Communicator` method, so there is one
engine, one metadata check and one algorithm per collective. Floating
tensors (float32, float16, bfloat16) use the compression asked for; other
dtypes travel uncompressed through the same engine (float64 and integers are
summed exactly; bool moves as bytes in broadcast, allgather and alltoall), so
code written for Horovod keeps working. CPU tensors are used zero-copy; for
CUDA tensors torch's current stream is captured at the call and waited for
(see :mod:`squinchcomm.collectives.engine`).

Handles: the ``*_async`` functions return a :class:`TorchHandle`; pass it to
:func:`synchronize` (blocks, returns the result) or :func:`poll` (says
whether it is done). Operations progress on the engine's thread, whether
or not anyone polls.
"""

from __future__ import annotations

import atexit
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from squinchcomm import collectives
from squinchcomm.collectives import Communicator, Handle, engine
from squinchcomm.errors import TransportError
from squinchcomm.torch import process_sets as _process_sets
from squinchcomm.torch.compression import Compression, WireCompression, as_compression

__all__ = ["Average", "Sum", "Adasum", "Min", "Max", "Product", "TorchHandle",
           "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
           "cross_rank", "cross_size", "mpi_built", "gloo_built", "nccl_built",
           "ccl_built", "cuda_built", "rocm_built", "mpi_enabled", "gloo_enabled",
           "mpi_threads_supported", "is_homogeneous", "HorovodInternalError",
           "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
           "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async",
           "grouped_allreduce_async_", "allgather", "allgather_async", "allgather_object",
           "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "broadcast_object",
           "reducescatter", "reducescatter_async", "grouped_reducescatter", "grouped_allgather",
           "alltoall", "barrier", "join", "synchronize", "poll",
           "broadcast_parameters", "broadcast_optimizer_state", "communicator",
           "start_timeline", "stop_timeline", "sparse_allreduce_async"]

# Horovod's reduction constants (horovod.common.basics values).
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
_OP_NAMES = {Average: "average", Sum: "sum", Min: "min", Max: "max", Product: "product"}


# ----------------------------------------------------------------------------
# Setup and topology
# ----------------------------------------------------------------------------
def _launched_by_torchrun() -> bool:
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return True
    under_mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    return "RANK" in env and "WORLD_SIZE" in env and not under_mpi


def init(transport=None, process_sets=None, **options) -> Communicator:
    """Start the default communicator (``hvd.init()``).

    Args:
        transport: "mpi" (MPI COMM_WORLD), "torch" (torch.distributed; started
            from torchrun's or mpirun's environment if needed), a Transport,
            an mpi4py communicator or a torch process group. None picks
            "torch" under torchrun or when torch.distributed is already
            initialized, "mpi" otherwise.
        **options: :class:`~squinchcomm.collectives.Communicator` options
            (compression, rounding, error_feedback, min_compress_bytes,
            hierarchical, node_size, check_metadata, timeout, seed).
        process_sets: Horovod's static process sets: a list of
            :class:`~squinchcomm.torch.process_sets.ProcessSet` (or rank
            lists) registered right away, in order, on every rank.

    ``SQUINCHCOMM_TIMELINE=path`` starts :func:`start_timeline` (written at
    exit), as ``HOROVOD_TIMELINE`` does.

    Returns:
        The communicator (also reachable as ``hvd.communicator()``).

    Example:
        >>> import squinchcomm.torch as hvd            # doctest: +SKIP
        >>> hvd.init()                                 # doctest: +SKIP
        >>> torch.manual_seed(hvd.rank())              # doctest: +SKIP
    """
    if transport is None:
        import torch.distributed as dist

        torch_ready = dist.is_available() and dist.is_initialized()
        transport = "torch" if torch_ready or _launched_by_torchrun() else "mpi"
    comm = collectives.init(transport, **options)
    _process_sets._reset(comm)
    for ps in process_sets or ():
        _process_sets.add_process_set(ps)
    timeline = os.environ.get("SQUINCHCOMM_TIMELINE")
    if timeline:
        start_timeline(timeline)
        atexit.register(stop_timeline)
    return comm


def shutdown():
    """Forget the default communicator and the process sets (``hvd.shutdown()``)."""
    collectives.shutdown()
    _process_sets._reset(None)


def is_initialized() -> bool:
    """Return True after :func:`init`."""
    return collectives.is_initialized()


def communicator() -> Communicator:
    """Return the default communicator; ValueError before :func:`init`."""
    if not collectives.is_initialized():
        raise ValueError("squinchcomm.torch is not initialized: call hvd.init() first")
    return collectives.default()


# The topology queries are the library's own, over the same default communicator.
rank, size = collectives.rank, collectives.size
local_rank, local_size = collectives.local_rank, collectives.local_size
cross_rank, cross_size = collectives.cross_rank, collectives.cross_size


def start_timeline(file_path, mark_cycles=False):
    """Horovod's timeline: record every collective from now on, written by
    :func:`stop_timeline` as a Chrome trace (open it in chrome://tracing or
    Perfetto): one event per operation on the engine's thread, with its
    queueing time and error. A ``{rank}`` in ``file_path`` gives every rank
    its own file; without it only rank 0 records, as Horovod writes one
    file. ``mark_cycles`` has nothing to mark (the engine has no negotiation
    cycles) and is ignored with a warning."""
    if mark_cycles:
        warnings.warn("start_timeline(mark_cycles=True): squinchcomm's engine has no "
                      "negotiation cycles to mark; recording operations only", stacklevel=2)
    path = str(file_path)
    if "{rank}" in path:
        engine.start_timeline(path.replace("{rank}", str(rank())))
    elif rank() == 0:
        engine.start_timeline(path)


def stop_timeline():
    """Stop the timeline and write its file (see :func:`start_timeline`)."""
    engine.stop_timeline()


def mpi_built() -> bool:
    """Return True when mpi4py is importable (the MPI transport can run)."""
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def gloo_built() -> bool:
    """Return True when torch.distributed has gloo."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def nccl_built() -> bool:
    """Return True when torch.distributed has NCCL."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_nccl_available()


def ccl_built() -> bool:
    """False: there is no oneCCL engine."""
    return False


def rocm_built() -> bool:
    """False: the GPU kernels are CUDA only."""
    return False


def cuda_built() -> bool:
    """Return True when CuPy is installed (the CUDA codec and NCCL transport can load)."""
    import importlib.util

    return importlib.util.find_spec("cupy") is not None


def mpi_enabled() -> bool:
    """Return True when the default communicator runs over MPI (after init)."""
    from squinchcomm.transport.mpi import MPITransport

    return isinstance(communicator().transport, MPITransport)


def gloo_enabled() -> bool:
    """Return True when the default communicator's process group has gloo
    (for all tensors, or for CPU tensors beside NCCL) (after init)."""
    from squinchcomm.transport.torch_dist import TorchTransport

    transport = communicator().transport
    return isinstance(transport, TorchTransport) and "gloo" in transport.backend


def mpi_threads_supported() -> bool:
    """Return True when MPI runs with MPI_THREAD_MULTIPLE (the MPI transport requires it)."""
    if not mpi_built():
        return False
    from mpi4py import MPI

    return MPI.Is_initialized() and MPI.Query_thread() == MPI.THREAD_MULTIPLE


def is_homogeneous() -> bool:
    """Return True when every node runs the same number of ranks (after init)."""
    comm = communicator()
    return comm.size == comm.local_size * comm.cross_size


#: Horovod's error for a failed collective (a peer that died or timed out) is
#: the library's TransportError: ``except hvd.HorovodInternalError`` catches it.
HorovodInternalError = TransportError


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def _options(comp: WireCompression) -> dict:
    """The per-call options a WireCompression stands for."""
    return {"compression": comp.name, "rounding": comp.rounding,
            "hierarchical": comp.hierarchical, "error_feedback": comp.error_feedback}


def _op(average, op) -> str:
    if average is not None:
        if op is not None:
            raise ValueError("pass either op= or the deprecated average=, not both")
        op = Average if average else Sum
    if op is None:
        op = Average
    if op == Adasum:
        raise ValueError("op=hvd.Adasum is not supported by squinchcomm: use hvd.Average "
                         "(optionally with Compression.squinch) or hvd.Sum")
    if op not in _OP_NAMES:
        raise ValueError(f"op={op!r} is not supported: use hvd.Average, hvd.Sum, hvd.Min, "
                         "hvd.Max or hvd.Product")
    return _OP_NAMES[op]


def _check_process_set(process_set) -> Communicator:
    """The communicator of ``process_set`` (None: the default one); ValueError
    for a set that is not registered or does not include this rank."""
    return _process_sets.communicator_of(process_set)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


class TorchHandle:
    """An operation in flight: pass it to :func:`synchronize` or :func:`poll`.

    Wraps the library's handles (one per fused buffer) and a ``finish``
    step that turns their results into this API's result, run once by
    ``wait()`` after every handle succeeded: a failed operation raises and
    never hands back a buffer it did not fill. Operations progress on the
    engine's thread; polling is not needed.
    """

    def __init__(self, handles: list[Handle], finish: Callable[[list], Any]):
        self._handles, self._finish = handles, finish
        self._done, self._result = False, None

    def test(self) -> bool:
        """Return True when :meth:`wait` will not block."""
        return self._done or all(h.test() for h in self._handles)

    def wait(self):
        """Block until done; return the result (raise the operation's error)."""
        if not self._done:
            results = [h.wait() for h in self._handles]
            self._result, self._done = self._finish(results), True
            self._handles = []
        return self._result


def poll(handle: TorchHandle) -> bool:
    """Return True when :func:`synchronize` will not block."""
    return handle.test()


def synchronize(handle: TorchHandle):
    """Wait for ``handle`` and return its result (the output tensor)."""
    return handle.wait()


# ----------------------------------------------------------------------------
# Allreduce
# ----------------------------------------------------------------------------
def _start_allreduce(tensor, out, average, name, op, prescale_factor, postscale_factor,
                     compression, process_set) -> TorchHandle:
    comm = _check_process_set(process_set)
    src = _contiguous(tensor)
    dst = out.detach() if out.is_contiguous() else torch.empty_like(src)
    h = comm.allreduce_async(src, out=dst, op=_op(average, op), name=name,
                             prescale=float(prescale_factor), postscale=float(postscale_factor),
                             **_options(as_compression(compression)))

    def finish(_):
        if dst is not out and dst.data_ptr() != out.data_ptr():
            with torch.no_grad():
                out.copy_(dst)
        return out

    return TorchHandle([h], finish)


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                    postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Start an allreduce into a new tensor; return a handle for :func:`synchronize`.

    Args: as :func:`allreduce`.
    """
    with torch.no_grad():
        out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return _start_allreduce(tensor, out, average, name, op, prescale_factor, postscale_factor,
                            compression, process_set)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                     postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Start an in-place allreduce of ``tensor``; return a handle for :func:`synchronize`."""
    return _start_allreduce(tensor, tensor, average, name, op, prescale_factor,
                            postscale_factor, compression, process_set)


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None,
              prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Average (or sum) ``tensor`` over all ranks; return a new tensor.

    Args:
        tensor: any shape; float32/float16/bfloat16 use ``compression``,
            float64 and integer tensors are summed exactly (uncompressed;
            integer averages truncate toward zero); bool raises ValueError.
        average: deprecated Horovod flag; use ``op``.
        name: the tensor's name (needed for error feedback; shown in errors).
        compression: ``hvd.Compression.none | fp16 | bf16 | squinch`` or
            ``Compression.squinch_with(...)``.
        op: ``hvd.Average`` (default), ``hvd.Sum``, or ``hvd.Min``/``Max``/
            ``Product``, which run uncompressed and exact (a compression
            other than none raises ValueError); Adasum raises ValueError.
        prescale_factor / postscale_factor: multiply before / after the reduction.

    Returns:
        The reduced tensor, bit-identical on every rank (same dtype and shape).

    Differentiable: with ``tensor.requires_grad`` the gradient is the same
    allreduce of the output's gradient (see :mod:`squinchcomm.torch._autograd`).

    Example:
        >>> avg_loss = hvd.allreduce(torch.tensor(loss), name="loss")   # doctest: +SKIP
    """
    if _autograd.needs_grad(tensor):
        return _autograd.allreduce(tensor, average=average, name=name, op=op,
                                   prescale_factor=prescale_factor,
                                   postscale_factor=postscale_factor, process_set=process_set,
                                   compression=compression)
    return allreduce_async(tensor, average, name, op, prescale_factor, postscale_factor,
                           process_set, compression).wait()


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
               postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Reduce ``tensor`` in place; return it. Args: as :func:`allreduce`."""
    return allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor,
                            process_set, compression).wait()


def _start_grouped(tensors, outs, average, name, op, prescale_factor, postscale_factor,
                   compression, process_set) -> TorchHandle:
    """Fuse ``tensors`` into one flat buffer per (device, dtype), start one
    allreduce per buffer, and copy the slices into ``outs`` when done."""
    comm = _check_process_set(process_set)
    op_name = _op(average, op)
    options = _options(as_compression(compression))
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((str(t.device), t.dtype), []).append(i)
    handles, fused = [], []
    for (_, dtype), idx in groups.items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])  # one buffer per dtype
        gname = None if name is None else f"{name}.{str(dtype).replace('torch.', '')}"
        handles.append(comm.allreduce_async(flat, out=flat, op=op_name, name=gname,
                                            prescale=float(prescale_factor),
                                            postscale=float(postscale_factor), **options))
        fused.append((idx, flat))

    def finish(_):
        with torch.no_grad():
            for idx, flat in fused:
                pos = 0
                for i in idx:
                    n = outs[i].numel()
                    outs[i].copy_(flat[pos:pos + n].view_as(outs[i]))
                    pos += n
        return list(outs)

    return TorchHandle(handles, finish)


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                            postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Start a fused allreduce of a list of tensors into new tensors."""
    with torch.no_grad():
        tensors = list(tensors)
        outs = [torch.empty_like(t) for t in tensors]
    return _start_grouped(tensors, outs, average, name, op, prescale_factor, postscale_factor,
                          compression, process_set)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                             postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Start a fused in-place allreduce of a list of tensors."""
    tensors = list(tensors)
    return _start_grouped(tensors, tensors, average, name, op, prescale_factor,
                          postscale_factor, compression, process_set)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Allreduce a list of tensors as one fused collective per dtype.

    Args: as :func:`allreduce`, with a list of tensors; ``name`` (if given)
        names each dtype's fused buffer ``f"{name}.{dtype}"``.

    Returns:
        A list of reduced tensors, in the input order (differentiable, as
        :func:`allreduce`).
    """
    tensors = list(tensors)
    if _autograd.needs_grad(*tensors):
        return _autograd.grouped_allreduce(tensors, average=average, name=name, op=op,
                                           prescale_factor=prescale_factor,
                                           postscale_factor=postscale_factor,
                                           process_set=process_set, compression=compression)
    return grouped_allreduce_async(tensors, average, name, op, prescale_factor,
                                   postscale_factor, process_set, compression).wait()


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                       postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Reduce a list of tensors in place (fused); return them."""
    return grouped_allreduce_async_(tensors, average, name, op, prescale_factor,
                                    postscale_factor, process_set, compression).wait()


# ----------------------------------------------------------------------------
# Allgather, broadcast, reducescatter, alltoall
# ----------------------------------------------------------------------------
def allgather_async(tensor, name=None, process_set=None) -> TorchHandle:
    """Start :func:`allgather`; return a handle."""
    comm = _check_process_set(process_set)
    h = comm.allgather_async(_contiguous(tensor), name=name)
    return TorchHandle([h], lambda results: results[0])


def allgather(tensor, name=None, process_set=None):
    """Concatenate every rank's ``tensor`` along the first dimension (sizes may
    differ there only); exact, any dtype.

    Differentiable: the gradient is the sum over ranks of the output
    gradient's rows that came from this rank.

    Example:
        >>> hvd.allgather(torch.tensor([hvd.rank()]))   # tensor([0, 1, ..., size-1])  # doctest: +SKIP
    """
    _check_process_set(process_set)
    if _autograd.needs_grad(tensor):
        return _autograd.allgather(tensor, name, process_set)
    return allgather_async(tensor, name, process_set).wait()


def allgather_object(obj, name=None, process_set=None) -> list:
    """Return the list of every rank's picklable ``obj``, in rank order."""
    return _check_process_set(process_set).allgather_object(obj)


def _start_broadcast(tensor, root_rank, name, process_set, check=None) -> TorchHandle:
    comm = _check_process_set(process_set)
    buf = _contiguous(tensor)
    h = comm.broadcast_async(buf, _process_sets.set_rank_of(process_set, root_rank), name=name,
                             check_metadata=check)

    def finish(_):
        if buf.data_ptr() != tensor.data_ptr():  # a non-contiguous input went through a copy
            with torch.no_grad():
                tensor.copy_(buf)
        return tensor

    return TorchHandle([h], finish)


def broadcast_async_(tensor, root_rank, name=None, process_set=None) -> TorchHandle:
    """Start an in-place broadcast from ``root_rank``; return a handle."""
    return _start_broadcast(tensor, root_rank, name, process_set)


def broadcast_async(tensor, root_rank, name=None, process_set=None) -> TorchHandle:
    """Start a broadcast from ``root_rank`` into a new tensor; return a handle."""
    return _start_broadcast(tensor.detach().clone(), root_rank, name, process_set)


def broadcast_(tensor, root_rank, name=None, process_set=None):
    """Overwrite ``tensor`` with ``root_rank``'s values (exact, any dtype); return it."""
    return broadcast_async_(tensor, root_rank, name, process_set).wait()


def broadcast(tensor, root_rank, name=None, process_set=None):
    """Return a new tensor holding ``root_rank``'s ``tensor`` (exact, any dtype).

    Differentiable: the root's gradient is the sum of every rank's output
    gradient; the other ranks' is zero."""
    _check_process_set(process_set)
    if _autograd.needs_grad(tensor):
        return _autograd.broadcast(tensor, root_rank, name, process_set)
    return broadcast_async(tensor, root_rank, name, process_set).wait()


def broadcast_object(obj, root_rank=0, name=None, process_set=None):
    """Return ``root_rank``'s picklable ``obj`` on every rank.

    Pickles on the root, broadcasts the length (an int64 tensor), then the
    bytes (a uint8 tensor); the root gets its own object back.

    Example:
        >>> epoch = hvd.broadcast_object(epoch, root_rank=0)   # doctest: +SKIP
    """
    root = _check_process_set(process_set).rank == _process_sets.set_rank_of(process_set, root_rank)
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if root else b""
    sz = torch.tensor([len(payload)], dtype=torch.int64)
    broadcast_(sz, root_rank, None if name is None else f"{name}.sz", process_set)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if root and payload
           else torch.zeros(int(sz.item()), dtype=torch.uint8))
    broadcast_(buf, root_rank, None if name is None else f"{name}.t", process_set)
    return obj if root else pickle.loads(buf.numpy().tobytes())


def _row_splits(rows: int, world: int) -> list[int]:
    """Horovod's split of ``rows`` over ranks: the first ``rows % world`` get one more."""
    return [rows // world + (1 if r < rows % world else 0) for r in range(world)]


def _rows(tensor: torch.Tensor, what: str) -> tuple[int, tuple, int]:
    """(rows, trailing shape, elements per row) of a tensor split by rows."""
    if tensor.dim() == 0:
        raise ValueError(f"{what} needs a tensor with at least one dimension")
    tail = tuple(tensor.shape[1:])
    return tensor.shape[0], tail, int(np.prod(tail, dtype=np.int64))


def alltoall_async(tensor, splits=None, name=None, process_set=None,
                   compression=Compression.none) -> TorchHandle:
    """Start :func:`alltoall`; the handle's result is ``(output, received_splits)``."""
    comm = _check_process_set(process_set)
    src = _contiguous(tensor)
    rows, tail, per_row = _rows(src, "alltoall")
    if splits is None:
        if rows % comm.size:
            raise ValueError(f"{rows} rows do not split evenly over {comm.size} ranks: pass splits=")
        splits = [rows // comm.size] * comm.size
    splits = [int(s) for s in (splits.tolist() if torch.is_tensor(splits) else splits)]
    if len(splits) != comm.size or min(splits) < 0 or sum(splits) != rows:
        raise ValueError(f"splits={splits} must have {comm.size} non-negative entries summing "
                         f"to the first dimension ({rows})")
    h = comm.alltoall_async(src.reshape(-1), [s * per_row for s in splits], name=name,
                            compression=as_compression(compression).name)

    def finish(results):
        flat, recv = results[0]
        recv_rows = [c // per_row if per_row else 0 for c in recv]
        return flat.reshape((sum(recv_rows),) + tail), torch.tensor(recv_rows, dtype=torch.int32)

    return TorchHandle([h], finish)


def alltoall(tensor, splits=None, name=None, process_set=None, compression=Compression.none):
    """Send ``splits[r]`` rows (first dimension) of ``tensor`` to rank r.

    Args:
        tensor: at least 1-D; any dtype (compression applies to float kinds).
        splits: rows per destination rank (list or tensor); None: equal.
        compression: wire compression of each split (default exact).

    Returns:
        The received rows concatenated in rank order; with ``splits`` given,
        ``(output, received_splits)`` like Horovod. Differentiable: the
        gradient of each received row goes back to its sender.
    """
    _check_process_set(process_set)
    if _autograd.needs_grad(tensor):
        out, received = _autograd.alltoall(tensor, splits, name, compression, process_set)
    else:
        out, received = alltoall_async(tensor, splits, name, process_set, compression).wait()
    return out if splits is None else (out, received)


def reducescatter_async(tensor, name=None, compression=Compression.none, op=None,
                        process_set=None, prescale_factor=1.0, postscale_factor=1.0
                        ) -> TorchHandle:
    """Start :func:`reducescatter`; return a handle (``synchronize`` gives the rows)."""
    comm = _check_process_set(process_set)
    src = _contiguous(tensor)
    rows, tail, per_row = _rows(src, "reducescatter")
    splits = _row_splits(rows, comm.size)
    options = _options(as_compression(compression))
    del options["hierarchical"]  # the reduce-scatter has no hierarchical form
    h = comm.reduce_scatter_async(src, counts=[s * per_row for s in splits], op=_op(None, op),
                                  name=name, prescale=float(prescale_factor),
                                  postscale=float(postscale_factor), **options)
    shape = (splits[comm.rank],) + tail
    return TorchHandle([h], lambda results: results[0][0].reshape(shape).to(tensor.dtype))


def reducescatter(tensor, name=None, compression=Compression.none, op=None, process_set=None,
                  prescale_factor=1.0, postscale_factor=1.0):
    """Reduce ``tensor`` over ranks and return this rank's rows of the result.

    Rows (first dimension) are split like Horovod: the first ``rows % size``
    ranks get one extra row. This is :meth:`Communicator.reduce_scatter
    <squinchcomm.collectives.Communicator.reduce_scatter>` with those row
    splits: compressed, each rank's part is quantized once and summed in
    fp32; float64 and integer tensors are summed exactly, uncompressed.

    Returns:
        This rank's rows of the reduced tensor, in ``tensor``'s dtype.
        Differentiable: the gradient is the allgather of every rank's output
        gradient, scaled as the reduction (1/N for an average).
    """
    if _autograd.needs_grad(tensor):
        return _autograd.reducescatter(tensor, name=name, compression=compression, op=op,
                                       process_set=process_set,
                                       prescale_factor=prescale_factor,
                                       postscale_factor=postscale_factor)
    return reducescatter_async(tensor, name, compression, op, process_set, prescale_factor,
                               postscale_factor).wait()


def grouped_reducescatter_plain(tensors, name=None, compression=Compression.none, op=None,
                                process_set=None, prescale_factor=1.0, postscale_factor=1.0):
    """:func:`grouped_reducescatter` without autograd."""
    handles = [reducescatter_async(t, None if name is None else f"{name}.{i}", compression, op,
                                   process_set, prescale_factor, postscale_factor)
               for i, t in enumerate(tensors)]
    return [h.wait() for h in handles]


def grouped_reducescatter(tensors, name=None, compression=Compression.none, op=None,
                          process_set=None, prescale_factor=1.0, postscale_factor=1.0):
    """:func:`reducescatter` of each tensor, all started before the first is
    waited for; returns the list of this rank's rows (differentiable)."""
    tensors = list(tensors)
    options = dict(name=name, compression=compression, op=op, process_set=process_set,
                   prescale_factor=prescale_factor, postscale_factor=postscale_factor)
    if _autograd.needs_grad(*tensors):
        return _autograd.grouped_reducescatter(tensors, **options)
    return grouped_reducescatter_plain(tensors, **options)


def grouped_allgather(tensors, name=None, process_set=None):
    """:func:`allgather` of each tensor, all started before the first is
    waited for (differentiable, as :func:`allgather`)."""
    _check_process_set(process_set)
    tensors = list(tensors)
    if _autograd.needs_grad(*tensors):
        return _autograd.grouped_allgather(tensors, name, process_set)
    handles = [allgather_async(t, None if name is None else f"{name}.{i}", process_set)
               for i, t in enumerate(tensors)]
    return [h.wait() for h in handles]


def sparse_allreduce_async(tensor, name=None, op=Average, process_set=None) -> TorchHandle:
    """Horovod's sparse allreduce of a ``torch.sparse_coo`` tensor: every
    rank's indices and values are allgathered (uncompressed, exact) and
    ``synchronize(handle)`` returns the sparse tensor of all of them
    (uncoalesced: entries at the same index add up when coalesced or used;
    values divided by the world size for ``hvd.Average``)."""
    comm = _check_process_set(process_set)
    if not (torch.is_tensor(tensor) and tensor.layout == torch.sparse_coo):
        raise ValueError("sparse_allreduce_async takes a torch.sparse_coo tensor; use allreduce "
                         "for dense tensors (or tensor.to_sparse())")
    op_name = _op(None, op)
    if op_name not in ("average", "sum"):
        raise ValueError(f"op={op_name}: a sparse allreduce averages or sums")
    indices = tensor._indices().t().contiguous()  # (nnz, ndim): allgather concatenates rows
    values = tensor._values().contiguous()
    shape = torch.tensor([list(tensor.shape)], dtype=torch.int64)  # checked across ranks
    handles = [comm.allgather_async(indices, name=None if name is None else f"{name}.indices"),
               comm.allgather_async(values, name=None if name is None else f"{name}.values"),
               comm.allgather_async(shape, name=None if name is None else f"{name}.shape")]

    def finish(results):
        all_indices, all_values, shapes = results
        if not bool((shapes == shape).all()):
            raise ValueError(f"sparse_allreduce: ranks disagree on the dense shape "
                             f"({', '.join(f'rank {q}={tuple(v)}' for q, v in enumerate(shapes.tolist()))}); "
                             "every rank must pass a sparse tensor of the same shape")
        if op_name == "average":
            all_values = all_values / comm.size
        # check_invariants: an index from a rank whose dense shape differs is a
        # clear error here, never an out-of-bounds write later
        return torch.sparse_coo_tensor(all_indices.t(), all_values, tensor.shape,
                                       check_invariants=True)

    return TorchHandle(handles, finish)


def barrier(process_set=None):
    """Wait until every rank reaches the barrier."""
    _check_process_set(process_set).barrier()


def join(device=-1, process_set=None) -> int:
    """Horovod's join: call it when this rank has run out of data. Until
    every rank has joined it answers the others' allreduces (including
    ``DistributedOptimizer``'s) with zeros, so ranks with uneven data can
    finish their epoch; returns the rank that joined last.

    An average still divides by the number of ranks, joined ones included
    (their zeros count, as in Horovod). Meanwhile the other ranks may call
    only allreduce (op Sum or Average) and barrier; anything else raises the
    same MismatchError on every rank. A joined rank waits at most
    ``SQUINCHCOMM_TIMEOUT`` for each of the others' calls. ``device`` is
    accepted for Horovod's signature (the zeros take the others' device).
    """
    return _check_process_set(process_set).join()


# ----------------------------------------------------------------------------
# Parameters and optimizer state
# ----------------------------------------------------------------------------
def broadcast_parameters(params, root_rank=0):
    """Overwrite parameters/buffers on every rank with ``root_rank``'s, exactly.

    Args:
        params: a ``state_dict()`` (items are sorted by name, like Horovod) or
            an iterable of ``(name, tensor)`` pairs such as
            ``model.named_parameters()``.
        root_rank: the rank whose values win.

    Example:
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)   # doctest: +SKIP
    """
    comm = communicator()
    if isinstance(params, dict):
        items = sorted(params.items())
    else:
        try:
            items = [p if isinstance(p, tuple) else (None, p) for p in params]
        except TypeError:
            raise ValueError(f"params of type {type(params).__name__}: pass model.state_dict() "
                             "or model.named_parameters()") from None
    items = [(n, t) for n, t in items if t is not None]
    for n, t in items:
        if not torch.is_tensor(t):
            raise ValueError(f"broadcast_parameters: '{n}' is a {type(t).__name__}, not a tensor; "
                             "pass model.state_dict() or model.named_parameters()")
    if comm.check_metadata:  # one check of the whole list instead of one per tensor
        metas = comm.allgather_object([(n, tuple(t.shape), str(t.dtype)) for n, t in items])
        collectives.check_agreement("broadcast_parameters", [{"tensors": m} for m in metas],
                                    ["tensors"], "; pass the same model's parameters on every rank")
    # Start every broadcast, then wait: the engine runs them back to back.
    _broadcast_all([t for _, t in items], root_rank)


def _broadcast_all(tensors, root_rank: int):
    """Broadcast every tensor from ``root_rank`` in place (exact), all started
    before the first is waited for; no per-tensor metadata check."""
    handles = [_start_broadcast(t, root_rank, None, None, check=False) for t in tensors]
    for h in handles:
        h.wait()


@dataclass(frozen=True)
class _TensorSlot:
    index: int
    shape: tuple
    dtype: str
    cuda: bool


def _strip_tensors(obj, tensors: list):
    """Replace tensors in a nested dict/list/tuple by slots; collect them."""
    if torch.is_tensor(obj):
        tensors.append(obj)
        return _TensorSlot(len(tensors) - 1, tuple(obj.shape), str(obj.dtype).replace("torch.", ""),
                           obj.is_cuda)
    if isinstance(obj, dict):
        return {k: _strip_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip_tensors(v, tensors) for v in obj)
    return obj


def _fill_tensors(obj, tensors: list):
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill_tensors(v, tensors) for v in obj)
    return obj


def broadcast_optimizer_state(optimizer, root_rank=0):
    """Give every rank ``root_rank``'s optimizer state and hyperparameters.

    Tensors (momentum buffers, Adam moments, step counts) are broadcast
    exactly; the structure and scalar options (lr, betas, ...) travel with
    :func:`broadcast_object`. Ranks whose state is still empty (no step taken
    yet) receive the root's. A DistributedOptimizer's error-feedback
    residuals stay per rank (they are not the root's to give).

    Example:
        >>> hvd.broadcast_optimizer_state(optimizer, root_rank=0)   # doctest: +SKIP
    """
    if getattr(optimizer, "_sq_shards", None) is not None and any(optimizer.state.values()):
        raise ValueError("this DistributedOptimizer shards its state (shard_optimizer_state="
                         "True): each rank holds a different shard, the root's state does not "
                         "fit the others; restore each rank's own state_dict() instead")
    is_root = rank() == root_rank
    sd = optimizer.state_dict() if is_root else None
    if is_root:
        sd = {k: v for k, v in sd.items() if k != "squinchcomm"}
    tensors: list = []
    skeleton = _strip_tensors(sd, tensors) if is_root else None
    skeleton = broadcast_object(skeleton, root_rank, name="optimizer_state")
    if not is_root:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch.cuda.is_available() else torch.device("cpu"))
        slots: list[_TensorSlot] = []
        _collect_slots(skeleton, slots)
        slots.sort(key=lambda s: s.index)
        tensors = [torch.empty(s.shape, dtype=getattr(torch, s.dtype),
                               device=device if s.cuda else "cpu") for s in slots]
    _broadcast_all(tensors, root_rank)
    if not is_root:
        optimizer.load_state_dict(_fill_tensors(skeleton, tensors))


def _collect_slots(obj, out: list):
    if isinstance(obj, _TensorSlot):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_slots(v, out)


# Last: the autograd functions are built on the collectives above.
from squinchcomm.torch import _autograd  # noqa: E402
