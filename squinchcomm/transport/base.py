"""The transport interface: engines that move bytes, knowing nothing of codecs.

A transport wraps one engine's communicator (an mpi4py communicator, a
torch.distributed process group, a NCCL communicator). It moves flat,
contiguous NumPy or CuPy arrays and can sum float arrays (for the
uncompressed paths); every operation returns a :class:`Work` handle whose
``wait(timeout)`` raises :class:`~squinchcomm.errors.TransportError` instead
of hanging when a peer never arrives. The algorithms live in
:mod:`squinchcomm.collectives`, once, over this interface.
"""

from __future__ import annotations

import abc
import time
from typing import Any, Callable, Sequence

from squinchcomm.errors import TransportError

__all__ = ["Transport", "Work", "DoneWork", "PollingWork", "check_counts", "check_fits",
           "REDUCE_OPS", "check_op"]


class Work(abc.ABC):
    """A pending operation. Keeps its buffers alive until it completes."""

    @abc.abstractmethod
    def test(self) -> bool:
        """Return True once the operation has completed (never blocks)."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> None:
        """Block until done; raise TransportError after ``timeout`` seconds."""


class DoneWork(Work):
    """An operation that completed when it was issued."""

    def test(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> None:
        return None


#: Buffers of operations that failed or timed out while an engine may still
#: write into them; never freed (the group is broken after such a failure).
_ABANDONED: list = []


class PollingWork(Work):
    """Wait by polling ``done()`` with a deadline: how engines without a timed
    wait (MPI requests, CUDA events) get a timeout instead of a hang.

    Args:
        done: returns True when the operation has completed.
        what: a description for the error message.
        keep: objects (buffers) to keep alive until completion.
        on_done: called once after completion (e.g. copy a staged buffer back).
    """

    def __init__(self, done: Callable[[], bool], what: str, keep: Sequence[Any] = (),
                 on_done: Callable[[], None] | None = None):
        self._done, self._what, self._keep, self._on_done = done, what, keep, on_done
        self._finished = self._abandoned = False

    def test(self) -> bool:
        try:
            if not self._finished and self._done():
                self._finish()
        except TransportError:
            self._abandon()
            raise
        return self._finished

    def wait(self, timeout: float | None = None) -> None:
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        pause = 1e-5
        while not self.test():
            now = time.monotonic()
            # Spin first: engines without a progress thread (Open MPI) advance a
            # non-blocking collective only inside test(), so early sleeps stall it.
            if now - start < 2e-4:
                continue
            if deadline is not None and now > deadline:
                self._abandon()
                raise TransportError(
                    f"{self._what} did not complete within {timeout:g} s: a peer rank died, "
                    "is stuck, or called a different collective (set the timeout with "
                    "SQUINCHCOMM_TIMEOUT or timeout=)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)  # spin briefly, then back off

    def _finish(self):
        if self._on_done is not None:
            self._on_done()  # may raise: then the work is not finished, and says so again
        self._finished = True
        self._keep = ()

    def _abandon(self):
        """A failed or timed-out operation may still be writing: its engine
        can go on with the other parts of a failed collective, or complete a
        timed-out one later. Its buffers (and requests) are kept for the life
        of the process instead of being freed under it."""
        if not self._abandoned:
            self._abandoned = True
            _ABANDONED.append((self._keep, self._done))


#: The reductions every transport's allreduce performs.
REDUCE_OPS = ("sum", "min", "max", "product")


def check_op(op: str) -> str:
    if op not in REDUCE_OPS:
        raise ValueError(f"op={op!r}: a transport reduces with one of {', '.join(REDUCE_OPS)}")
    return op


def check_counts(counts: Sequence[int], size: int, what: str) -> list[int]:
    """``counts`` as ints, one non-negative count per rank, or ValueError."""
    counts = [int(c) for c in counts]
    if len(counts) != size:
        raise ValueError(f"{what} has {len(counts)} entries: pass one count per rank ({size})")
    if any(c < 0 for c in counts):
        raise ValueError(f"{what} has a negative count: {counts}")
    return counts


def check_fits(total: int, buf, what: str, name: str):
    """ValueError unless ``buf`` holds ``total`` elements: an engine is never
    handed a count larger than the buffer it reads or writes."""
    if total > buf.size:
        raise ValueError(f"{what} sum to {total} but {name} has {buf.size} elements")


class Transport(abc.ABC):
    """Moves flat contiguous NumPy/CuPy arrays between the ranks of one group.

    Counts are in elements of the arrays passed; displacements are the prefix
    sums of the counts (packed layouts only). After a TransportError (a peer
    timed out or died) the group is unusable: operations may still be pending
    on it; abort the job or build a new transport.
    """

    name: str = "transport"
    #: True when the engine reads and writes GPU memory itself (NCCL, CUDA-aware MPI).
    gpu_native: bool = False
    #: Default seconds to wait for peers (``SQUINCHCOMM_TIMEOUT``); set by each engine.
    timeout: float = 300.0
    #: True when a peer sending more than this rank expects can write past the
    #: receive buffer: the sizes are then agreed before every collective even
    #: with the metadata check off.
    overruns_on_mismatch: bool = False

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This process's rank in the group."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The number of ranks in the group."""

    @abc.abstractmethod
    def alltoallv(self, send, send_counts: Sequence[int], recv,
                  recv_counts: Sequence[int]) -> Work:
        """Send ``send[displ[r]:displ[r]+send_counts[r]]`` to rank r, receive
        rank r's part into ``recv`` at the prefix sum of ``recv_counts``."""

    @abc.abstractmethod
    def allgatherv(self, send, recv, counts: Sequence[int]) -> Work:
        """Gather every rank's ``send`` (``counts[r]`` elements) into ``recv`` in rank order."""

    @abc.abstractmethod
    def allreduce(self, buf, op: str = "sum") -> Work:
        """Reduce ``buf`` (float32, float64, int32 or int64) over all ranks, in
        place; ``op`` is one of :data:`REDUCE_OPS`."""

    @abc.abstractmethod
    def broadcast(self, buf, root: int) -> Work:
        """Copy ``buf`` from ``root`` to every rank, in place."""

    @abc.abstractmethod
    def barrier(self) -> Work:
        """Wait for every rank."""

    @abc.abstractmethod
    def allgather_object(self, obj: Any, timeout: float | None = None) -> list:
        """Gather a small picklable object from every rank (metadata checks)."""

    def allgather_digest(self, digest: bytes, timeout: float | None = None) -> list[bytes]:
        """Every rank's ``digest`` (the same length on every rank), in rank
        order: the metadata check's first, cheap exchange. Transports with a
        fixed-size allgather do it in one collective; this default uses
        :meth:`allgather_object`."""
        return self.allgather_object(digest, timeout)

    @abc.abstractmethod
    def split(self, color: int, key: int) -> "Transport":
        """A transport over the ranks that pass the same ``color``, ordered by ``key``."""

    def engine_key(self):
        """Identifies the group for the progress engine: transports with equal
        keys share one engine (one order of operations). Default: this object."""
        return self

    def close(self) -> None:
        """Release engine resources (NCCL communicators); a no-op by default."""

    def node_split(self) -> "Transport":
        """A transport over the ranks on this node (shared-memory split where the
        engine has one). Defaults to grouping by host name."""
        import socket

        hosts = self.allgather_object(socket.gethostname())
        color = sorted(set(hosts)).index(hosts[self.rank])
        return self.split(color, self.rank)
