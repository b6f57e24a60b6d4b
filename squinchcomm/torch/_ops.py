"""The Horovod-compatible functional API over the default communicator.

Floating tensors (float32, float16, bfloat16) go through the library's
collectives (Squinch, fp16/bf16 or the engine's fp32 allreduce); other dtypes
(float64, integers, bool) travel as raw bytes (broadcast, allgather,
alltoall) or are summed exactly in float64 (allreduce), so code written for
Horovod keeps working. CPU tensors are used zero-copy; CUDA tensors run on
torch's current stream through CuPy.

Handles: the ``*_async`` functions return a :class:`TorchHandle`; pass it to
:func:`synchronize` (blocks, returns the result) or :func:`poll` (advances
it without blocking). An operation progresses only inside ``poll`` and
``synchronize``, so poll now and then if you overlap work with it.
"""

from __future__ import annotations

import contextlib
import functools
import copy
from collections import deque
import os
import pickle
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from squinchcomm import collectives
from squinchcomm.collectives import Communicator, ErrorFeedback, Handle
from squinchcomm.torch.compression import Compression, WireCompression, as_compression

__all__ = ["Average", "Sum", "Adasum", "Min", "Max", "Product", "TorchHandle",
           "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
           "cross_rank", "cross_size", "mpi_built", "gloo_built", "nccl_built",
           "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
           "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async",
           "grouped_allreduce_async_", "allgather", "allgather_async", "allgather_object",
           "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "broadcast_object",
           "reducescatter", "alltoall", "barrier", "join", "synchronize", "poll",
           "broadcast_parameters", "broadcast_optimizer_state", "communicator"]

# Horovod's reduction constants (horovod.common.basics values).
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
_OP_NAMES = {Average: "average", Sum: "sum"}
_FLOAT_KINDS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------
# Setup and topology
# ----------------------------------------------------------------------------
def _launched_by_torchrun() -> bool:
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return True
    under_mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    return "RANK" in env and "WORLD_SIZE" in env and not under_mpi


def init(transport=None, **options) -> Communicator:
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
    return collectives.init(transport, **options)


def shutdown():
    """Forget the default communicator (``hvd.shutdown()``)."""
    collectives.shutdown()


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


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
_VARIANTS: "weakref.WeakKeyDictionary[Communicator, dict]" = weakref.WeakKeyDictionary()


def variant(base: Communicator, comp: WireCompression, private: bool = False) -> Communicator:
    """Return a communicator sharing ``base``'s transport and groups but with
    ``comp``'s rounding and hierarchical options.

    A shallow copy, so no collective runs (safe to call on one rank only);
    shared variants keep ``base.error_feedback`` (one place to save residuals),
    a ``private`` one gets its own :class:`ErrorFeedback` and no per-call
    metadata check (the optimizer checks its bucket layout once instead).
    """
    rounding = comp.rounding or base.rounding
    hierarchical = base.hierarchical if comp.hierarchical is None else (
        bool(comp.hierarchical) and base.local.size > 1 and base.cross.size > 1)
    if not private and rounding == base.rounding and hierarchical == base.hierarchical:
        return base
    key = (rounding, hierarchical)
    cache = _VARIANTS.setdefault(base, {})
    if not private and key in cache:
        return cache[key]
    c = copy.copy(base)
    c.rounding, c.hierarchical = rounding, hierarchical
    if private:
        c.error_feedback, c.check_metadata = ErrorFeedback(), False
        c._calls = 0  # its own call counter: seeds stochastic rounding of unnamed calls
    else:
        cache[key] = c
    return c


def stream(t: torch.Tensor):
    """Return a context making CuPy launch on torch's current stream of ``t``'s
    device (a no-op for CPU tensors), so library kernels order after the
    kernels that produced ``t``."""
    if not t.is_cuda:
        return contextlib.nullcontext()
    import cupy

    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(t.device.index))
    s = torch.cuda.current_stream(t.device)
    stack.enter_context(cupy.cuda.ExternalStream(s.cuda_stream, t.device.index))
    return stack


def _bytes(t: torch.Tensor):
    """A flat uint8 NumPy/CuPy view of contiguous ``t`` (zero-copy), for the
    transport's raw-byte operations."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, np.uint8) if not t.is_cuda else _cupy().empty(0, _cupy().uint8)
    flat = flat.view(torch.uint8)
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()  # the engine must see finished data
        return _cupy().from_dlpack(flat)
    return flat.numpy()


def _cupy():
    import cupy

    return cupy


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
        raise ValueError(f"op={op!r} is not supported: use hvd.Average or hvd.Sum")
    return _OP_NAMES[op]


def _check_process_set(process_set):
    if process_set is not None:
        raise ValueError("process sets are not supported: build a Communicator over a "
                         "sub-communicator (mpi4py Split / torch new_group) and init() with it")


class _Op:
    """One library operation waiting in (or at the head of) a :class:`_Queue`."""

    def __init__(self, start: Callable[[], Handle], like: torch.Tensor | None):
        self.start, self.like = start, like
        self.handle: Handle | None = None
        self.done = False


class _Queue:
    """Runs the operations of one transport one at a time, in submission order.

    Why: a compressed allreduce issues its second collective (the all-gather)
    only when ``test()``/``wait()`` sees the first one finish. With several
    handles in flight, ranks that poll at different moments would issue the
    collectives of different handles in different orders, which MPI and gloo
    match wrongly (MPI_ERR_TRUNCATE, garbage). Keeping one operation active
    makes the order of collectives the submission order on every rank;
    communication still overlaps the caller's computation.
    """

    def __init__(self):
        self.ops: deque[_Op] = deque()

    def submit(self, op: _Op) -> _Op:
        self.ops.append(op)
        self.progress()
        return op

    def _step(self, block: bool) -> bool:
        op = self.ops[0]
        try:
            with stream(op.like) if op.like is not None else contextlib.nullcontext():
                if op.handle is None:
                    op.handle = op.start()
                if block:
                    op.handle.wait()
                elif not op.handle.test():
                    return False
        except BaseException:
            self.ops.popleft()  # a failed operation must not block the ones after it
            raise
        op.done = True
        self.ops.popleft()
        return True

    def progress(self):
        """Advance without blocking, starting queued operations as earlier ones finish."""
        while self.ops and self._step(block=False):
            pass

    def wait(self, op: _Op):
        """Block until ``op`` (and everything submitted before it) is done."""
        while not op.done:
            self._step(block=True)

    def drain(self):
        """Finish everything queued (before a blocking collective is issued)."""
        while self.ops:
            self._step(block=True)


_QUEUES: "weakref.WeakKeyDictionary[Any, _Queue]" = weakref.WeakKeyDictionary()


def queue(comm: Communicator) -> _Queue:
    """The operation queue of ``comm``'s transport (shared by its variants)."""
    q = _QUEUES.get(comm.transport)
    if q is None:
        q = _QUEUES[comm.transport] = _Queue()
    return q


class TorchHandle:
    """An operation in flight: pass it to :func:`synchronize` or :func:`poll`.

    Holds its queued operations (and with them every buffer) until
    completion, then runs ``finish`` once to produce the result.
    """

    def __init__(self, q: _Queue | None, ops: list[_Op], finish: Callable[[], Any]):
        self._queue, self._ops, self._finish = q, ops, finish
        self._done, self._result = False, None

    def test(self) -> bool:
        """Advance without blocking; return True when the result is ready."""
        if self._done:
            return True
        if self._queue is not None:
            self._queue.progress()
        return all(op.done for op in self._ops)

    def wait(self):
        """Block until done; return the result."""
        if not self._done:
            for op in self._ops:
                self._queue.wait(op)
            self._result, self._done = self._finish(), True
            self._ops = []
        return self._result


def _submit(comm: Communicator, starts: list[tuple[Callable[[], Handle], Any]],
            finish: Callable[[], Any]) -> TorchHandle:
    q = queue(comm)
    ops = [q.submit(_Op(start, like)) for start, like in starts]
    return TorchHandle(q, ops, finish)


def _work_handle(work, comm: Communicator) -> Handle:
    """Wrap one transport Work into a library Handle."""

    def gen():
        yield work

    return comm.submit(gen())


def _blocking(comm: Communicator) -> Communicator:
    """Finish queued operations before a blocking collective; return ``comm``."""
    queue(comm).drain()
    return comm


def poll(handle: TorchHandle) -> bool:
    """Advance ``handle``; return True when :func:`synchronize` will not block."""
    return handle.test()


def synchronize(handle: TorchHandle):
    """Wait for ``handle`` and return its result (the output tensor)."""
    return handle.wait()


# ----------------------------------------------------------------------------
# Allreduce
# ----------------------------------------------------------------------------
def _allreduce_into(comm: Communicator, src: torch.Tensor, out: torch.Tensor, op: str,
                    comp: WireCompression, name, prescale: float, postscale: float) -> Handle:
    """Start reducing ``src`` into ``out`` (same shape and dtype, contiguous)."""
    if src.dtype in _FLOAT_KINDS:
        c = variant(comm, comp)
        with stream(src):
            return c.allreduce_async(src.detach(), out=out.detach(), op=op,
                                     compression=comp.name, name=name,
                                     error_feedback=comp.error_feedback,
                                     prescale=prescale, postscale=postscale)
    if src.is_complex() or src.dtype == torch.bool:
        raise ValueError(f"allreduce of {src.dtype} tensors is not supported: cast to float32")
    # float64 / integers: an exact float64 sum on the host (Horovod accepts them).
    buf = src.detach().to("cpu", torch.float64).reshape(-1) * prescale
    buf = buf.contiguous()
    arr = buf.numpy()
    work = comm.transport.allreduce(arr)
    scale = postscale / (comm.size if op == "average" else 1)

    def gen():
        yield work
        res = torch.from_numpy(arr) * scale
        if not src.dtype.is_floating_point:
            res = res.round() if op == "sum" else res.trunc()
        out.detach().reshape(-1).copy_(res.to(out.device, out.dtype))
        return out

    return comm.submit(gen())


def _start_allreduce(tensor, out, average, name, op, prescale_factor, postscale_factor,
                     compression, process_set) -> TorchHandle:
    _check_process_set(process_set)
    comm = communicator()
    op_name = _op(average, op)
    comp = as_compression(compression)
    src = tensor if tensor.is_contiguous() else tensor.contiguous()
    dst = out if out.is_contiguous() else torch.empty_like(src)
    prescale, postscale = float(prescale_factor), float(postscale_factor)

    def finish():
        if dst is not out:
            out.copy_(dst)
        return out

    return _submit(comm, [(lambda: _allreduce_into(comm, src, dst, op_name, comp, name, prescale,
                                                    postscale), src)], finish)


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                    postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Start an allreduce into a new tensor; return a handle for :func:`synchronize`.

    Args: as :func:`allreduce`.
    """
    with torch.no_grad():
        out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        return _start_allreduce(tensor, out, average, name, op, prescale_factor,
                                postscale_factor, compression, process_set)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                     postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Start an in-place allreduce of ``tensor``; return a handle for :func:`synchronize`."""
    with torch.no_grad():
        return _start_allreduce(tensor, tensor, average, name, op, prescale_factor,
                                postscale_factor, compression, process_set)


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None,
              prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Average (or sum) ``tensor`` over all ranks; return a new tensor.

    Args:
        tensor: any shape; float32/float16/bfloat16 use ``compression``,
            float64 and integer tensors are summed exactly (uncompressed).
        average: deprecated Horovod flag; use ``op``.
        name: the tensor's name (needed for error feedback; shown in errors).
        compression: ``hvd.Compression.none | fp16 | bf16 | squinch`` or
            ``Compression.squinch_with(...)``.
        op: ``hvd.Average`` (default) or ``hvd.Sum``; Adasum raises ValueError.
        prescale_factor / postscale_factor: multiply before / after the reduction.

    Returns:
        The reduced tensor, bit-identical on every rank (same dtype and shape).

    Example:
        >>> avg_loss = hvd.allreduce(torch.tensor(loss), name="loss")   # doctest: +SKIP
    """
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
    _check_process_set(process_set)
    comm = communicator()
    op_name = _op(average, op)
    comp = as_compression(compression)
    tensors = list(tensors)
    if not tensors:
        return TorchHandle(None, [], lambda: [])
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((str(t.device), t.dtype), []).append(i)
    starts, fused = [], []
    for (_, dtype), idx in groups.items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])  # one buffer per dtype
        gname = None if name is None else f"{name}.{str(dtype).replace('torch.', '')}"
        starts.append((functools.partial(_allreduce_into, comm, flat, flat, op_name, comp, gname,
                                         float(prescale_factor), float(postscale_factor)), flat))
        fused.append((idx, flat))

    def finish():
        for idx, flat in fused:
            pos = 0
            for i in idx:
                n = outs[i].numel()
                outs[i].copy_(flat[pos:pos + n].view_as(outs[i]))
                pos += n
        return list(outs)

    return _submit(comm, starts, finish)


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                            postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Start a fused allreduce of a list of tensors into new tensors."""
    with torch.no_grad():
        tensors = list(tensors)
        outs = [torch.empty_like(t) for t in tensors]
        return _start_grouped(tensors, outs, average, name, op, prescale_factor,
                              postscale_factor, compression, process_set)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                             postscale_factor=1.0, process_set=None, compression=Compression.none):
    """Start a fused in-place allreduce of a list of tensors."""
    with torch.no_grad():
        tensors = list(tensors)
        return _start_grouped(tensors, tensors, average, name, op, prescale_factor,
                              postscale_factor, compression, process_set)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Allreduce a list of tensors as one fused collective per dtype.

    Args: as :func:`allreduce`, with a list of tensors; ``name`` (if given)
        names each dtype's fused buffer ``f"{name}.{dtype}"``.

    Returns:
        A list of reduced tensors, in the input order.
    """
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
def _metas(comm: Communicator, what: str, meta: dict, same: tuple[str, ...]) -> list[dict]:
    """Gather every rank's ``meta``; raise the same ValueError everywhere if
    the keys in ``same`` differ between ranks."""
    metas = _blocking(comm).transport.allgather_object(meta, comm.timeout)
    collectives.check_agreement(what, metas, same, "; pass tensors of the same dtype (and the "
                                "same shape where the operation needs it) on every rank")
    return metas


def allgather_async(tensor, name=None, process_set=None) -> TorchHandle:
    """Start :func:`allgather`; return a handle."""
    _check_process_set(process_set)
    comm = communicator()
    src = tensor.detach().contiguous()
    rows = src.shape[0] if src.dim() else 1
    tail = tuple(src.shape[1:]) if src.dim() else ()
    metas = _metas(comm, "allgather", {"rows": rows, "tail": tail, "dtype": str(src.dtype),
                                       "name": name}, ("tail", "dtype", "name"))
    all_rows = [m["rows"] for m in metas]
    out = torch.empty((sum(all_rows),) + tail, dtype=src.dtype, device=src.device)
    per_row = src.element_size() * int(np.prod(tail, dtype=np.int64))
    counts = [r * per_row for r in all_rows]
    return _submit(comm, [(lambda: _work_handle(
        comm.transport.allgatherv(_bytes(src), _bytes(out), counts), comm), src)], lambda: out)


def allgather(tensor, name=None, process_set=None):
    """Concatenate every rank's ``tensor`` along the first dimension (sizes may
    differ there only); exact, any dtype.

    Example:
        >>> hvd.allgather(torch.tensor([hvd.rank()]))   # tensor([0, 1, ..., size-1])  # doctest: +SKIP
    """
    return allgather_async(tensor, name, process_set).wait()


def allgather_object(obj, name=None, process_set=None) -> list:
    """Return the list of every rank's picklable ``obj``, in rank order."""
    _check_process_set(process_set)
    comm = communicator()
    return _blocking(comm).transport.allgather_object(obj, comm.timeout)


def _start_broadcast(tensor, root_rank, name, process_set) -> TorchHandle:
    _check_process_set(process_set)
    comm = communicator()
    if not isinstance(root_rank, int) or not 0 <= root_rank < comm.size:
        raise ValueError(f"root_rank={root_rank!r} is not a rank of this {comm.size}-rank job")
    if comm.check_metadata:
        _metas(comm, "broadcast", {"shape": tuple(tensor.shape), "dtype": str(tensor.dtype),
                                   "root": root_rank, "name": name}, ("shape", "dtype", "root"))
    buf = tensor.detach() if tensor.is_contiguous() else tensor.detach().contiguous()

    def finish():
        if buf.data_ptr() != tensor.data_ptr():  # a non-contiguous input went through a copy
            with torch.no_grad():
                tensor.copy_(buf)
        return tensor

    return _submit(comm, [(lambda: _work_handle(comm.transport.broadcast(_bytes(buf), root_rank),
                                                 comm), buf)], finish)


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
    """Return a new tensor holding ``root_rank``'s ``tensor`` (exact, any dtype)."""
    return broadcast_async(tensor, root_rank, name, process_set).wait()


def broadcast_object(obj, root_rank=0, name=None, process_set=None):
    """Return ``root_rank``'s picklable ``obj`` on every rank.

    Pickles on the root, broadcasts the length (an int64 tensor), then the
    bytes (a uint8 tensor); the root gets its own object back.

    Example:
        >>> epoch = hvd.broadcast_object(epoch, root_rank=0)   # doctest: +SKIP
    """
    root = rank() == root_rank
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


def alltoall_async(tensor, splits=None, name=None, process_set=None,
                   compression=Compression.none) -> TorchHandle:
    """Start :func:`alltoall`; the handle's result is ``(output, received_splits)``."""
    _check_process_set(process_set)
    comm = communicator()
    comp = as_compression(compression)
    src = tensor.detach().contiguous()
    if src.dim() == 0:
        raise ValueError("alltoall needs a tensor with at least one dimension")
    rows, tail = src.shape[0], tuple(src.shape[1:])
    if splits is None:
        if rows % comm.size:
            raise ValueError(f"{rows} rows do not split evenly over {comm.size} ranks: pass splits=")
        splits = [rows // comm.size] * comm.size
    splits = [int(s) for s in (splits.tolist() if torch.is_tensor(splits) else splits)]
    if len(splits) != comm.size or min(splits) < 0 or sum(splits) != rows:
        raise ValueError(f"splits={splits} must have {comm.size} non-negative entries summing "
                         f"to the first dimension ({rows})")
    metas = _metas(comm, "alltoall", {"splits": splits, "tail": tail, "dtype": str(src.dtype),
                                      "comp": comp.name}, ("tail", "dtype", "comp"))
    recv_rows = [m["splits"][comm.rank] for m in metas]
    per_row = int(np.prod(tail, dtype=np.int64))
    received = torch.tensor(recv_rows, dtype=torch.int32)
    if comp.name == "none" or src.dtype not in _FLOAT_KINDS:
        out = torch.empty((sum(recv_rows),) + tail, dtype=src.dtype, device=src.device)
        nb = per_row * src.element_size()
        sc, rc = [s * nb for s in splits], [s * nb for s in recv_rows]
        return _submit(comm, [(lambda: _work_handle(
            comm.transport.alltoallv(_bytes(src), sc, _bytes(out), rc), comm), src)],
            lambda: (out, received))
    c = variant(comm, comp)
    with stream(src):
        flat, _ = c.alltoall(src, [s * per_row for s in splits], compression=comp.name)
    out = flat.reshape((sum(recv_rows),) + tail)
    return TorchHandle(None, [], lambda: (out, received))


def alltoall(tensor, splits=None, name=None, process_set=None, compression=Compression.none):
    """Send ``splits[r]`` rows (first dimension) of ``tensor`` to rank r.

    Args:
        tensor: at least 1-D; any dtype (compression applies to float kinds).
        splits: rows per destination rank (list or tensor); None: equal.
        compression: wire compression of each split (default exact).

    Returns:
        The received rows concatenated in rank order; with ``splits`` given,
        ``(output, received_splits)`` like Horovod.
    """
    out, received = alltoall_async(tensor, splits, name, process_set, compression).wait()
    return out if splits is None else (out, received)


def reducescatter(tensor, name=None, compression=Compression.none, op=None, process_set=None,
                  prescale_factor=1.0, postscale_factor=1.0):
    """Reduce ``tensor`` over ranks and return this rank's rows of the result.

    Rows (first dimension) are split like Horovod: the first ``rows % size``
    ranks get one extra row. With compression each split is quantized once
    on the wire; the sum is in fp32 (float64 for float64 and integer inputs).

    Returns:
        This rank's slice of the reduced tensor, in ``tensor``'s dtype.
    """
    comm = communicator()
    op_name = _op(None, op)
    if tensor.dim() == 0:
        raise ValueError("reducescatter needs a tensor with at least one dimension")
    splits = _row_splits(tensor.shape[0], comm.size)
    src = tensor.detach()
    if prescale_factor != 1.0:
        src = (src.double() if not src.is_floating_point() else src) * prescale_factor
        src = src.to(tensor.dtype)
    out, _ = alltoall(src, splits, name, process_set, compression)
    acc = torch.float32 if tensor.dtype in _FLOAT_KINDS else torch.float64
    parts = out.to(acc).reshape((comm.size, splits[comm.rank]) + tuple(tensor.shape[1:]))
    total = parts[0].clone()
    for r in range(1, comm.size):  # rank order: the same rounding as any other rank would do
        total += parts[r]
    scale = postscale_factor / (comm.size if op_name == "average" else 1)
    total *= scale
    if not tensor.dtype.is_floating_point:
        total = total.round() if op_name == "sum" else total.trunc()
    return total.to(tensor.dtype)


def barrier(process_set=None):
    """Wait until every rank reaches the barrier."""
    _check_process_set(process_set)
    _blocking(communicator()).barrier()


def join(device=-1):
    """Not supported: raises NotImplementedError.

    Horovod's ``join`` lets ranks that ran out of data keep answering the
    others' allreduces with zeros; that needs a coordinator negotiating
    tensors by name, which squinchcomm does not have (collectives are matched
    by call order). Give every rank the same number of batches instead
    (e.g. ``DistributedSampler(drop_last=True)``).
    """
    raise NotImplementedError("hvd.join() is not supported by squinchcomm: give every rank the "
                              "same number of batches (DistributedSampler with drop_last=True)")


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
    comm = _blocking(communicator())
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
    if comm.check_metadata:
        _metas(comm, "broadcast_parameters",
               {"tensors": [(n, tuple(t.shape), str(t.dtype)) for n, t in items]}, ("tensors",))
    # Start every broadcast, then wait: the engine pipelines them.
    pending = []
    with torch.no_grad():
        for _, t in items:
            buf = t.detach() if t.is_contiguous() else t.detach().contiguous()
            with stream(buf):
                pending.append((comm.transport.broadcast(_bytes(buf), root_rank), buf, t))
        for work, buf, t in pending:
            work.wait(comm.timeout)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)


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
    _blocking(communicator())
    pending = []
    for t in tensors:
        buf = t.detach() if t.is_contiguous() else t.detach().contiguous()
        with stream(buf):
            pending.append(communicator().transport.broadcast(_bytes(buf), root_rank))
    for work in pending:
        work.wait(communicator().timeout)
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
