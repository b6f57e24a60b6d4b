"""The progress engine on its own (one process): order, errors, callbacks,
the CUDA stream protocol (with a recording stand-in for the CUDA calls, since
CI has no GPU; the real calls run in the GPU tests), thread safety of the
CPU codec, and a clean interpreter exit under gloo.

Multi-rank behaviour is in tests/mpi/test_engine.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from squinchcomm.collectives.engine import Engine
from squinchcomm.transport.base import PollingWork

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _op(log, name, seconds=0.0, fail=False):
    """An operation of two exchanges that logs when it starts and ends."""
    def run():
        log.append(("start", name))
        deadline = time.monotonic() + seconds
        yield PollingWork(lambda: time.monotonic() >= deadline, f"{name} stage 1")
        if fail:
            raise ValueError(f"{name} failed")
        yield PollingWork(lambda: True, f"{name} stage 2")
        log.append(("end", name))
        return name
    return run()


def test_operations_run_one_at_a_time_in_submission_order():
    engine, log = Engine("test"), []
    handles = [engine.submit(_op(log, i, seconds=0.01 * (3 - i % 3)), what=f"op{i}", timeout=5)
               for i in range(6)]
    assert [h.wait() for h in reversed(handles)] == list(range(6))[::-1]
    assert log == [(k, i) for i in range(6) for k in ("start", "end")]


def test_submissions_from_many_threads_never_interleave():
    engine, log = Engine("test"), []
    handles, lock = [], threading.Lock()

    def submitter(t):
        for i in range(5):
            h = engine.submit(_op(log, (t, i), seconds=0.002), what="op", timeout=5)
            with lock:
                handles.append(h)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.wait()
    assert len(log) == 40
    for k in range(0, 40, 2):  # every start is followed by its own end
        assert log[k][0] == "start" and log[k + 1] == ("end", log[k][1])


def test_a_failed_operation_raises_and_the_next_ones_run():
    engine, log = Engine("test"), []
    bad = engine.submit(_op(log, "bad", fail=True), what="bad op", timeout=5)
    good = engine.submit(_op(log, "good"), what="good op", timeout=5)
    assert good.wait() == "good"
    with pytest.raises(ValueError, match="bad failed"):
        bad.wait()
    assert isinstance(bad.exception(), ValueError) and good.exception() is None
    assert ("end", "bad") not in log


def test_progress_without_wait_and_callbacks_on_completion():
    engine, log, seen = Engine("test"), [], threading.Event()
    h = engine.submit(_op(log, "a", seconds=0.05), what="a", timeout=5)
    h.add_done_callback(lambda handle: seen.set())
    assert seen.wait(5) and h.test()  # nobody waited or polled
    late = []
    h.add_done_callback(late.append)  # already done: called at once
    assert late == [h]


def test_waiting_inside_the_engine_is_refused():
    engine, errors = Engine("test"), []
    first = engine.submit(_op([], "slow", seconds=0.2), what="slow", timeout=5)

    def nested():
        inner = engine.submit(_op([], "inner"), what="inner", timeout=5)
        try:
            inner.wait()
        except RuntimeError as exc:
            errors.append(str(exc))
        return None
        yield

    outer = engine.submit(nested(), what="outer", timeout=5)
    first.wait(), outer.wait()
    assert errors and "inside the squinchcomm engine" in errors[0]


def test_a_timed_out_exchange_fails_the_operation():
    engine = Engine("test")

    def stuck():
        yield PollingWork(lambda: False, "an exchange nobody answers")

    with pytest.raises(Exception, match="did not complete within 0.2 s"):
        engine.submit(stuck(), what="stuck", timeout=0.2).wait()


# ----------------------------------------------------------------------------
# The CUDA stream protocol, with a stand-in that records the calls.
# ----------------------------------------------------------------------------
class RecordingStreams:
    """The engine's CUDA interface (engine.CudaStreams) as a recorder."""

    def __init__(self):
        self.calls, self.current_stream, self.n = [], "user-stream-A", 0

    def current(self, family, device):
        return f"{self.current_stream}@{family}:{device}"

    def record(self, stream, device):
        self.n += 1
        event = f"event{self.n}"
        self.calls.append(("record", stream, event))
        return event

    def wait(self, stream, event):
        self.calls.append(("wait", stream, event))

    def new_stream(self, device):
        self.calls.append(("new_stream", device))
        return f"engine-stream:{device}"

    def use(self, stream, device):
        import contextlib

        calls = self.calls

        @contextlib.contextmanager
        def ctx():
            calls.append(("enter", stream))
            yield
            calls.append(("exit", stream))

        return ctx()

    def synchronize(self, stream):
        self.calls.append(("synchronize", stream))

    def query(self, event):
        return True


def test_stream_protocol_orders_producer_engine_and_consumer():
    streams = RecordingStreams()
    engine = Engine("test", streams=streams)

    def op():
        streams.calls.append(("kernels",))
        yield PollingWork(lambda: True, "exchange")
        return "result"

    h = engine.submit(op(), what="gpu op", timeout=5, gpu=("torch", 1), keep=("buffer",))
    streams.current_stream = "user-stream-B"  # the caller switched streams before waiting
    assert h.wait() == "result"
    producer, consumer, mine = "user-stream-A@torch:1", "user-stream-B@torch:1", "engine-stream:1"
    assert streams.calls == [
        ("record", producer, "event1"),   # submission: after the producer's work
        ("new_stream", 1),                # the engine's stream on device 1, made once
        ("wait", mine, "event1"),         # the engine's stream waits for the producer
        ("enter", mine), ("kernels",),    # the operation runs on the engine's stream
        ("record", mine, "event2"),       # completion
        ("wait", producer, "event2"),     # later work on the producer's stream sees it
        ("exit", mine),
        ("wait", consumer, "event2"),     # and so does the stream current at wait()
    ]
    # A second operation on the same device reuses the engine's stream.
    engine.submit(op(), what="again", timeout=5, gpu=("cupy", 1)).wait()
    assert sum(1 for c in streams.calls if c[0] == "new_stream") == 1


def test_stream_protocol_on_failure_skips_completion_and_raises():
    streams = RecordingStreams()
    engine = Engine("test", streams=streams)

    def op():
        raise ValueError("kernel input was bad")
        yield

    h = engine.submit(op(), what="gpu op", timeout=5, gpu=("cupy", 0))
    with pytest.raises(ValueError, match="kernel input was bad"):
        h.wait()
    assert not any(c[0] == "record" and c[1].startswith("engine") for c in streams.calls)


# ----------------------------------------------------------------------------
# Thread safety of the CPU codec
# ----------------------------------------------------------------------------
def test_codec_calls_from_many_threads_at_once():
    """Numba's workqueue layer aborts the process on concurrent parallel
    launches; the codec serializes them. Results equal the serial ones."""
    pytest.importorskip("numba")
    from squinchcomm import codec

    xs = [np.random.default_rng(t).standard_normal(300_000).astype(np.float32) for t in range(6)]
    want = [codec.encode(x, rounding="stochastic", seed=t) for t, x in enumerate(xs)]
    got, start = [None] * len(xs), threading.Barrier(len(xs))

    def worker(t):
        start.wait()
        for _ in range(5):
            p = codec.encode(xs[t], rounding="stochastic", seed=t)
            codec.decode(p, xs[t].size)
        got[t] = p

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


# ----------------------------------------------------------------------------
# Interpreter exit
# ----------------------------------------------------------------------------
_SCRIPT = textwrap.dedent("""
    import os, socket, sys
    import numpy as np
    import torch.distributed as dist
    from squinchcomm import Communicator

    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    comm = Communicator(dist.group.WORLD, min_compress_bytes=0)
    h = comm.allreduce_async(np.ones(100_000, np.float32), compression="squinch")
    print("submitted", flush=True)
    mode = sys.argv[1]
    if mode == "exit3":
        sys.exit(3)
    if mode == "raise":
        raise RuntimeError("the user's script failed")
    # "end": fall off the end with the operation possibly still in flight
""")


@pytest.mark.parametrize("mode, code", [("end", 0), ("exit3", 3), ("raise", 1)])
def test_scripts_exit_cleanly_with_their_own_status(tmp_path, mode, code):
    """No library call at the end: the engine drains at exit and the gloo
    group is taken down, and the script's exit status is kept."""
    pytest.importorskip("torch")
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "submitted" in proc.stdout
    assert "terminate called" not in proc.stderr


_BUSY_WORKER_SCRIPT = textwrap.dedent("""
    import socket, threading, time
    import torch, torch.distributed as dist
    import squinchcomm  # noqa: F401  (nothing else: its exit handler is what is tested)

    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    group = dist.group.WORLD  # the script keeps its group, as a DDP model keeps its own

    started = ending = False

    def callback(fut):  # on gloo's worker thread, taking the GIL in turns
        global started
        if threading.current_thread() is threading.main_thread():
            return fut.value()  # the operation had finished: then() ran it here; try again
        started = True
        print("callback started", flush=True)
        while not ending:
            pass
        end = time.perf_counter() + 1.0  # still running when the interpreter finalizes
        while time.perf_counter() < end:
            pass
        print("callback finished", flush=True)
        return fut.value()

    for _ in range(1000):
        chained = dist.all_reduce(torch.ones(8), async_op=True).get_future().then(callback)
        deadline = time.monotonic() + 5
        while not started and not chained.done() and time.monotonic() < deadline:
            time.sleep(0.001)
        if started:
            break
    assert started, "no callback ran on gloo's worker thread"
    print("script ends", flush=True)
    ending = True
""")


def test_exit_waits_for_a_gloo_worker_still_running_python(tmp_path):
    """The script ends while gloo's worker thread still runs Python (a future
    callback). Without the exit handler's wait the finalizing interpreter ends
    that thread mid-callback and the process dies (SIGSEGV here; the same race,
    shorter, is the abort of a finished torchrun job: README, "At exit"). With
    it, the callback finishes and the exit status is 0."""
    pytest.importorskip("torch")
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("the wait reads /proc (Linux)")
    script = tmp_path / "job.py"
    script.write_text(_BUSY_WORKER_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert proc.stdout.split() == ["callback", "started", "script", "ends",
                                   "callback", "finished"], proc.stdout


def test_mpi_below_thread_multiple_is_refused_with_the_fix():
    """The engine calls MPI from its progress thread: an MPI initialised with a
    lower thread level must be refused at construction, not crash later."""
    pytest.importorskip("mpi4py")
    script = textwrap.dedent("""
        import mpi4py
        mpi4py.rc.thread_level = "funneled"
        from mpi4py import MPI
        from squinchcomm.errors import TransportError
        from squinchcomm.transport.mpi import MPITransport
        try:
            MPITransport()
        except TransportError as e:
            print("refused:", e)
        else:
            print("accepted")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "'funneled'" in proc.stdout, proc.stdout
    assert "THREAD_MULTIPLE" in proc.stdout and "thread_level" in proc.stdout


def test_communicator_options_are_validated_and_sizes_take_suffixes():
    """timeout must be positive (0, -1 and NaN were accepted); byte-size
    variables take the CLI's suffixes (SQUINCHCOMM_PIPELINE_BYTES=16M was
    rejected); a bad size names the variable."""
    code = textwrap.dedent("""
        import os
        from mpi4py import MPI
        from squinchcomm import Communicator
        for bad in (0, -1, float("nan")):
            try:
                Communicator(MPI.COMM_SELF, timeout=bad)
            except ValueError as exc:
                assert "timeout=" in str(exc) and "> 0" in str(exc), exc
            else:
                raise AssertionError(f"timeout={bad} accepted")
        os.environ["SQUINCHCOMM_PIPELINE_BYTES"] = "16M"
        os.environ["SQUINCHCOMM_MIN_COMPRESS_BYTES"] = "64KiB"
        comm = Communicator(MPI.COMM_SELF)
        assert comm.pipeline_bytes == 16 << 20 and comm.min_compress_bytes == 64 << 10
        os.environ["SQUINCHCOMM_PIPELINE_BYTES"] = "16Q"
        try:
            Communicator(MPI.COMM_SELF)
        except ValueError as exc:
            assert "SQUINCHCOMM_PIPELINE_BYTES='16Q'" in str(exc), exc
        else:
            raise AssertionError("16Q accepted")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQUINCHCOMM_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


@pytest.mark.parametrize("failure", ["timeout", "error"])
def test_a_failed_exchange_keeps_its_buffers_alive(failure):
    """An engine may go on writing into the buffers of an operation that
    timed out or failed halfway (MPI completes the rest of a failed schedule;
    a late peer completes a timed-out one): they must not be freed under it."""
    import gc
    import weakref

    from squinchcomm.errors import TransportError

    def done():
        if failure == "error":
            raise TransportError("the engine reported an error")
        return False

    buf = np.zeros(1000, np.float32)
    alive = weakref.ref(buf)
    work = PollingWork(done, "an exchange", keep=(buf,))
    with pytest.raises(TransportError):
        work.wait(timeout=0.01)
    del buf, work
    gc.collect()
    assert alive() is not None, "the buffer of a failed exchange was freed"
