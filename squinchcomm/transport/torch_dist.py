"""A transport over a torch.distributed process group (gloo on CPU, NCCL on GPU).

:class:`TorchTransport` moves NumPy arrays (host) or CuPy arrays (GPU) through
an already-initialized process group, converting them zero-copy to torch
tensors (``torch.from_numpy``, ``torch.from_dlpack``). Every operation is
issued with ``async_op=True`` and returns a :class:`~squinchcomm.transport.base.Work`
whose ``wait(timeout)`` calls torch's ``Work.wait(timeout=timedelta)`` and
raises :class:`~squinchcomm.errors.TransportError` when a peer never arrives.

:func:`init_process_group_from_env` starts torch.distributed from the
environment of ``torchrun`` or ``mpirun``.

Data moves as raw bytes: every array except an allreduce buffer is viewed as
``uint8`` (counts scaled by the item size), so any dtype travels, including
ones torch has no tensor type for (``ml_dtypes.bfloat16``, ``uint16`` bit
patterns), and the backend only ever sees ``uint8`` tensors.

CUDA streams (CuPy arrays): each operation is issued, and waited for, with
torch's current stream set to CuPy's current stream (``torch.cuda.ExternalStream``),
so the collective starts after the work already queued on CuPy's stream and
``wait()`` orders CuPy's stream after it: no extra device synchronization.

This module imports torch; the package never imports it eagerly.

Example::

    from squinchcomm.transport.torch_dist import TorchTransport, init_process_group_from_env

    init_process_group_from_env()          # under torchrun or mpirun
    tr = TorchTransport(timeout=60)
    buf = np.ones(1024, np.float32)
    tr.allreduce(buf).wait()               # buf == world size everywhere
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import math
import os
import pickle
import platform
import socket
import sys
import time
import warnings
import zlib
from typing import Any, Callable, Sequence

import numpy as np

from squinchcomm.errors import TransportError, require

torch = require("torch", "torch", "the torch.distributed transport")
import torch.distributed as dist  # noqa: E402

from squinchcomm import config  # noqa: E402
from squinchcomm.transport.base import (DoneWork, Transport, Work, check_counts, check_fits,
                                         check_op)

__all__ = ["TorchTransport", "init_process_group_from_env"]

#: MASTER_PORT used under mpirun when neither MASTER_PORT nor a job id is set
#: (torch's own conventional default).
DEFAULT_MASTER_PORT = 29500
#: Under Open MPI (PMIX_NAMESPACE set) the default port is
#: ``MPI_PORT_BASE + crc32(PMIX_NAMESPACE) % MPI_PORT_SPAN``: the same on every
#: rank of one job, usually different between concurrent jobs, and below
#: Linux's ephemeral port range (32768+), where the OS hands out client ports.
MPI_PORT_BASE = 20000
MPI_PORT_SPAN = 10000

_REDUCIBLE = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32),
              np.dtype(np.int64))


# --------------------------------------------------------------------------
# Starting torch.distributed from the environment
# --------------------------------------------------------------------------

def _env_int(env, name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _rank_size_from_env(env) -> tuple[int, int, str]:
    """Return (rank, world size, launcher) from torchrun's, Open MPI's or PMI's variables."""
    for rank_var, size_var, launcher in (("RANK", "WORLD_SIZE", "torchrun"),
                                         ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "mpirun"),
                                         ("PMI_RANK", "PMI_SIZE", "mpirun")):
        if rank_var in env or size_var in env:
            if rank_var not in env or size_var not in env:
                missing, present = (rank_var, size_var) if rank_var not in env else (size_var, rank_var)
                raise ValueError(f"{missing} is not set although {present} is: launch with torchrun "
                                 f"or mpirun, or export both {rank_var} and {size_var}")
            rank, size = _env_int(env, rank_var), _env_int(env, size_var)
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{rank_var}={rank} and {size_var}={size} do not satisfy 0 <= rank < size")
            return rank, size, launcher
    raise ValueError("RANK and WORLD_SIZE are not set (nor OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE "
                     "or PMI_RANK/PMI_SIZE): launch with torchrun or mpirun, or export RANK, "
                     "WORLD_SIZE, MASTER_ADDR and MASTER_PORT")


def _default_master_port(env) -> int:
    """The rendezvous port under mpirun when MASTER_PORT is not set (see MPI_PORT_BASE)."""
    job = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid")
    if not job:
        return DEFAULT_MASTER_PORT
    # crc32, not hash(): str hashes are salted per process, and every rank must agree.
    return MPI_PORT_BASE + zlib.crc32(job.encode()) % MPI_PORT_SPAN


def _local_rank(env, rank: int) -> int:
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if name in env:
            return _env_int(env, name)
    return rank


def _timedelta(timeout) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if timeout <= 0:
        raise ValueError(f"timeout={timeout!r}: pass a positive number of seconds or None")
    return datetime.timedelta(seconds=float(timeout))


def init_process_group_from_env(backend: str | None = None, timeout: float | datetime.timedelta | None = None):
    """Initialize torch.distributed from the launcher's environment.

    Under ``torchrun``: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT must all
    be set. Under ``mpirun``: the rank and size come from
    OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE (Open MPI) or PMI_RANK/PMI_SIZE
    (MPICH, Intel MPI); MASTER_ADDR defaults to 127.0.0.1 (one node: on
    several nodes export it, e.g. ``mpirun -x MASTER_ADDR=node0``) and
    MASTER_PORT defaults to ``20000 + crc32(PMIX_NAMESPACE) % 10000`` under
    Open MPI (one port per job) or 29500 otherwise. With NCCL, the process's
    GPU is set to its local rank (LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK or
    MPI_LOCALRANKID) modulo the visible GPUs. Does nothing if torch.distributed
    is already initialized.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ... ; None picks NCCL when CUDA and
            NCCL are available, gloo otherwise.
        timeout: seconds (or a timedelta) after which the backend itself
            fails a stuck collective; None keeps torch's default.

    Returns:
        The default process group.

    Raises:
        ValueError: a variable is missing or malformed (the message names it).
    """
    if dist.is_initialized():
        return dist.group.WORLD
    env = os.environ
    rank, size, launcher = _rank_size_from_env(env)
    if launcher == "torchrun":
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise ValueError(f"{name} is not set: launch with torchrun, or export MASTER_ADDR "
                                 "(rank 0's host) and MASTER_PORT (a free TCP port) with RANK and WORLD_SIZE")
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = _env_int(env, "MASTER_PORT") if env.get("MASTER_PORT") else _default_master_port(env)
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    if backend is None:
        use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
        backend = "nccl" if use_nccl else "gloo"
    if str(backend).lower() == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs a CUDA GPU: use backend='gloo' on CPU-only machines")
        torch.cuda.set_device(_local_rank(env, rank) % torch.cuda.device_count())
    host = f"[{addr}]" if ":" in addr else addr  # IPv6 literal
    kwargs = {} if timeout is None else {"timeout": _timedelta(timeout)}
    try:
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank,
                                world_size=size, **kwargs)
    except dist.DistError as exc:  # DistStoreError: the rendezvous timed out
        raise TransportError(
            f"torch.distributed rendezvous of rank {rank} of {size} at {host}:{port} failed: "
            f"{exc}. Every rank must start and initialize (e.g. call hvd.init()) within the "
            "timeout (SQUINCHCOMM_TIMEOUT or timeout=); check MASTER_ADDR/MASTER_PORT") from exc
    return dist.group.WORLD


# --------------------------------------------------------------------------
# Arrays <-> tensors
# --------------------------------------------------------------------------

def _is_cupy(arr) -> bool:
    return type(arr).__module__.split(".", 1)[0] == "cupy"


def _flat(arr, what: str):
    """Return ``arr`` as a flat view, or raise ValueError if it is not a contiguous NumPy/CuPy array."""
    if not isinstance(arr, np.ndarray) and not _is_cupy(arr):
        raise ValueError(f"{what} is a {type(arr).__name__}: pass a NumPy array (host) or a CuPy "
                         "array (GPU); for a torch tensor pass t.numpy() or cupy.from_dlpack(t)")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} is not contiguous: pass np.ascontiguousarray(x) (or cupy.ascontiguousarray)")
    if arr.dtype.hasobject:
        raise ValueError(f"{what} has dtype {arr.dtype}: only plain numeric arrays can be sent")
    return arr.reshape(-1)


def _bytes(arr):
    """A flat uint8 view of a contiguous array (itemsize bytes per element)."""
    return arr.view(np.uint8) if isinstance(arr, np.ndarray) else arr.view("uint8")


def _tensor(arr, writable: bool):
    """Wrap a flat NumPy/CuPy array as a torch tensor sharing its memory."""
    if isinstance(arr, np.ndarray):
        if writable and not arr.flags.writeable:
            raise ValueError("the receive buffer is read-only: pass a writable array (x.copy())")
        with warnings.catch_warnings():
            # torch warns that a read-only array could be written through the
            # tensor; send buffers are only ever read.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_dlpack(arr)


def _stream_context(arr) -> Callable[[], Any]:
    """Return a factory of contexts that make CuPy's current stream torch's current stream."""
    if not _is_cupy(arr):
        return contextlib.nullcontext
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    device = torch.device("cuda", arr.device.id)
    if ptr == 0:  # CuPy's null stream is the legacy default stream, torch's default too
        stream = torch.cuda.default_stream(device)
    else:
        stream = torch.cuda.ExternalStream(ptr, device=device)
    return lambda: torch.cuda.stream(stream)


# --------------------------------------------------------------------------
# Work
# --------------------------------------------------------------------------

class _TorchWork(Work):
    """A torch.distributed Work whose ``wait(timeout)`` raises TransportError.

    Args:
        work: torch's Work (from an ``async_op=True`` call).
        what: the operation, for error messages.
        timeout: the default wait timeout in seconds (None or inf: the backend's own).
        keep: buffers to keep alive until completion (forever after a failure:
            a timed-out gloo operation may still write into them later).
        on_done: called once after completion, inside ``stream``.
        stream: a factory of the stream context the op was issued in.
    """

    def __init__(self, work, what: str, timeout: float | None, keep: Sequence[Any] = (),
                 on_done: Callable[[], None] | None = None,
                 stream: Callable[[], Any] = contextlib.nullcontext):
        self._work, self._what, self._timeout = work, what, timeout
        self._keep, self._on_done, self._stream = tuple(keep), on_done, stream
        self._finished = False

    def test(self) -> bool:
        if self._finished:
            return True
        if not self._work.is_completed():
            return False
        try:
            self.wait()
        except TransportError:
            pass  # completed with an error: wait() raises it again
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self._finished:
            return
        if timeout is None:
            timeout = self._timeout
        try:
            with self._stream():
                if timeout is None or math.isinf(timeout):
                    done = self._work.wait()
                elif timeout <= 0:
                    # timedelta(0) means "no timeout" to torch: poll once instead.
                    if not self._work.is_completed():
                        raise TransportError(f"{self._what} has not completed (timeout={timeout:g})")
                    done = self._work.wait()
                else:
                    done = self._work.wait(timeout=datetime.timedelta(seconds=max(timeout, 1e-3)))
                if done is False:
                    raise RuntimeError("Work.wait returned False")
                self._finish()
        except TransportError:
            raise
        except Exception as exc:  # RuntimeError / DistBackendError from the backend
            limit = "" if timeout is None or math.isinf(timeout) else f" within {timeout:g} s"
            raise TransportError(
                f"torch.distributed {self._what} failed or did not complete{limit}: a peer rank "
                f"died, is stuck, or called a different collective ({exc}); the process group "
                "is unusable afterwards (set the timeout with SQUINCHCOMM_TIMEOUT, TorchTransport(timeout=) "
                "or wait(timeout))"
            ) from exc

    def _finish(self):
        self._finished = True
        if self._on_done is not None:
            self._on_done()
        self._keep, self._on_done = (), None


# --------------------------------------------------------------------------
# The transport
# --------------------------------------------------------------------------

# Groups created by split(), reused when the same member list is asked for
# again: new_group() costs connections, and with use_local_synchronization the
# group name is a hash of the member list, so creating it twice would clash.
# Keyed by (local?, ordered global ranks); the value remembers the default
# group it was made under, so a re-initialized torch.distributed starts afresh.
_GROUPS: dict[tuple, tuple[Any, Any]] = {}


def _new_group(ranks: list[int], local: bool, timeout):
    """Create (or reuse) the process group of ``ranks``, group rank i = ranks[i]."""
    key = (local, tuple(ranks))
    if key in _GROUPS and _GROUPS[key][0] is dist.group.WORLD:
        return _GROUPS[key][1]
    kwargs = {}
    if ranks != sorted(ranks):
        if "sort_ranks" not in inspect.signature(dist.new_group).parameters:
            raise ValueError("split(color, key): this torch's new_group() always orders a group by "
                             f"global rank, but the keys ask for {ranks}; pass key=rank or upgrade torch")
        kwargs["sort_ranks"] = False
    if local:
        kwargs["use_local_synchronization"] = True
    if timeout is not None:
        kwargs["timeout"] = _timedelta(timeout)
    group = dist.new_group(ranks, **kwargs)
    _GROUPS[key] = (dist.group.WORLD, group)
    return group


def _node_id(global_rank: int) -> str:
    """This process's node: host name, plus torchrun's node rank where known.

    Ranks on one machine in separate network namespaces share a host name;
    torchrun's GROUP_RANK (or RANK // LOCAL_WORLD_SIZE, its block layout)
    tells those "hosts" apart.
    """
    node = os.environ.get("GROUP_RANK")
    if node is None and os.environ.get("LOCAL_WORLD_SIZE"):
        node = str(global_rank // max(1, int(os.environ["LOCAL_WORLD_SIZE"])))
    return f"{socket.gethostname()}/{node or ''}"


class TorchTransport(Transport):
    """Move NumPy/CuPy arrays through a torch.distributed process group.

    Args:
        group: an initialized process group this process belongs to; None is
            the default (world) group.
        timeout: default seconds for ``Work.wait()`` and ``allgather_object``
            when they are given none; None reads ``SQUINCHCOMM_TIMEOUT``
            (default 300); ``math.inf`` waits as long as the backend does (its
            own process-group timeout).

    Raises:
        ValueError: torch.distributed is not initialized, or this process is
            not a member of ``group``.
    """

    name = "torch"

    def __init__(self, group=None, timeout: float | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialized: call "
                             "squinchcomm.transport.torch_dist.init_process_group_from_env() or "
                             "torch.distributed.init_process_group() first")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout={timeout!r}: pass a positive number of seconds or None")
        pg = dist.group.WORLD if group is None else group
        if pg is None or pg == dist.GroupMember.NON_GROUP_MEMBER or dist.get_rank(pg) < 0:
            raise ValueError("this process is not a member of the given process group: "
                             "build the transport only on the group's ranks")
        self._pg = pg
        #: Default seconds for wait() and allgather_object() (as MPITransport).
        self.timeout = config.timeout() if timeout is None else float(timeout)
        self._rank = dist.get_rank(pg)
        self._size = dist.get_world_size(pg)
        self._global_ranks = list(dist.get_process_group_ranks(pg))
        # Which backend serves which device, e.g. {"cpu": "gloo", "cuda": "nccl"}.
        backend = str(dist.get_backend(pg))
        get_config = getattr(dist, "get_backend_config", None)  # newer torch only
        described = str(get_config(pg)) if get_config is not None else backend
        self._devices = dict(part.split(":", 1) for part in described.split(",") if ":" in part)
        if not self._devices:
            self._devices = {"cuda": backend} if backend == "nccl" else {"cpu": backend}
        cuda = self._devices.get("cuda")
        self.gpu_native = cuda is not None and cuda != "gloo"
        self.backend = described

    # -- properties -----------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def group(self):
        """The torch.distributed process group."""
        return self._pg

    def __repr__(self):
        return f"TorchTransport(rank={self._rank}, size={self._size}, backend={self.backend!r})"

    def engine_key(self):
        """One engine per process group."""
        return ("torch", self._pg)

    # -- helpers --------------------------------------------------------------

    def _prepare(self, arr, what: str):
        """Validate ``arr`` for this group's backend; return it flat."""
        arr = _flat(arr, what)
        if _is_cupy(arr):
            if not self.gpu_native:
                raise ValueError(f"{what} is a CuPy array but this process group ({self.backend}) has no "
                                 "NCCL backend: pass NumPy arrays (cupy.asnumpy) or use an NCCL group")
        elif "cpu" not in self._devices:
            raise ValueError(f"{what} is a NumPy array but this process group ({self.backend}) moves "
                             "only GPU memory: pass CuPy arrays or use a gloo group")
        return arr

    def _prepare_pair(self, send, recv):
        """Validate a send/recv pair: same kind of memory, same dtype."""
        send, recv = self._prepare(send, "send"), self._prepare(recv, "recv")
        if _is_cupy(send) != _is_cupy(recv):
            raise ValueError("send and recv must both be NumPy arrays or both CuPy arrays")
        if send.dtype != recv.dtype:
            raise ValueError(f"send is {send.dtype} but recv is {recv.dtype}: counts are in elements, "
                             "so pass arrays of one dtype (view both as uint8 to mix)")
        return send, recv

    def _work(self, work, what, keep=(), on_done=None, stream=contextlib.nullcontext) -> Work:
        return _TorchWork(work, what, self.timeout, keep, on_done, stream)

    def _scratch_device(self) -> torch.device:
        """Where small control tensors (barrier, object sizes) live for this backend."""
        if "cpu" in self._devices:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    # -- operations -----------------------------------------------------------

    def alltoallv(self, send, send_counts: Sequence[int], recv, recv_counts: Sequence[int]) -> Work:
        """Exchange variable-size parts with every rank (``dist.all_to_all_single``).

        ``send[displ[r]:displ[r] + send_counts[r]]`` goes to rank r; rank r's
        part lands in ``recv`` at the prefix sum of ``recv_counts``. Counts are
        in elements; zero counts are allowed. Every rank must call this, and
        ``recv_counts[r]`` here must equal rank r's ``send_counts[self.rank]``.

        Args:
            send, recv: contiguous arrays of the same dtype (NumPy or CuPy).
            send_counts, recv_counts: one count per rank.

        Returns:
            A Work; ``recv`` is valid after ``wait()``.
        """
        send, recv = self._prepare_pair(send, recv)
        send_counts = check_counts(send_counts, self._size, "send_counts")
        recv_counts = check_counts(recv_counts, self._size, "recv_counts")
        check_fits(sum(send_counts), send, "send_counts", "send")
        check_fits(sum(recv_counts), recv, "recv_counts", "recv")
        item = send.dtype.itemsize
        stream = _stream_context(recv)
        with stream():
            t_send = _tensor(_bytes(send[:sum(send_counts)]), writable=False)
            t_recv = _tensor(_bytes(recv[:sum(recv_counts)]), writable=True)
            work = dist.all_to_all_single(t_recv, t_send, [c * item for c in recv_counts],
                                          [c * item for c in send_counts], group=self._pg,
                                          async_op=True)
        return self._work(work, "alltoallv", (send, recv, t_send, t_recv), stream=stream)

    def allgatherv(self, send, recv, counts: Sequence[int]) -> Work:
        """Gather every rank's ``send`` into ``recv`` in rank order.

        Equal counts gather straight into ``recv``. Unequal counts are padded:
        gloo's all_gather needs equal sizes, so every rank sends ``max(counts)``
        elements and the parts are trimmed into ``recv`` after completion; this
        costs ``size * max(counts)`` elements of scratch memory and
        ``(size - 1) * (max(counts) - counts[r])`` extra elements on the wire per
        rank r (next to nothing for Squinch's shards, which differ by a block).

        Args:
            send: this rank's contiguous part; its first ``counts[self.rank]``
                elements are sent.
            recv: the result, at least ``sum(counts)`` elements, same dtype.
            counts: every rank's element count (the same list on every rank).

        Returns:
            A Work; ``recv`` is valid after ``wait()``.
        """
        send, recv = self._prepare_pair(send, recv)
        counts = check_counts(counts, self._size, "counts")
        mine = counts[self._rank]
        check_fits(mine, send, f"counts[{self._rank}]", "send")
        check_fits(sum(counts), recv, "counts", "recv")
        biggest = max(counts)
        if biggest == 0:
            return DoneWork()  # every rank sees the same counts, so every rank skips
        item = send.dtype.itemsize
        stream = _stream_context(recv)
        with stream():
            t_send = _tensor(_bytes(send[:mine]), writable=False)
            t_recv = _tensor(_bytes(recv[:sum(counts)]), writable=True)
            if min(counts) == biggest:
                # Step 1 (equal counts): gather straight into views of recv.
                outputs = list(t_recv.split(biggest * item))
                work = dist.all_gather(outputs, t_send, group=self._pg, async_op=True)
                return self._work(work, "allgatherv", (send, recv, t_send, t_recv, outputs),
                                  stream=stream)
            # Step 1 (unequal counts): pad this rank's part to the largest count.
            padded_in = torch.zeros(biggest * item, dtype=torch.uint8, device=t_send.device)
            padded_in[:mine * item].copy_(t_send)
            scratch = torch.empty(self._size * biggest * item, dtype=torch.uint8, device=t_send.device)
            outputs = list(scratch.split(biggest * item))
            work = dist.all_gather(outputs, padded_in, group=self._pg, async_op=True)

        def trim():
            # Step 2: copy each rank's first counts[r] elements to its place in recv.
            start = 0
            for r, c in enumerate(counts):
                t_recv[start:start + c * item].copy_(outputs[r][:c * item])
                start += c * item

        return self._work(work, "allgatherv", (send, recv, t_send, t_recv, padded_in, scratch),
                          on_done=trim, stream=stream)

    def allreduce(self, buf, op: str = "sum") -> Work:
        """Reduce the float32/float64/int32/int64 array ``buf`` over all ranks,
        in place (``op``: sum, min, max or product).

        Returns:
            A Work; ``buf`` holds the result after ``wait()``.
        """
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX,
                     "product": dist.ReduceOp.PRODUCT}[check_op(op)]
        buf = self._prepare(buf, "buf")
        if buf.dtype not in _REDUCIBLE:
            raise ValueError(f"allreduce sums float32, float64, int32 or int64 arrays, not {buf.dtype}: "
                             "cast first (x.astype(np.float32))")
        stream = _stream_context(buf)
        with stream():
            t = _tensor(buf, writable=True)
            work = dist.all_reduce(t, op=reduce_op, group=self._pg, async_op=True)
        return self._work(work, "allreduce", (buf, t), stream=stream)

    def broadcast(self, buf, root: int) -> Work:
        """Copy ``buf`` from group rank ``root`` to every rank, in place.

        Returns:
            A Work; ``buf`` holds root's data after ``wait()``.
        """
        buf = self._prepare(buf, "buf")
        if not 0 <= int(root) < self._size:
            raise ValueError(f"root={root} is not a rank of this group (0..{self._size - 1})")
        stream = _stream_context(buf)
        with stream():
            t = _tensor(_bytes(buf), writable=True)
            work = dist.broadcast(t, src=self._global_ranks[int(root)], group=self._pg, async_op=True)
        return self._work(work, "broadcast", (buf, t), stream=stream)

    def barrier(self) -> Work:
        """Wait for every rank (an allreduce of one element, so it can time out).

        Returns:
            A Work that completes once every rank has called ``barrier()``.
        """
        # A one-element allreduce rather than dist.barrier(): NCCL's barrier
        # guesses a device from the rank, and this one works on every backend.
        t = torch.zeros(1, dtype=torch.float32, device=self._scratch_device())
        work = dist.all_reduce(t, group=self._pg, async_op=True)
        return self._work(work, "barrier", (t,))

    def allgather_object(self, obj: Any, timeout: float | None = None) -> list:
        """Gather a small picklable object from every rank.

        Pickles ``obj``, all-gathers the byte lengths, then the bytes padded to
        the longest: two timed collectives instead of torch's untimed
        ``all_gather_object``.

        Args:
            obj: any picklable object.
            timeout: seconds for both steps together (None: the transport's).

        Returns:
            The objects in rank order.

        Raises:
            TransportError: a rank did not take part in time.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = None if math.isinf(timeout) else time.monotonic() + timeout

        def remaining():
            return None if deadline is None else max(deadline - time.monotonic(), 0.0)

        device = self._scratch_device()
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        # Step 1: every rank's byte count.
        length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        lengths = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(self._size)]
        self._work(dist.all_gather(lengths, length, group=self._pg, async_op=True),
                   "allgather_object (lengths)", (length, lengths)).wait(remaining())
        sizes = [int(n.item()) for n in lengths]
        # Step 2: the pickles, padded to the longest.
        longest = max(sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        mine = mine.to(device)
        chunks = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(self._size)]
        self._work(dist.all_gather(chunks, mine, group=self._pg, async_op=True),
                   "allgather_object (data)", (mine, chunks)).wait(remaining())
        return [pickle.loads(c[:n].cpu().numpy().tobytes()) for c, n in zip(chunks, sizes)]

    def allgather_digest(self, digest: bytes, timeout: float | None = None) -> list[bytes]:
        """One fixed-size all_gather (the object path takes two)."""
        device = self._scratch_device()
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(device)
        chunks = [torch.empty_like(mine) for _ in range(self._size)]
        self._work(dist.all_gather(chunks, mine, group=self._pg, async_op=True),
                   "metadata digest", (mine, chunks)).wait(self.timeout if timeout is None
                                                           else timeout)
        return [c.cpu().numpy().tobytes() for c in chunks]

    def split(self, color: int, key: int) -> "TorchTransport":
        """Return a transport over the ranks that pass the same ``color``, ordered by ``key``.

        Collective over this group. ``dist.new_group`` needs every member
        process to call it in the same order, so the (color, key) pairs are
        gathered first and every rank builds the same groups. From the world
        group every rank creates every group (torch's rule); from a subgroup
        only the members of each new group call it
        (``use_local_synchronization``), since the ranks outside this group
        are not taking part. Groups are cached by member list.

        Args:
            color: a non-negative int; ranks with equal colors share a group.
            key: orders the ranks of a group (ties: by current rank).

        Returns:
            A TorchTransport over the new group (same timeout).
        """
        color, key = int(color), int(key)
        if color < 0:
            raise ValueError(f"color={color}: pass a non-negative color (every rank must join a group)")
        # Step 1: every rank's (color, key).
        pairs = self.allgather_object((color, key))
        # Step 2: each group's global ranks, ordered by (key, current rank).
        members: dict[int, list[tuple[int, int]]] = {}
        for r, (c, k) in enumerate(pairs):
            members.setdefault(c, []).append((k, r))
        ordered = {c: [self._global_ranks[r] for _, r in sorted(v)] for c, v in members.items()}
        # Step 3: create the groups in the same order everywhere; keep ours.
        if self._size == dist.get_world_size():
            mine = None
            for c in sorted(ordered):
                group = _new_group(ordered[c], local=False, timeout=None)
                if c == color:
                    mine = group
        else:
            mine = _new_group(ordered[color], local=True, timeout=None)
        return TorchTransport(mine, timeout=self.timeout)

    def node_split(self) -> "TorchTransport":
        """Return a transport over the ranks on this node.

        Nodes are told apart by host name and, under torchrun, by GROUP_RANK
        (or RANK // LOCAL_WORLD_SIZE), so ranks in separate network namespaces
        of one machine count as separate nodes.
        """
        ids = self.allgather_object(_node_id(dist.get_rank()))
        color = sorted(set(ids)).index(ids[self._rank])
        return self.split(color, self._rank)


# --------------------------------------------------------------------------
# Interpreter exit
# --------------------------------------------------------------------------
# torch 2.13's gloo worker threads (named "pt_gloo_runloop") drop their last
# reference to a finished operation after its wait() has returned. When that
# reference is the last one to a tensor that has a Python object (a tensor the
# script let go of, or the one all_gather_object builds), the thread takes the
# GIL to release it. If the interpreter is already finalizing by then, Python
# ends the thread with pthread_exit, whose unwinding meets a C++ destructor and
# aborts the whole process: "terminate called without an active exception",
# after the run has finished. Measured on 2 CPU cores: 3 of 90 runs of
# examples/ddp_squinch.py under torchrun aborted so (9 of 90 with --hook none),
# all in this thread; none after _settle_gloo_workers (README, "At exit").
_GLOO_WORKER = "pt_gloo_runloop"  # the thread name torch gives the workers (15 characters)


# futex's system call number, by machine: a worker waiting for work is in an
# untimed futex wait; the GIL's wait (and gloo's network waits) are timed.
_FUTEX = {"x86_64": "202", "aarch64": "98", "ppc64le": "221"}.get(platform.machine())


def _gloo_workers_busy(tasks: str) -> bool | None:
    """Whether a gloo worker thread of this process is running, runnable, or
    in a timed wait such as the GIL's (None: no gloo worker thread at all)."""
    found = None
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread has ended
            continue
        close = stat.rfind(")")
        if stat[stat.find("(") + 1:close] != _GLOO_WORKER:
            continue
        busy = stat[close + 2] in "RD"
        if not busy and _FUTEX is not None:
            try:
                with open(f"{tasks}/{tid}/syscall") as f:
                    call = f.read().split()  # number, then the arguments
            except OSError:
                call = []
            # futex(uaddr, op, val, timeout, ...): busy unless untimed
            busy = len(call) > 4 and call[0] == _FUTEX and call[4] != "0x0"
        found = found or busy
    return found


def _settle_gloo_workers(limit: float, quiet_polls: int = 3, poll_s: float = 0.001) -> bool:
    """Wait, with the GIL released, until every gloo worker thread waits for
    work (``_gloo_workers_busy``) at ``quiet_polls`` polls in a row, ``poll_s``
    apart, or ``limit`` seconds have passed; return whether they settled.

    Called at interpreter exit, before finalization: a worker still finishing
    an operation gets the GIL while this thread sleeps, instead of being ended
    by the finalizing interpreter. A worker waiting on the network for an
    operation the script never waited for is in a timed wait, so it holds the
    exit for ``limit`` seconds. Linux only (it reads /proc); elsewhere it
    returns True at once.
    """
    tasks = f"/proc/{os.getpid()}/task"
    if not os.path.isdir(tasks):
        return True
    deadline = time.monotonic() + limit
    quiet = 0
    while quiet < quiet_polls:
        busy = _gloo_workers_busy(tasks)
        if busy is None:
            return True  # no gloo process group in this process
        quiet = 0 if busy else quiet + 1
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def _at_exit(settle_limit: float = 10.0) -> None:
    """The torch part of the engine's exit handler: take down a gloo-only
    default process group (not under MPI, which finalizes through mpi4py's own
    exit handler), then let the gloo worker threads settle, for at most
    ``settle_limit`` seconds."""
    try:
        if ("mpi4py.MPI" not in sys.modules and dist.is_initialized()
                and str(dist.get_backend()) == "gloo"):
            dist.destroy_process_group()
    except Exception:  # exiting anyway: never turn a finished run into a failure
        pass
    _settle_gloo_workers(settle_limit)
