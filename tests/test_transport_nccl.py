"""NcclTransport: world size 1 on a GPU, plus the host-side parts anywhere.

A single GPU cannot host two NCCL ranks, so the GPU tests run one rank (the
self-copy and communicator paths; multi-rank NCCL needs several GPUs). Each
GPU test runs in a fresh process (``python tests/test_transport_nccl.py
SIDE``) with its side channel: a one-rank torch.distributed gloo group, or
mpi4py's COMM_WORLD as a singleton. The GPU tests skip without a usable GPU
and fail instead when ``SQUINCHCOMM_TEST_GPU=1``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import no_gpu
from workers import base_env, exit_after, free_port, run_workers

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0


def _gpu_reason() -> str | None:
    """Why NCCL through CuPy cannot run here, or None if it can."""
    try:
        import cupy
        from cupy.cuda import nccl
    except Exception as exc:  # ImportError, or a broken CUDA installation
        return f"cupy cannot be imported: {exc}"
    if not cupy.is_available():
        return "cupy.is_available() is False"
    if not nccl.available:
        return "CuPy cannot load NCCL"
    return None


@pytest.fixture(scope="module")
def gpu():
    """Skip without a GPU and NCCL (fail when SQUINCHCOMM_TEST_GPU=1)."""
    reason = _gpu_reason()
    if reason is not None:
        no_gpu(f"no usable CUDA GPU: {reason}")


# ---------------------------------------------------------------------------
# The single-rank checks (run in a worker process)
# ---------------------------------------------------------------------------

def check_single_rank(tr) -> None:
    """Every operation at world size 1, on a non-default stream."""
    import cupy

    from squinchcomm.transport.nccl import NcclTransport

    assert (tr.rank, tr.size) == (0, 1)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        # allreduce: the identity at size 1; float64 too; int refused.
        for dtype in (cupy.float32, cupy.float64):
            buf = cupy.arange(1 << 16, dtype=dtype)
            work = tr.allreduce(buf)
            work.wait(WAIT)
            assert work.test()
            np.testing.assert_array_equal(cupy.asnumpy(buf), np.arange(1 << 16, dtype=dtype))
        # alltoallv: the rank's own part is a device copy; zero counts too.
        send = cupy.arange(100, dtype=cupy.float16)
        recv = cupy.full(100, 7, dtype=cupy.float16)
        tr.alltoallv(send, [60], recv, [60]).wait(WAIT)
        np.testing.assert_array_equal(cupy.asnumpy(recv[:60]), np.arange(60, dtype=np.float16))
        np.testing.assert_array_equal(cupy.asnumpy(recv[60:]), np.full(40, 7, np.float16))
        tr.alltoallv(send, [0], recv, [0]).wait(WAIT)
        # allgatherv: ncclAllGather at size 1.
        recv = cupy.zeros(9, dtype=cupy.uint8)
        tr.allgatherv(cupy.arange(9, dtype=cupy.uint8), recv, [9]).wait(WAIT)
        np.testing.assert_array_equal(cupy.asnumpy(recv), np.arange(9))
        # broadcast, barrier, allgather_object.
        buf = cupy.arange(33, dtype=cupy.int64)
        tr.broadcast(buf, 0).wait(WAIT)
        np.testing.assert_array_equal(cupy.asnumpy(buf), np.arange(33))
        tr.barrier().wait(WAIT)
        assert tr.allgather_object({"a": 1}, timeout=WAIT) == [{"a": 1}]
    for fn, args, words in ((tr.allreduce, (np.zeros(4, np.float32),), "CuPy arrays"),
                            (tr.allreduce, (cupy.zeros(4, cupy.int16),), "float32, float64, int32 or int64"),
                            (tr.broadcast, (cupy.zeros(4), 1), "root=1"),
                            (tr.alltoallv, (cupy.zeros(4), [1, 1], cupy.zeros(4), [1]), "one count")):
        try:
            fn(*args)
        except ValueError as exc:
            assert words in str(exc), exc
        else:
            raise AssertionError(f"{fn.__name__} did not raise ValueError")
    # split and node_split build new communicators over the side channel.
    sub = tr.split(0, 0)
    assert isinstance(sub, NcclTransport) and sub.size == 1
    sub.barrier().wait(WAIT)
    node = tr.node_split()
    assert node.size == 1
    node.allreduce(cupy.ones(3, cupy.float32)).wait(WAIT)
    for t in (sub, node, tr):
        t.close()


def worker_main(side_kind: str) -> None:
    """Build a one-rank side channel of ``side_kind``, then run the checks."""
    from squinchcomm.transport.nccl import NcclTransport

    if side_kind == "torch":
        import torch.distributed as dist

        from squinchcomm.transport.torch_dist import TorchTransport

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['TEST_PORT']}",
                                rank=0, world_size=1)
        side = TorchTransport(timeout=WAIT)
    else:
        from mpi4py import MPI

        side = MPI.COMM_WORLD
    check_single_rank(NcclTransport(side, device=0, timeout=WAIT))


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("side_kind, module", [("torch", "torch"), ("mpi", "mpi4py")])
def test_single_rank_gpu(gpu, side_kind, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (the {side_kind} side channel)")
    run_workers(Path(__file__).resolve(), [side_kind], [base_env(TEST_PORT=free_port())], 180,
                f"the NCCL worker over a {side_kind} side channel")


def test_import_needs_no_gpu():
    code = ("import sys; import squinchcomm.transport.nccl as m; "
            "assert 'cupy' not in sys.modules and 'torch' not in sys.modules; "
            "assert m.NcclTransport.gpu_native")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_unique_id_both_cupy_versions():
    from squinchcomm.transport.nccl import _uid_for_cupy, _uid_to_bytes

    raw = bytes(range(128))[::-1]
    signed = tuple(b - 256 if b > 127 else b for b in raw)  # CuPy 13's get_unique_id()
    assert _uid_to_bytes(signed) == raw
    assert _uid_to_bytes(raw) == raw  # CuPy 14's
    assert _uid_to_bytes(np.frombuffer(raw, np.int8)) == raw
    assert _uid_for_cupy(raw, "14.0.1") == raw
    assert _uid_for_cupy(raw, "13.3.0") == signed


def test_bad_side_channel_and_no_gpu():
    from squinchcomm.transport.nccl import NcclTransport, _side_channel

    with pytest.raises(ValueError, match="side channel|mpi4py communicator"):
        _side_channel(object())
    if _gpu_reason() == "cupy.is_available() is False":
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            NcclTransport(object())


if __name__ == "__main__":
    exit_after(worker_main, sys.argv[1])
