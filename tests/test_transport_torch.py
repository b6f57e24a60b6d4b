"""TorchTransport across real processes: torch.distributed gloo on 127.0.0.1.

Each multi-rank test launches N copies of this file as worker processes
(``python tests/test_transport_torch.py SCENARIO``) with torchrun's or
Open MPI's environment variables, so :func:`init_process_group_from_env`
starts a real gloo group. Inputs derive from (seed, rank): every rank
computes the expected result locally (nccl-tests' "verifiable" idea). A
worker reports through its exit code and output; the harness kills the whole
job past a deadline, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from workers import base_env, exit_after, free_port, run_workers
from conftest import no_gpu

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
WAIT = 20.0  # seconds a healthy collective may take on a loaded 2-core machine
FAULT_TIMEOUT = 3.0  # the timeout the fault test waits with


# ---------------------------------------------------------------------------
# Checks, run inside the workers (one body for any transport and size)
# ---------------------------------------------------------------------------

def _count(seed: int, src: int, dst: int) -> int:
    """Elements rank src sends rank dst in alltoallv: 0..4, zeros included."""
    return (seed + 3 * src + 5 * dst + src * dst) % 5


def _part(seed: int, src: int, dst: int, n: int, dtype) -> np.ndarray:
    """The data src sends dst (small integers: exact in every dtype used)."""
    return ((np.arange(n) + 7 * src + 3 * dst + seed) % 100).astype(dtype)


def check_alltoallv(tr, seed: int, dtype) -> None:
    rank, size = tr.rank, tr.size
    send_counts = [_count(seed, rank, d) for d in range(size)]
    recv_counts = [_count(seed, s, rank) for s in range(size)]
    send = np.concatenate([_part(seed, rank, d, send_counts[d], dtype) for d in range(size)])
    recv = np.full(sum(recv_counts) + 3, 99, dtype=dtype)  # 3 spare elements must stay untouched
    tr.alltoallv(send, send_counts, recv, recv_counts).wait(WAIT)
    expected = np.concatenate([_part(seed, s, rank, recv_counts[s], dtype) for s in range(size)])
    np.testing.assert_array_equal(recv[:len(expected)], expected)
    np.testing.assert_array_equal(recv[len(expected):], np.full(3, 99, dtype=dtype))


def check_allgatherv(tr, seed: int, counts: list[int], dtype) -> None:
    rank = tr.rank
    send = _part(seed, rank, 0, counts[rank], dtype)
    recv = np.full(sum(counts) + 2, 99, dtype=dtype)
    tr.allgatherv(send, recv, counts).wait(WAIT)
    expected = np.concatenate([_part(seed, r, 0, c, dtype) for r, c in enumerate(counts)])
    np.testing.assert_array_equal(recv[:sum(counts)], expected)
    np.testing.assert_array_equal(recv[sum(counts):], np.full(2, 99, dtype=dtype))


def check_ops(tr, seed: int) -> None:
    """Check every TorchTransport operation on ``tr`` (any size)."""
    rank, size = tr.rank, tr.size
    # alltoallv: unequal counts with zeros, several dtypes (moved as bytes).
    for dtype in (np.uint8, np.float32, np.int64, np.float16):
        check_alltoallv(tr, seed, dtype)
    empty = np.zeros(0, np.float32)
    tr.alltoallv(empty, [0] * size, empty, [0] * size).wait(WAIT)
    # allgatherv: unequal counts (a zero among them), equal counts, all zero.
    check_allgatherv(tr, seed, [(seed + 2 * r) % 4 + (r == 1) * 5 for r in range(size)], np.float32)
    check_allgatherv(tr, seed, [0] + [r + 1 for r in range(1, size)], np.uint8)
    check_allgatherv(tr, seed, [6] * size, np.int64)
    check_allgatherv(tr, seed, [0] * size, np.float32)
    # allreduce: exact sums of small integers, float32 and float64.
    for dtype in (np.float32, np.float64):
        buf = (np.arange(1000) % 17 + rank + seed).astype(dtype)
        work = tr.allreduce(buf)
        work.wait(WAIT)
        assert work.test()
        expected = sum((np.arange(1000) % 17 + r + seed).astype(dtype) for r in range(size))
        np.testing.assert_array_equal(buf, expected)
    with_error(ValueError, "float32, float64, int32 or int64", tr.allreduce, np.zeros(4, np.int16))
    with_error(ValueError, "contiguous", tr.allreduce, np.zeros((4, 4), np.float32)[:, 0])
    with_error(ValueError, "one count per rank", tr.allgatherv, empty, empty, [0] * (size + 1))
    # broadcast from the last rank (non-zero when size > 1), a float16 buffer.
    root = size - 1
    buf = _part(seed, rank, 1, 33, np.float16)
    tr.broadcast(buf, root).wait(WAIT)
    np.testing.assert_array_equal(buf, _part(seed, root, 1, 33, np.float16))
    # barrier, polled through test() as well.
    work = tr.barrier()
    work.wait(WAIT)
    assert work.test()
    # allgather_object: sizes differ per rank.
    objs = tr.allgather_object({"rank": rank, "blob": b"x" * (rank * 1000 + seed)}, timeout=WAIT)
    assert objs == [{"rank": r, "blob": b"x" * (r * 1000 + seed)} for r in range(size)]


def with_error(kind, words: str, fn, *args) -> None:
    try:
        fn(*args)
    except kind as exc:
        assert words in str(exc), f"{kind.__name__} without {words!r}: {exc}"
    else:
        raise AssertionError(f"{fn.__name__}{args!r} did not raise {kind.__name__}")


def scenario_ops(seed: int) -> None:
    """Every op on the world group, then split (twice, nested) and node_split."""
    import torch.distributed as dist

    from squinchcomm.transport.torch_dist import TorchTransport

    tr = TorchTransport(timeout=WAIT)
    rank, size = tr.rank, tr.size
    check_ops(tr, seed)

    # split into two colors; keys reverse the order inside each group.
    sub = tr.split(rank % 2, -rank)
    members = sorted((r for r in range(size) if r % 2 == rank % 2), reverse=True)
    assert (sub.size, sub.rank) == (len(members), members.index(rank)), (sub, members)
    assert sub.allgather_object(dist.get_rank(), timeout=WAIT) == members
    check_ops(sub, seed + 1)
    assert tr.split(rank % 2, -rank).group is sub.group  # cached, not created twice

    # A split of a subgroup: only its members call new_group.
    if sub.size > 1:
        inner = sub.split(0, -sub.rank)  # same members, order reversed again
        assert inner.allgather_object(dist.get_rank(), timeout=WAIT) == sorted(members)
        check_ops(inner, seed + 2)

    # node_split: GROUP_RANK (set by the harness for some sizes) names the node.
    node = tr.node_split()
    per_node = int(os.environ.get("TEST_RANKS_PER_NODE", size))
    first = rank // per_node * per_node
    assert node.allgather_object(rank, timeout=WAIT) == list(range(first, first + per_node))
    node.barrier().wait(WAIT)
    tr.barrier().wait(WAIT)


def scenario_fault(seed: int) -> None:
    """The last rank never joins an allreduce; the others must time out."""
    from squinchcomm.errors import TransportError
    from squinchcomm.transport.torch_dist import TorchTransport

    flags = Path(os.environ["TEST_FLAG_DIR"])
    tr = TorchTransport()
    tr.barrier().wait(WAIT)  # every rank is up and connected
    if tr.rank == tr.size - 1:
        # Stay alive (a dead peer would fail the others fast, through a
        # different path) until the others have given up.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(flags.iterdir())) < tr.size - 1:
            time.sleep(0.05)
        return
    buf = np.ones(256, np.float32)
    start = time.monotonic()
    try:
        # Rank 0 passes the timeout; rank 1 relies on the transport's default
        # (SQUINCHCOMM_TIMEOUT, read when the transport is built).
        if tr.rank == 0:
            tr.allreduce(buf).wait(FAULT_TIMEOUT)
        else:
            os.environ["SQUINCHCOMM_TIMEOUT"] = str(FAULT_TIMEOUT)
            tr = TorchTransport()
            assert tr.timeout == FAULT_TIMEOUT
            tr.allreduce(buf).wait()
    except TransportError as exc:
        elapsed = time.monotonic() - start
        assert "allreduce" in str(exc), exc
        assert FAULT_TIMEOUT * 0.9 <= elapsed <= FAULT_TIMEOUT + 5, elapsed
    else:
        raise AssertionError("allreduce completed without the last rank")
    finally:
        (flags / str(tr.rank)).touch()


def scenario_gpu(seed: int) -> None:
    """NCCL process group with CuPy arrays, one rank (a single GPU)."""
    import cupy

    from squinchcomm.transport.torch_dist import TorchTransport

    tr = TorchTransport(timeout=WAIT)
    assert tr.gpu_native and tr.size == 1
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        buf = cupy.arange(1000, dtype=cupy.float32)
        tr.allreduce(buf).wait(WAIT)
        np.testing.assert_array_equal(cupy.asnumpy(buf), np.arange(1000, dtype=np.float32))
        send = cupy.arange(10, dtype=cupy.uint8)
        recv = cupy.zeros(10, dtype=cupy.uint8)
        tr.alltoallv(send, [7], recv, [7]).wait(WAIT)
        np.testing.assert_array_equal(cupy.asnumpy(recv[:7]), np.arange(7))
        recv = cupy.zeros(5, dtype=cupy.float32)
        tr.allgatherv(cupy.ones(5, dtype=cupy.float32), recv, [5]).wait(WAIT)
        assert float(recv.sum()) == 5.0
        tr.broadcast(recv, 0).wait(WAIT)
        tr.barrier().wait(WAIT)
        assert tr.allgather_object("x", timeout=WAIT) == ["x"]
    with_error(ValueError, "NumPy", tr.allreduce, np.zeros(4, np.float32))


def scenario_no_init() -> None:
    """The last rank never calls init; the others' hvd.init("torch") must
    raise TransportError after the library's timeout (it waited for torch's
    30-minute default inside init_process_group)."""
    from squinchcomm.errors import TransportError

    flags = Path(os.environ["TEST_FLAG_DIR"])
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == size - 1:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(flags.iterdir())) < size - 1:
            time.sleep(0.05)
        return
    import squinchcomm.torch as hvd

    start = time.monotonic()
    try:
        hvd.init("torch", timeout=FAULT_TIMEOUT)
    except TransportError as exc:
        elapsed = time.monotonic() - start
        assert "rendezvous" in str(exc) and "every rank" in str(exc).lower(), exc
        assert FAULT_TIMEOUT * 0.9 <= elapsed <= FAULT_TIMEOUT + 10, elapsed
    else:
        raise AssertionError("init completed without the last rank")
    finally:
        (flags / str(rank)).touch()


def worker_main(scenario: str) -> None:
    """Run one scenario in a worker process; exit 0 on success."""
    from squinchcomm.transport.torch_dist import init_process_group_from_env

    if scenario == "no_init":
        return scenario_no_init()

    backend = "nccl" if scenario == "gpu" else "gloo"
    init_process_group_from_env(backend=backend, timeout=60)
    {"ops": scenario_ops, "fault": scenario_fault, "gpu": scenario_gpu}[scenario](
        int(os.environ["TEST_SEED"]))


# ---------------------------------------------------------------------------
# Harness (the pytest side)
# ---------------------------------------------------------------------------

def launch(scenario: str, size: int, seed: int, deadline: float = 50.0, launcher: str = "torchrun",
           extra_env=None) -> None:
    """Run ``scenario`` on ``size`` worker processes; fail with their output if any fails.

    Args:
        launcher: which environment the workers get: ``"torchrun"`` (RANK,
            WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or ``"mpirun"``
            (OMPI_COMM_WORLD_RANK/SIZE and MASTER_PORT; MASTER_ADDR defaults).
        extra_env: a function rank -> dict of more variables.
    """
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        flags = Path(tmp) / "flags"  # workers signal each other through empty files here
        flags.mkdir()
        envs = []
        for rank in range(size):
            env = base_env(TEST_SEED=seed, TEST_FLAG_DIR=flags, MASTER_PORT=port)
            if launcher == "torchrun":
                env.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1")
            else:
                env.update(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE=str(size))
            env.update((extra_env or (lambda r: {}))(rank))
            envs.append(env)
        run_workers(Path(__file__).resolve(), [scenario], envs, deadline,
                    f"{scenario} on {size} ranks")


def _node_env(ranks_per_node: int):
    """Workers told they sit ranks_per_node to a node (torchrun's GROUP_RANK)."""
    return lambda rank: {"GROUP_RANK": str(rank // ranks_per_node),
                         "TEST_RANKS_PER_NODE": str(ranks_per_node)}



@pytest.mark.parametrize("size, launcher, ranks_per_node", [
    (2, "torchrun", 1),  # every rank its own "node"
    (3, "mpirun", 3),    # Open MPI's variables, MASTER_ADDR defaulted, one node
    (4, "torchrun", 2),  # two "nodes" of two
])
def test_all_ops_multiprocess(size, launcher, ranks_per_node):
    launch("ops", size, seed=size * 11, launcher=launcher, extra_env=_node_env(ranks_per_node))


def test_missing_rank_times_out():
    launch("fault", 3, seed=1, deadline=40.0)


def test_rank_that_never_inits_times_out():
    launch("no_init", 3, seed=1, deadline=40.0)


def test_torch_nccl_cupy_single_rank():
    reason = None
    try:
        import cupy

        if not cupy.is_available() or not torch.cuda.is_available():
            reason = "no CUDA GPU for CuPy and torch"
        elif not torch.distributed.is_nccl_available():
            reason = "torch has no NCCL backend"
    except Exception as exc:  # ImportError, or a broken CUDA installation
        reason = f"cupy cannot be imported: {exc}"
    if reason is not None:
        no_gpu(reason)
    launch("gpu", 1, seed=0, deadline=120.0)


# ---------------------------------------------------------------------------
# Single-process checks (no process group is started in the pytest process)
# ---------------------------------------------------------------------------

def test_env_parsing():
    from squinchcomm.transport import torch_dist as td

    assert td._rank_size_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4, "torchrun")
    assert td._rank_size_from_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}) == (2, 3, "mpirun")
    assert td._rank_size_from_env({"PMI_RANK": "0", "PMI_SIZE": "2"}) == (0, 2, "mpirun")
    for env, words in (({}, "RANK and WORLD_SIZE are not set"),
                       ({"RANK": "0"}, "WORLD_SIZE is not set"),
                       ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK is not set"),
                       ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
                       ({"RANK": "2", "WORLD_SIZE": "2"}, "0 <= rank < size")):
        with pytest.raises(ValueError, match=words):
            td._rank_size_from_env(env)
    assert td._default_master_port({}) == td.DEFAULT_MASTER_PORT
    port = td._default_master_port({"PMIX_NAMESPACE": "prterun-host-123@1"})
    assert td.MPI_PORT_BASE <= port < td.MPI_PORT_BASE + td.MPI_PORT_SPAN
    assert port == td._default_master_port({"PMIX_NAMESPACE": "prterun-host-123@1"})


def test_init_errors_name_the_variable(monkeypatch):
    from squinchcomm.transport import torch_dist as td

    for name in list(os.environ):
        if name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") or name.startswith(("OMPI_", "PMI")):
            monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE are not set"):
        td.init_process_group_from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        td.init_process_group_from_env()
    with pytest.raises(ValueError, match="not initialized"):
        td.TorchTransport()


def test_package_imports_no_engine():
    code = ("import sys, squinchcomm, squinchcomm.transport as t; "
            "assert not {'torch', 'cupy', 'mpi4py'} & set(sys.modules), sorted(sys.modules); "
            "assert t.Transport and t.PollingWork; "
            "assert 'TorchTransport' in dir(t)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


if __name__ == "__main__":
    # exit_after skips interpreter shutdown: after the fault test a gloo thread
    # is still blocked in the abandoned allreduce, and joining it would hang.
    exit_after(worker_main, sys.argv[1])
