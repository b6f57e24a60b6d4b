"""A transport over NCCL through CuPy (``cupy.cuda.nccl``), for CuPy arrays.

:class:`NcclTransport` runs every operation on CuPy's current stream, so it
is ordered after the kernels already queued there and before those queued
after it, with no extra synchronization. Its Work is a CUDA event recorded
after the operation; ``wait(timeout)`` polls it (and NCCL's asynchronous
error state) and, past the deadline, aborts the communicator and raises
:class:`~squinchcomm.errors.TransportError`.

NCCL needs a side channel to start (the unique id is made on rank 0 and
shared) and for the small metadata exchanges of ``allgather_object`` and
``split``: pass a squinchcomm :class:`~squinchcomm.transport.base.Transport`
(MPI or torch.distributed), an mpi4py communicator or a torch.distributed
process group. CuPy is imported on first use, never at import time.

Limits: one GPU per process (NCCL cannot run two ranks on one GPU); creating
the communicator blocks until every rank joins (no timeout); after a
timeout the communicator is aborted and the transport unusable.

Example::

    from mpi4py import MPI
    from squinchcomm.transport.nccl import NcclTransport

    cupy.cuda.Device(local_rank).use()
    tr = NcclTransport(MPI.COMM_WORLD, timeout=60)
    buf = cupy.ones(1 << 20, cupy.float32)
    tr.allreduce(buf).wait()
"""

from __future__ import annotations

from typing import Any, Sequence

from squinchcomm import config
from squinchcomm.errors import MissingDependencyError, TransportError, require
from squinchcomm.transport.base import (DoneWork, PollingWork, Transport, Work, check_counts,
                                         check_fits, check_op)

__all__ = ["NcclTransport"]


def _cupy():
    return require("cupy", "cuda13", "NcclTransport")


def _nccl():
    _cupy()
    from cupy.cuda import nccl

    if not nccl.available:
        raise MissingDependencyError("NcclTransport needs the NCCL library, which CuPy could not load: "
                                     "pip install nvidia-nccl-cu13 (or nvidia-nccl-cu12 with CUDA 12)")
    return nccl


# --------------------------------------------------------------------------
# The unique id: CuPy >= 14 uses bytes, CuPy 13 a tuple of 128 signed chars
# --------------------------------------------------------------------------

def _uid_to_bytes(uid) -> bytes:
    """Return ``nccl.get_unique_id()``'s value as 128 bytes, whatever CuPy's version."""
    if isinstance(uid, (bytes, bytearray, memoryview)):
        return bytes(uid)
    if hasattr(uid, "tobytes"):  # a NumPy array
        return uid.tobytes()
    return bytes(int(v) & 0xFF for v in uid)  # CuPy < 14: a tuple of C chars, signed


def _uid_for_cupy(data: bytes, cupy_version: str):
    """Return the unique id in the type this CuPy's NcclCommunicator takes."""
    if int(cupy_version.split(".")[0]) >= 14:
        return bytes(data)
    return tuple(b - 256 if b > 127 else b for b in data)


# --------------------------------------------------------------------------
# Side channels
# --------------------------------------------------------------------------

class _MpiSide:
    """What NcclTransport needs of a side channel, over an mpi4py communicator.

    mpi4py's object collectives block without a timeout: the ``timeout``
    arguments are accepted and ignored.
    """

    def __init__(self, comm):
        self._comm = comm

    @property
    def rank(self) -> int:
        return self._comm.Get_rank()

    @property
    def size(self) -> int:
        return self._comm.Get_size()

    def allgather_object(self, obj: Any, timeout: float | None = None) -> list:
        return self._comm.allgather(obj)

    def split(self, color: int, key: int) -> "_MpiSide":
        return _MpiSide(self._comm.Split(color, key))

    def node_split(self) -> "_MpiSide":
        from mpi4py import MPI

        return _MpiSide(self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank))


def _side_channel(side):
    """Wrap ``side`` (a Transport, an mpi4py communicator or a torch process group)."""
    if isinstance(side, (Transport, _MpiSide)):
        return side
    if hasattr(side, "Get_rank") and hasattr(side, "allgather") and hasattr(side, "Split"):
        return _MpiSide(side)
    if type(side).__module__.split(".", 1)[0] == "torch":
        from squinchcomm.transport.torch_dist import TorchTransport

        return TorchTransport(side)
    raise ValueError(f"side={side!r} cannot carry NCCL's unique id: pass a squinchcomm Transport, "
                     "an mpi4py communicator (MPI.COMM_WORLD) or a torch.distributed process group")


# --------------------------------------------------------------------------
# Work
# --------------------------------------------------------------------------

class _NcclWork(PollingWork):
    """A CUDA event recorded after the operation, polled with a deadline.

    On timeout, or when NCCL reports an asynchronous error, the communicator
    is aborted (a stuck NCCL kernel never returns otherwise) and
    TransportError is raised.
    """

    def __init__(self, transport: "NcclTransport", event, what: str, keep: Sequence[Any]):
        self._transport, self._event, self._error = transport, event, None
        super().__init__(self._poll, what, keep)

    def _poll(self) -> bool:
        if self._event.done:
            return True
        try:
            self._transport._comm.check_async_error()
        except Exception as exc:  # NcclError: a peer failed, the network broke
            self._error = exc
            return True
        return False

    def wait(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self._transport.timeout
        try:
            super().wait(timeout)
        except TransportError:
            self._transport._abort()
            raise
        if self._error is not None:
            self._transport._abort()
            raise TransportError(f"NCCL {self._what} failed: {self._error}; the communicator was "
                                 "aborted (build a new NcclTransport)") from self._error


# --------------------------------------------------------------------------
# The transport
# --------------------------------------------------------------------------

class NcclTransport(Transport):
    """Move CuPy arrays between GPUs with NCCL, on CuPy's current stream.

    Collective over the side channel's ranks: every rank constructs its
    transport at the same time (rank r of the side channel is NCCL rank r).

    Args:
        side: the side channel: a squinchcomm Transport (MPI, torch), an
            mpi4py communicator, or a torch.distributed process group.
        device: the GPU id; None is CuPy's current device.
        timeout: default seconds for ``Work.wait()`` and ``allgather_object``;
            None reads ``SQUINCHCOMM_TIMEOUT`` (default 300).

    Raises:
        ValueError: no usable GPU, or ``side`` is not a side channel.
        MissingDependencyError: CuPy or NCCL is not installed.
    """

    name = "nccl"
    gpu_native = True

    def __init__(self, side, device: int | None = None, timeout: float | None = None):
        cupy, nccl = _cupy(), _nccl()
        if not cupy.is_available():
            raise ValueError("NcclTransport needs a CUDA GPU and cupy.is_available() is False: "
                             "use TorchTransport (gloo) or MPI for host arrays")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout={timeout!r}: pass a positive number of seconds or None")
        self._side = _side_channel(side)
        self._device = cupy.cuda.Device(cupy.cuda.Device().id if device is None else int(device))
        #: Default seconds for wait() and allgather_object() (as MPITransport).
        self.timeout = config.timeout() if timeout is None else float(timeout)
        self._rank, self._size = self._side.rank, self._side.size
        self._aborted = False
        # Step 1: rank 0 makes the unique id; every rank gets it through the side channel.
        uid = _uid_to_bytes(nccl.get_unique_id()) if self._rank == 0 else None
        uid = self._side.allgather_object(uid, timeout=self.timeout)[0]
        # Step 2: join the communicator (blocks until every rank has).
        with self._device:
            try:
                self._comm = nccl.NcclCommunicator(self._size, _uid_for_cupy(uid, cupy.__version__),
                                                   self._rank)
            except Exception as exc:  # NcclError
                raise TransportError(f"NCCL communicator creation failed on rank {self._rank}: {exc}") from exc
            self._one = cupy.zeros(1, dtype=cupy.float32)  # the barrier's buffer

    # -- properties -----------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> int:
        """The GPU id this communicator runs on."""
        return self._device.id

    def __repr__(self):
        return f"NcclTransport(rank={self._rank}, size={self._size}, device={self._device.id})"

    def close(self) -> None:
        """Destroy the NCCL communicator (collective); the transport is unusable afterwards."""
        if not self._aborted:
            self._aborted = True
            self._comm.destroy()

    # -- helpers --------------------------------------------------------------

    def _abort(self) -> None:
        if not self._aborted:
            self._aborted = True
            self._comm.abort()

    def _check(self, arr, what: str):
        """Validate a CuPy array on this transport's GPU; return it flat."""
        cupy = _cupy()
        if not isinstance(arr, cupy.ndarray):
            raise ValueError(f"{what} is a {type(arr).__name__}: NcclTransport moves CuPy arrays; "
                             "pass cupy.asarray(x), or use TorchTransport/MPI for host arrays")
        if not arr.flags.c_contiguous:
            raise ValueError(f"{what} is not contiguous: pass cupy.ascontiguousarray(x)")
        if arr.device.id != self._device.id:
            raise ValueError(f"{what} is on GPU {arr.device.id} but this communicator is on GPU "
                             f"{self._device.id}: copy it there (with cupy.cuda.Device({self._device.id}))")
        return arr.reshape(-1)

    def _issue(self, what: str, keep: Sequence[Any], launch) -> Work:
        """Call ``launch(stream_ptr)`` on CuPy's current stream; return its event Work."""
        if self._aborted:
            raise TransportError("this NCCL communicator was closed or aborted after an earlier "
                                 "failure: build a new NcclTransport")
        cupy, nccl = _cupy(), _nccl()
        with self._device:
            stream = cupy.cuda.get_current_stream()
            try:
                launch(stream.ptr)
            except nccl.NcclError as exc:
                self._abort()
                raise TransportError(f"NCCL {what} failed: {exc}") from exc
            event = cupy.cuda.Event(disable_timing=True)
            event.record(stream)
        return _NcclWork(self, event, what, keep)

    def _copy(self, dst_ptr: int, src_ptr: int, nbytes: int, stream: int) -> None:
        """Device-to-device copy on ``stream`` (a rank's own part: no NCCL send to self)."""
        if nbytes:
            runtime = _cupy().cuda.runtime
            runtime.memcpyAsync(dst_ptr, src_ptr, nbytes, runtime.memcpyDeviceToDevice, stream)

    @staticmethod
    def _offsets(counts: Sequence[int]) -> list[int]:
        out, total = [], 0
        for c in counts:
            out.append(total)
            total += c
        return out

    # -- operations -----------------------------------------------------------

    def alltoallv(self, send, send_counts: Sequence[int], recv, recv_counts: Sequence[int]) -> Work:
        """Exchange variable-size parts with every rank: one grouped send/recv per peer.

        Returns:
            A Work; ``recv`` is valid after ``wait()`` (and, in stream order, at once).
        """
        send, recv = self._check(send, "send"), self._check(recv, "recv")
        if send.dtype != recv.dtype:
            raise ValueError(f"send is {send.dtype} but recv is {recv.dtype}: pass arrays of one dtype")
        send_counts = check_counts(send_counts, self._size, "send_counts")
        recv_counts = check_counts(recv_counts, self._size, "recv_counts")
        check_fits(sum(send_counts), send, "send_counts", "send")
        check_fits(sum(recv_counts), recv, "recv_counts", "recv")
        nccl, item, me = _nccl(), send.dtype.itemsize, self._rank
        sdispl, rdispl = self._offsets(send_counts), self._offsets(recv_counts)
        sptr, rptr = send.data.ptr, recv.data.ptr

        def launch(stream):
            self._copy(rptr + rdispl[me] * item, sptr + sdispl[me] * item, send_counts[me] * item, stream)
            nccl.groupStart()
            try:
                for peer in range(self._size):
                    if peer == me:
                        continue
                    if send_counts[peer]:
                        self._comm.send(sptr + sdispl[peer] * item, send_counts[peer] * item,
                                        nccl.NCCL_UINT8, peer, stream)
                    if recv_counts[peer]:
                        self._comm.recv(rptr + rdispl[peer] * item, recv_counts[peer] * item,
                                        nccl.NCCL_UINT8, peer, stream)
            finally:
                nccl.groupEnd()

        return self._issue("alltoallv", (send, recv), launch)

    def allgatherv(self, send, recv, counts: Sequence[int]) -> Work:
        """Gather every rank's ``send`` into ``recv`` in rank order.

        Equal counts use ncclAllGather; unequal counts a grouped send/recv
        with every peer (no padding).

        Returns:
            A Work; ``recv`` is valid after ``wait()``.
        """
        send, recv = self._check(send, "send"), self._check(recv, "recv")
        if send.dtype != recv.dtype:
            raise ValueError(f"send is {send.dtype} but recv is {recv.dtype}: pass arrays of one dtype")
        counts = check_counts(counts, self._size, "counts")
        me, item = self._rank, send.dtype.itemsize
        check_fits(counts[me], send, f"counts[{me}]", "send")
        check_fits(sum(counts), recv, "counts", "recv")
        if max(counts) == 0:
            return DoneWork()  # the same counts on every rank: every rank skips
        nccl, displ = _nccl(), self._offsets(counts)
        sptr, rptr = send.data.ptr, recv.data.ptr

        def launch(stream):
            if min(counts) == max(counts):
                self._comm.allGather(sptr, rptr, counts[0] * item, nccl.NCCL_UINT8, stream)
                return
            self._copy(rptr + displ[me] * item, sptr, counts[me] * item, stream)
            nccl.groupStart()
            try:
                for peer in range(self._size):
                    if peer == me:
                        continue
                    if counts[me]:
                        self._comm.send(sptr, counts[me] * item, nccl.NCCL_UINT8, peer, stream)
                    if counts[peer]:
                        self._comm.recv(rptr + displ[peer] * item, counts[peer] * item,
                                        nccl.NCCL_UINT8, peer, stream)
            finally:
                nccl.groupEnd()

        return self._issue("allgatherv", (send, recv), launch)

    def allreduce(self, buf, op: str = "sum") -> Work:
        """Reduce the float32/float64/int32/int64 CuPy array ``buf`` over all
        ranks, in place (``op``: sum, min, max or product)."""
        check_op(op)
        buf = self._check(buf, "buf")
        nccl = _nccl()
        nccl_op = {"sum": nccl.NCCL_SUM, "min": nccl.NCCL_MIN, "max": nccl.NCCL_MAX,
                   "product": nccl.NCCL_PROD}[op]
        types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64,
                 "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64}
        if buf.dtype.name not in types:
            raise ValueError(f"allreduce sums float32, float64, int32 or int64 arrays, not {buf.dtype}: "
                             "cast first (x.astype(cupy.float32))")
        if buf.size == 0:
            return DoneWork()
        ptr, n, dtype = buf.data.ptr, buf.size, types[buf.dtype.name]
        return self._issue("allreduce", (buf,), lambda stream: self._comm.allReduce(
            ptr, ptr, n, dtype, nccl_op, stream))

    def broadcast(self, buf, root: int) -> Work:
        """Copy ``buf`` from rank ``root`` to every rank, in place."""
        buf = self._check(buf, "buf")
        if not 0 <= int(root) < self._size:
            raise ValueError(f"root={root} is not a rank of this group (0..{self._size - 1})")
        if buf.size == 0:
            return DoneWork()
        nccl, ptr, nbytes = _nccl(), buf.data.ptr, buf.nbytes
        return self._issue("broadcast", (buf,), lambda stream: self._comm.bcast(
            ptr, nbytes, nccl.NCCL_UINT8, int(root), stream))

    def barrier(self) -> Work:
        """Wait for every rank: an allreduce of one element (NCCL has no barrier)."""
        nccl, ptr = _nccl(), self._one.data.ptr
        return self._issue("barrier", (self._one,), lambda stream: self._comm.allReduce(
            ptr, ptr, 1, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream))

    def allgather_object(self, obj: Any, timeout: float | None = None) -> list:
        """Gather a small picklable object from every rank, through the side channel."""
        return self._side.allgather_object(obj, timeout=self.timeout if timeout is None else timeout)

    def split(self, color: int, key: int) -> "NcclTransport":
        """Return a transport over the ranks with the same ``color``, ordered by ``key``.

        Splits the side channel, then builds a new NCCL communicator over it
        (rather than ncclCommSplit, which needs NCCL 2.18 and no operation in
        flight on this communicator).
        """
        return NcclTransport(self._side.split(color, key), device=self._device.id,
                             timeout=self.timeout)

    def node_split(self) -> "NcclTransport":
        """Return a transport over the ranks on this node (the side channel's node split)."""
        return NcclTransport(self._side.node_split(), device=self._device.id, timeout=self.timeout)
