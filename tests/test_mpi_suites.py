"""Run the collective suites under real mpirun at 1-4 ranks, over MPI and over
torch.distributed gloo, and the MPI fault jobs.

Each suite runs as ``mpirun -n N python -m mpi4py -m pytest --with-mpi tests/mpi``
(mpi4py's runner aborts the whole job if one rank fails, so a failure cannot
deadlock), inside a wall-clock timeout.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="mpirun not installed (extra: mpi)")


def _env():
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                NUMBA_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _mpirun(n, args, timeout, transport="mpi"):
    env = dict(_env(), SQUINCHCOMM_TEST_TRANSPORT=transport)
    cmd = ["mpirun", "-n", str(n), "--oversubscribe", "-x", "PYTHONPATH", "-x",
           "NUMBA_NUM_THREADS", "-x", "SQUINCHCOMM_TEST_TRANSPORT", sys.executable, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.mark.parametrize("ranks, transport", [(1, "mpi"), (2, "mpi"), (3, "mpi"), (4, "mpi"),
                                              (3, "torch"), (4, "torch")])
def test_collective_suite(ranks, transport):
    pytest.importorskip("torch") if transport == "torch" else None
    proc = _mpirun(ranks, ["-m", "mpi4py", "-m", "pytest", "--with-mpi", "-q", "-p",
                           "no:cacheprovider", "--color=no", "tests/mpi"], timeout=600,
                   transport=transport)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"\d+ passed", out), out[-2000:]


def test_absent_rank_gives_transport_error_not_a_hang():
    timeout = 3.0
    t0 = time.monotonic()
    proc = _mpirun(3, ["tests/mpi/fault_job.py", "absent", str(timeout)], timeout=120)
    elapsed = time.monotonic() - t0
    lines = proc.stdout.splitlines()
    for rank in (0, 2):
        line = next((x for x in lines if x.startswith(f"rank {rank}:")), None)
        assert line is not None and "TransportError after" in line, proc.stdout + proc.stderr
        waited = float(line.split("after")[1].split()[0])
        assert timeout <= waited < timeout + 5
        assert "did not complete within 3 s" in line
        retry = next((x for x in lines if x.startswith(f"retry {rank}:")), None)
        assert retry is not None and "TransportError after" in retry, proc.stdout
        assert float(retry.split("after")[1].split()[0]) < 1.0  # at once, not another timeout
        assert "earlier collective" in retry and "rebuild" in retry, retry
    assert elapsed < 100


def test_rank_that_never_inits_gives_transport_error_not_a_hang():
    """The blocking COMM_WORLD.Dup() waited forever for a rank that never
    called init; construction honours the timeout like every collective."""
    timeout = 3.0
    proc = _mpirun(3, ["tests/mpi/fault_job.py", "no_init", str(timeout)], timeout=120)
    lines = proc.stdout.splitlines()
    for rank in (0, 2):
        line = next((x for x in lines if x.startswith(f"rank {rank}:")), None)
        assert line is not None and "TransportError after" in line, proc.stdout + proc.stderr
        assert timeout <= float(line.split("after")[1].split()[0]) < timeout + 5
        assert "duplication of COMM_WORLD" in line and "hvd.init()" in line, line


def test_dead_rank_ends_the_job():
    t0 = time.monotonic()
    proc = _mpirun(3, ["tests/mpi/fault_job.py", "dies", "5"], timeout=120)
    assert proc.returncode != 0  # mpirun tears the job down; nobody hangs
    assert time.monotonic() - t0 < 100



@pytest.mark.parametrize("compression", ["squinch", "none"])
def test_sizes_that_differ_with_the_check_off_raise_not_crash(compression):
    """With check_metadata off, 100k vs 200k elements crashed the job at a
    later free (rc 134): Open MPI writes past a receive buffer when a peer
    sends more than its count (MPI_ERR_TRUNCATE after the overrun). On MPI
    the sizes are agreed even with the check off, so every rank raises the
    same MismatchError and nothing is written."""
    proc = _mpirun(2, ["tests/mpi/fault_job.py", f"size_unchecked:{compression}", "20"],
                   timeout=120)
    out = proc.stdout + proc.stderr
    assert "Signal:" not in out and "invalid pointer" not in out, out[-3000:]
    lines = sorted(x for x in proc.stdout.splitlines() if x.startswith("rank "))
    assert len(lines) == 2, out[-3000:]
    messages = {x.split(":", 1)[1] for x in lines}
    assert len(messages) == 1, lines  # the same message on every rank
    assert "MismatchError" in lines[0] and "rank 0=(100000,), rank 1=(200000,)" in lines[0], lines
