"""The progress engine: one ordered queue and one thread per communicator group.

Why a thread: a collective made of several exchanges (the compressed
allreduce's all-to-all, then its all-gather) can issue its second exchange
only when the first has finished. If that happened only when the caller
polled (``test()``/``wait()``), a bucket launched from a gradient hook would
not advance between hooks and the last bucket would overlap nothing.
Horovod's answer is a background thread that drives the collectives while
the training thread computes; PyTorch's is work enqueued on CUDA streams plus
c10d's own threads. squinchcomm drives operations from one background thread
per group (it must also run host codec work and MPI, which have no stream to
enqueue on), and orders CUDA work with events on an engine stream.

The rules:

1. Every operation of a group (a :class:`~squinchcomm.collectives.Communicator`
   and the sub-groups it made for hierarchical mode, and every Communicator
   over the same process group or MPI communicator) goes through one
   :class:`Engine`, whatever API submitted it: the Communicator, the
   ``squinchcomm.torch`` functions, ``DistributedOptimizer`` and the DDP hooks.
2. The engine runs operations strictly in submission order, one after the
   other, on its thread. Submission order is program order, the same on every
   rank, so the order in which collectives reach MPI, gloo or NCCL is the
   same on every rank whatever the timing. Inside one operation several
   exchanges are in flight at once (the pipelined allreduce keeps chunk k's
   all-to-all on the wire while it encodes chunk k+1), in an order fixed by
   the algorithm. Two operations are never interleaved: that would make the
   order of exchanges depend on when each rank's operations arrived.
3. Operations progress without the caller: ``Handle.wait()`` only waits.
4. CUDA: at submission the producer's device and stream (torch's current
   stream for torch tensors, CuPy's for CuPy arrays) are captured and an
   event is recorded on it. The engine runs the operation on its own stream
   for that device, which first waits on that event; when the operation is
   done it records a completion event, makes the producer's stream wait on
   it (so work queued there afterwards sees the result), and
   ``Handle.wait()`` makes the caller's current stream wait on it too.
   Buffers stay referenced until the completion event has fired.
5. A failed operation stores its exception, which ``wait()`` raises.
   Mismatches between ranks are found by the same check on every rank, so
   every rank raises the same error, and the group stays usable. A
   TransportError (a peer that did not arrive in time, a failed exchange)
   leaves the ranks at unknown points of their exchanges, so it breaks the
   group: every operation queued behind it and every later submission fails
   at once with a TransportError naming the first failure, until the
   communicator is rebuilt (``hvd.shutdown()`` then ``hvd.init()``, a new
   process group or MPI communicator).
6. Two operations with the same name may not be in flight at once (Horovod's
   rule): the second submission raises ValueError on the caller's thread.
7. At interpreter exit every engine finishes its queue (bounded by the
   timeout) and stops.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Generator

from squinchcomm import config
from squinchcomm.errors import BackendError, TransportError
from squinchcomm.transport.base import Work

__all__ = ["Engine", "Handle", "engine_for", "CudaStreams", "start_timeline", "stop_timeline"]


class Handle:
    """A collective in flight: ``wait()`` returns its result, ``test()`` says
    whether it is ready. Both are safe from any thread; neither is needed for
    the operation to progress."""

    def __init__(self, engine: "Engine", op: Generator[Work, None, Any], what: str,
                 timeout: float, device: "DeviceCapture | None" = None, keep=(),
                 name: str | None = None):
        self._engine, self._op, self.what, self.name = engine, op, what, name
        self._timeout, self._device, self._keep = timeout, device, keep
        self._done = threading.Event()
        self._result = self._error = None
        self._callbacks: list[Callable[["Handle"], None]] = []
        self._submitted = time.perf_counter()

    def test(self) -> bool:
        """Return True when the result is ready (never blocks)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None):
        """Block until done and return the result; raise the operation's error.

        Args:
            timeout: seconds to wait at most (None: until the operation ends;
                every exchange in it is bounded by the transport's timeout).
        """
        if not self._done.is_set():
            if threading.current_thread() is self._engine._thread:
                raise RuntimeError(f"{self.what}: waited for from inside the squinchcomm engine "
                                   "(a done-callback must not wait for another operation)")
            if not self._done.wait(timeout):
                raise TransportError(f"{self.what} did not complete within {timeout:g} s")
        if self._error is not None:
            raise self._error
        if self._device is not None:
            self._device.consumer_wait()
        return self._result

    def exception(self) -> BaseException | None:
        """The operation's error once done (None while running or on success)."""
        return self._error if self._done.is_set() else None

    def add_done_callback(self, fn: Callable[["Handle"], None]):
        """Call ``fn(handle)`` once the operation is done (on the engine's
        thread; at once if it already is). ``fn`` must not block on another
        operation of this engine."""
        with self._engine._cv:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # ------------------------------------------------------------ engine side
    def _run(self):
        """Drive the operation to its end (on the engine's thread)."""
        op = self._op
        started = time.perf_counter()
        try:
            self._engine._raise_if_broken(self.what)
            with self._device.enter() if self._device is not None else contextlib.nullcontext():
                try:
                    work = next(op)
                    while True:
                        work.wait(self._timeout)
                        work = op.send(None)
                except StopIteration as stop:
                    self._result = stop.value
                if self._device is not None:
                    self._device.complete()
        except BaseException as exc:  # kept for wait()
            self._error = exc
            op.close()
            if isinstance(exc, TransportError):
                self._engine._break(exc)
        finally:
            self._op = None
            if self._device is not None:
                self._engine._retire(self._device, self._keep)
            self._keep = ()
            timeline = _TIMELINE  # recorded before wait() can return
            if timeline is not None:
                timeline.record(self, started, time.perf_counter())
            with self._engine._cv:
                self._done.set()
                callbacks, self._callbacks = self._callbacks, []
                if self.name is not None:
                    self._engine._names.discard(self.name)
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a callback's failure must not stop the engine
                traceback.print_exc()


class Engine:
    """Runs one group's operations in submission order on a background thread.

    Args:
        name: shown in the thread's name and in error messages.
        streams: the CUDA stream backend (tests pass a stand-in).
    """

    def __init__(self, name: str = "squinchcomm", streams: "CudaStreams | None" = None):
        self.name = name
        self._cv = threading.Condition()
        self._queue: collections.deque[Handle] = collections.deque()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._streams = streams
        self._engine_streams: dict[int, Any] = {}  # device -> the engine's stream there
        self._retired: list[tuple[Any, Any]] = []  # (completion event, buffers) of GPU ops
        self._names: set[str] = set()  # names of the operations in flight (rule 6)
        self._broken: TransportError | None = None  # the failure that broke the group (rule 5)
        _ENGINES.append(self)

    @property
    def streams(self) -> "CudaStreams":
        if self._streams is None:
            self._streams = CudaStreams()
        return self._streams

    def submit(self, op: Generator[Work, None, Any], *, what: str, timeout: float,
               gpu: tuple[str, int] | None = None, keep=(), name: str | None = None) -> Handle:
        """Queue ``op`` (a generator yielding transport Works and returning the
        result) behind the operations already submitted.

        Args:
            op: the operation.
            what: its description, for errors.
            timeout: seconds each exchange may take before TransportError.
            gpu: ``(family, device)`` of the operation's CUDA buffers, whose
                producer stream is captured now; None for host buffers.
            keep: objects to keep alive until the operation (and its GPU work) is done.
            name: the operation's name; another one in flight with it is refused.

        Raises:
            TransportError: the group failed earlier (rule 5).
            ValueError: ``name`` is already in flight (rule 6).
        """
        self._raise_if_broken(what)
        with self._cv:
            if name is not None and name in self._names:
                raise ValueError(f"{what}: another collective named '{name}' is still in "
                                 "flight; wait for it first or give each tensor its own name "
                                 "(names identify tensors across ranks)")
        device = DeviceCapture(self, gpu[0], gpu[1]) if gpu is not None else None
        handle = Handle(self, op, what, timeout, device, keep, name)
        with self._cv:
            if self._closed:
                raise RuntimeError(f"{what}: the squinchcomm engine has shut down "
                                   "(interpreter exit); no new collectives can start")
            if name is not None:
                self._names.add(name)
            self._queue.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"{self.name}-engine",
                                                daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return handle

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                handle = self._queue.popleft()
                self._busy = True
            self._purge()
            handle._run()
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _break(self, exc: TransportError):
        with self._cv:
            if self._broken is None:
                self._broken = exc

    def _raise_if_broken(self, what: str):
        if self._broken is not None:
            raise TransportError(
                f"{what}: not started, because an earlier collective of this group failed "
                f"({self._broken}); the ranks' exchanges are out of step, so the group cannot "
                "be used again: rebuild it (hvd.shutdown() then hvd.init(), or a new "
                "communicator over a new process group / MPI communicator)") from self._broken

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted operation is done; False on timeout."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("drain() called from inside the squinchcomm engine")
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = None):
        """Finish the queue (at most ``timeout`` s) and stop the thread."""
        self.drain(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(0 if timeout is None else max(0.0, min(timeout, 1.0)))

    # ------------------------------------------------------------ CUDA
    def _stream(self, device: int):
        s = self._engine_streams.get(device)
        if s is None:
            s = self._engine_streams[device] = self.streams.new_stream(device)
        return s

    def _retire(self, device: "DeviceCapture", keep):
        if device.done is not None and keep:
            self._retired.append((device.done, keep))

    def _purge(self):
        """Release buffers of GPU operations whose completion event has fired."""
        if self._retired:
            self._retired = [(e, k) for e, k in self._retired if not self.streams.query(e)]

    def _after_fork(self):
        """In a forked child: no thread, nothing queued (the parent owns them)."""
        self._cv = threading.Condition()
        self._queue.clear()
        self._busy, self._thread, self._retired = False, None, []
        self._engine_streams.clear()
        self._names = set()


class DeviceCapture:
    """The CUDA device and producer stream of one operation (rule 4 above)."""

    def __init__(self, engine: Engine, family: str, device: int):
        self.engine, self.family, self.device = engine, family, device
        s = engine.streams
        # Step 1 (caller's thread, at submission): the producer's stream, and
        # an event after the work that produced the buffers.
        self.producer = s.current(family, device)
        self.ready = s.record(self.producer, device)
        self.stream = self.done = None

    def enter(self):
        """Step 2 (engine thread): run on the engine's stream, after ``ready``."""
        s = self.engine.streams
        self.stream = self.engine._stream(self.device)
        s.wait(self.stream, self.ready)
        return s.use(self.stream, self.device)

    def complete(self):
        """Step 3 (engine thread, the operation has finished): record the
        completion event; the producer's stream waits on it."""
        s = self.engine.streams
        self.done = s.record(self.stream, self.device)
        s.wait(self.producer, self.done)
        if config.cuda_debug():
            try:
                s.synchronize(self.stream)
            except Exception as exc:
                raise BackendError(f"a CUDA kernel of this operation failed: {exc}") from exc

    def consumer_wait(self):
        """Step 4 (caller's thread, in ``wait()``): the current stream waits too."""
        s = self.engine.streams
        s.wait(s.current(self.family, self.device), self.done)


class CudaStreams:
    """The CUDA calls the engine makes, through CuPy (and torch for torch's
    current stream). Kept behind this small interface so that the ordering
    logic above can be tested on a machine without a GPU."""

    @staticmethod
    def _cupy():
        import cupy

        return cupy

    def current(self, family: str, device: int):
        cupy = self._cupy()
        with cupy.cuda.Device(device):
            if family == "torch":
                import torch

                ts = torch.cuda.current_stream(device)
                return cupy.cuda.ExternalStream(ts.cuda_stream, device)
            return cupy.cuda.get_current_stream()

    def record(self, stream, device: int):
        cupy = self._cupy()
        with cupy.cuda.Device(device):
            event = cupy.cuda.Event(disable_timing=True)
            event.record(stream)
        return event

    @staticmethod
    def wait(stream, event):
        stream.wait_event(event)

    def new_stream(self, device: int):
        cupy = self._cupy()
        with cupy.cuda.Device(device):
            return cupy.cuda.Stream(non_blocking=True)

    def use(self, stream, device: int):
        stack = contextlib.ExitStack()
        stack.enter_context(self._cupy().cuda.Device(device))
        stack.enter_context(stream)
        return stack

    @staticmethod
    def synchronize(stream):
        stream.synchronize()

    @staticmethod
    def query(event) -> bool:
        return bool(event.done)


# ----------------------------------------------------------------------------
# Timeline (Horovod's hvd.start_timeline): one Chrome trace event per operation
# ----------------------------------------------------------------------------
class _Timeline:
    """Operations as Chrome-trace "complete" events (chrome://tracing, Perfetto):
    one row per engine, each event from the start to the end of the
    operation on the engine's thread, with its queueing time and error."""

    def __init__(self, path: str):
        self.path, self._lock, self._events = path, threading.Lock(), []
        self._t0 = time.perf_counter()

    def record(self, handle: Handle, started: float, ended: float):
        event = {"name": handle.what, "cat": "collective", "ph": "X", "pid": os.getpid(),
                 "tid": handle._engine.name, "ts": (started - self._t0) * 1e6,
                 "dur": (ended - started) * 1e6,
                 "args": {"queued_us": (started - handle._submitted) * 1e6}}
        if handle._error is not None:
            event["args"]["error"] = f"{type(handle._error).__name__}: {handle._error}"
        with self._lock:
            self._events.append(event)

    def write(self):
        with self._lock:
            events = list(self._events)
        with open(self.path, "w") as fh:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, fh)


_TIMELINE: _Timeline | None = None


def start_timeline(path: str):
    """Record every engine operation from now on; :func:`stop_timeline` writes
    them to ``path`` as a Chrome trace (JSON). A timeline already running is
    written first."""
    global _TIMELINE
    if _TIMELINE is not None:
        stop_timeline()
    _TIMELINE = _Timeline(str(path))


def stop_timeline():
    """Stop recording and write the trace (nothing if no timeline runs)."""
    global _TIMELINE
    timeline, _TIMELINE = _TIMELINE, None
    if timeline is not None:
        timeline.write()


# ----------------------------------------------------------------------------
# One engine per group, found by the transport's engine key.
# ----------------------------------------------------------------------------
_ENGINES: list[Engine] = []
_BY_KEY: dict[Any, Engine] = {}
_LOCK = threading.Lock()


def engine_for(transport) -> Engine:
    """The engine of ``transport``'s group: one per process group or MPI
    communicator, shared by every Communicator built over it."""
    key = transport.engine_key()
    with _LOCK:
        engine = _BY_KEY.get(key)
        if engine is None:
            engine = _BY_KEY[key] = Engine(f"squinchcomm-{transport.name}")
        return engine


def _after_fork_in_child():
    for e in _ENGINES:
        e._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ----------------------------------------------------------------------------
# Interpreter exit
# ----------------------------------------------------------------------------
def _at_exit():
    """Finish every engine's queue and stop its thread; then, where
    torch.distributed is loaded, take down a gloo-only default process group
    and let gloo's worker threads finish with the GIL available (torch 2.13's
    gloo otherwise aborts a finished rank now and then, "terminate called
    without an active exception": see ``torch_dist._settle_gloo_workers``).
    The interpreter's own exit status is kept."""
    for e in list(_ENGINES):
        e.close(config.timeout())
    if "torch.distributed" in sys.modules:
        try:
            from squinchcomm.transport import torch_dist
        except Exception:  # a broken torch: nothing of ours can be running on it
            return
        torch_dist._at_exit()


atexit.register(_at_exit)
