"""MPI transport through mpi4py.

Every operation is MPI's non-blocking collective (Ialltoallv, Iallgatherv,
Iallreduce, Ibcast, Ibarrier) polled with a deadline, so a rank that never
arrives gives a TransportError instead of a hang. Data moves as bytes
(MPI.BYTE) except for sums. GPU (CuPy) buffers go straight to a CUDA-aware
MPI when ``cuda_aware`` is set (``SQUINCHCOMM_MPI_CUDA_AWARE=1``); otherwise
they are staged through host memory after synchronizing CuPy's stream.
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

import numpy as np

from squinchcomm import config
from squinchcomm.errors import TransportError, require
from squinchcomm.transport.base import (PollingWork, Transport, Work, check_counts, check_fits,
                                         check_op)

__all__ = ["MPITransport"]


def _is_gpu(a) -> bool:
    return type(a).__module__.startswith("cupy")


def _displs(counts: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64) if len(counts) else \
        np.zeros(0, np.int64)


#: The most bytes (or elements) one MPI call carries: MPI's count is a C int,
#: and a larger one fails with MPI_ERR_ARG. Larger broadcasts and sums are
#: split into several calls of at most this many.
MAX_COUNT = 2**31 - 1

def _pieces(flat):
    """``flat`` in consecutive views of at most MAX_COUNT elements (one for
    small or empty arrays); the same split on every rank."""
    n = flat.shape[0]
    return [flat[i:i + MAX_COUNT] for i in range(0, n, MAX_COUNT)] or [flat]


_THREAD_LEVELS = ("single", "funneled", "serialized", "multiple")


def _check_thread_level(mpi) -> None:
    """The engine calls MPI from its progress thread while the application may
    call MPI from its own: that needs MPI_THREAD_MULTIPLE (mpi4py's default)."""
    provided = mpi.Query_thread()
    if provided < mpi.THREAD_MULTIPLE:
        level = _THREAD_LEVELS[provided] if 0 <= provided < 4 else str(provided)
        raise TransportError(
            f"MPI was initialised with thread level '{level}', but squinchcomm's engine calls MPI "
            "from a background progress thread and needs MPI_THREAD_MULTIPLE: leave "
            "mpi4py.rc.thread_level at its default 'multiple' (or call "
            "MPI.Init_thread(MPI.THREAD_MULTIPLE)), with an MPI built with thread support")


class MPITransport(Transport):
    """A transport over an mpi4py communicator.

    Args:
        comm: an mpi4py communicator (default: a duplicate of COMM_WORLD, so the
            library's traffic never matches the application's).
        cuda_aware: hand GPU buffers to MPI directly (only with a CUDA-aware MPI
            build); default from ``SQUINCHCOMM_MPI_CUDA_AWARE``.
        timeout: seconds any exchange (and the duplication of COMM_WORLD, and
            the splits) may wait for the other ranks (default
            ``SQUINCHCOMM_TIMEOUT``): a rank that never creates its transport
            gives the others a TransportError, not a hang.
    """

    name = "mpi"
    # Measured with Open MPI 5.0.11: an Ialltoallv whose peer sends 100 kB more
    # than the receive count reports MPI_ERR_TRUNCATE after writing all 100 kB
    # past the buffer (a heap corruption that crashes the process later).
    overruns_on_mismatch = True

    def __init__(self, comm=None, cuda_aware: bool | None = None, timeout: float | None = None):
        self._mpi = require("mpi4py.MPI", "mpi", "The MPI transport")
        _check_thread_level(self._mpi)
        self.timeout = config.timeout() if timeout is None else float(timeout)
        self.gpu_native = config.mpi_cuda_aware() if cuda_aware is None else bool(cuda_aware)
        if comm is None:  # MPI_Comm_idup: the blocking Dup() would wait forever for a lost rank
            comm, request = self._mpi.COMM_WORLD.Idup()
            self.comm = self._mpi.COMM_WORLD  # the new one is usable once the request is done
            self._work(request, "duplication of COMM_WORLD (every rank must create its "
                       "communicator, e.g. call hvd.init())", ()).wait(self.timeout)
        self.comm = comm
        # Errors come back as exceptions (wrapped in TransportError), never abort silently.
        self.comm.Set_errhandler(self._mpi.ERRORS_RETURN)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    # ------------------------------------------------------------ staging
    def _host(self, arr, copy_in: bool):
        """(host array for MPI, copy-back function or None)."""
        if not _is_gpu(arr) or self.gpu_native:
            if _is_gpu(arr):
                import cupy

                cupy.cuda.get_current_stream().synchronize()  # MPI must see finished data
            return arr, None
        import cupy

        cupy.cuda.get_current_stream().synchronize()
        host = cupy.asnumpy(arr) if copy_in else np.empty(arr.shape, arr.dtype)
        return host, (lambda: arr.set(host))

    def _work(self, request, what: str, keep, copy_back=None) -> Work:
        """A Work over one MPI request, or a list of them (a split message)."""
        label = f"MPI {what} on rank {self.rank}"
        requests = request if isinstance(request, list) else [request]

        def done():
            try:
                return self._mpi.Request.Testall(requests)
            except self._mpi.Exception as exc:  # MPI reports errors (ERRORS_RETURN)
                raise TransportError(f"{label} failed: {exc}") from exc

        return PollingWork(done, label, keep, copy_back)

    @staticmethod
    def _bytes(a) -> Any:
        return a.reshape(-1).view(np.uint8)

    # ------------------------------------------------------------ operations
    def alltoallv(self, send, send_counts, recv, recv_counts) -> Work:
        MPI = self._mpi
        send_counts = check_counts(send_counts, self.size, "send_counts")
        recv_counts = check_counts(recv_counts, self.size, "recv_counts")
        check_fits(sum(send_counts), send, "send_counts", "send")
        check_fits(sum(recv_counts), recv, "recv_counts", "recv")
        s, _ = self._host(send, True)
        r, back = self._host(recv, False)
        k_s, k_r = send.dtype.itemsize, recv.dtype.itemsize
        sc = np.asarray(send_counts, np.int64) * k_s
        rc = np.asarray(recv_counts, np.int64) * k_r
        req = self.comm.Ialltoallv([self._bytes(s), sc, _displs(sc), MPI.BYTE],
                                   [self._bytes(r), rc, _displs(rc), MPI.BYTE])
        return self._work(req, "alltoallv", (s, r, send, recv), back)

    def allgatherv(self, send, recv, counts) -> Work:
        MPI = self._mpi
        counts = check_counts(counts, self.size, "counts")
        mine = counts[self.rank]
        check_fits(mine, send, f"counts[{self.rank}]", "send")
        check_fits(sum(counts), recv, "counts", "recv")
        s, _ = self._host(send.reshape(-1)[:mine], True)  # exactly this rank's count
        r, back = self._host(recv, False)
        c = np.asarray(counts, np.int64) * recv.dtype.itemsize
        req = self.comm.Iallgatherv([self._bytes(s), MPI.BYTE], [self._bytes(r), c, _displs(c),
                                                                 MPI.BYTE])
        return self._work(req, "allgatherv", (s, r, send, recv), back)

    def allreduce(self, buf, op: str = "sum") -> Work:
        MPI = self._mpi
        mpi_op = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX, "product": MPI.PROD}[check_op(op)]
        types = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE,
                 np.dtype(np.int32): MPI.INT32_T, np.dtype(np.int64): MPI.INT64_T}
        if np.dtype(buf.dtype) not in types:
            raise ValueError(f"MPI allreduce reduces float32/float64/int32/int64, got {buf.dtype}; "
                             "upcast first")
        b, back = self._host(buf, True)
        flat, kind = b.reshape(-1), types[np.dtype(buf.dtype)]
        reqs = [self.comm.Iallreduce(MPI.IN_PLACE, [part, kind], op=mpi_op)
                for part in _pieces(flat)]
        return self._work(reqs, "allreduce", (b, buf), back)

    def broadcast(self, buf, root: int) -> Work:
        b, back = self._host(buf, self.rank == root)
        reqs = [self.comm.Ibcast([part, self._mpi.BYTE], root=root)
                for part in _pieces(self._bytes(b))]
        return self._work(reqs, "broadcast", (b, buf), back)

    def barrier(self) -> Work:
        return self._work(self.comm.Ibarrier(), "barrier", ())

    def allgather_object(self, obj, timeout=None) -> list:
        timeout = self.timeout if timeout is None else timeout
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        sizes = np.zeros(self.size, np.int64)
        self._work(self.comm.Iallgather([np.array([data.size], np.int64), self._mpi.INT64_T],
                                        [sizes, self._mpi.INT64_T]),
                   "allgather_object (sizes)", ()).wait(timeout)
        out = np.empty(int(sizes.sum()), np.uint8)
        self.allgatherv(data, out, sizes).wait(timeout)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [pickle.loads(out[bounds[r]:bounds[r + 1]].tobytes()) for r in range(self.size)]

    def allgather_digest(self, digest: bytes, timeout=None) -> list[bytes]:
        """One fixed-size Iallgather (the object path takes two)."""
        timeout = self.timeout if timeout is None else timeout
        mine = np.frombuffer(digest, np.uint8).copy()
        out = np.empty(mine.size * self.size, np.uint8)
        self._work(self.comm.Iallgather([mine, self._mpi.BYTE], [out, self._mpi.BYTE]),
                   "metadata digest", (mine, out)).wait(timeout)
        return [out[r * mine.size:(r + 1) * mine.size].tobytes() for r in range(self.size)]

    def engine_key(self):
        """One engine per MPI communicator handle."""
        return ("mpi", self.comm.py2f())

    def _all_arrived(self, what: str):
        """Wait, bounded by the timeout, until every rank has reached this point:
        MPI's splits have no non-blocking form, and once every rank has arrived
        the blocking call that follows cannot hang on an absent one."""
        self._work(self.comm.Ibarrier(), f"{what} (every rank must reach it)", ()).wait(
            self.timeout)

    def split(self, color: int, key: int) -> "MPITransport":
        self._all_arrived("split")
        return MPITransport(self.comm.Split(color, key), self.gpu_native, self.timeout)

    def node_split(self) -> "MPITransport":
        """Ranks sharing memory with this one (MPI_COMM_TYPE_SHARED)."""
        self._all_arrived("node split")
        return MPITransport(self.comm.Split_type(self._mpi.COMM_TYPE_SHARED, key=self.rank),
                            self.gpu_native, self.timeout)

    def abort(self, code: int = 1):
        """Abort the whole job (what to do after a TransportError under mpirun)."""
        self.comm.Abort(code)

    def __repr__(self):
        return f"MPITransport(rank={self.rank}, size={self.size})"

