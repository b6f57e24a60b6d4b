"""GPU buffers across real ranks on one GPU: every rank's CuPy arrays and
CUDA tensors on device 0, over MPI (staged through the host) or, with
``SQUINCHCOMM_TEST_TRANSPORT=torch``, over a torch.distributed gloo group.

Run: ``mpirun -n 2 python -m mpi4py -m pytest --with-mpi tests/mpi/test_cuda_ranks.py``
(bench/gpu_check.sh does, both transports). Each collective runs twice on the
same data, once from host buffers and once from GPU buffers: the results must
be bit-identical to each other and on every rank. Skips without a GPU, fails
instead when ``SQUINCHCOMM_TEST_GPU=1``; tests named ``torch_`` are the torch
layer's part of the device check.
"""

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.gpu]
MPI = pytest.importorskip("mpi4py.MPI")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: exact_grads
from exact_grads import exact_grads, exact_model  # noqa: E402


def _no_gpu(reason):
    if os.environ.get("SQUINCHCOMM_TEST_GPU") == "1":
        pytest.fail(f"SQUINCHCOMM_TEST_GPU=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cp():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            _no_gpu("no CUDA device")
    except Exception as exc:
        _no_gpu(f"CuPy cannot reach a GPU: {exc}")
    return cupy


@pytest.fixture(scope="module")
def comm(cp):
    from squinchcomm.collectives import Communicator

    if os.environ.get("SQUINCHCOMM_TEST_TRANSPORT", "mpi") == "torch":
        from squinchcomm.transport.torch_dist import init_process_group_from_env

        pg = init_process_group_from_env(backend="gloo")
        return Communicator(pg, min_compress_bytes=0, timeout=60)
    return Communicator(MPI.COMM_WORLD.Dup(), min_compress_bytes=0, timeout=60)


def values(seed, rank, n=20_011):
    rng = np.random.default_rng([seed, rank])
    return (rng.standard_normal(n) * np.exp(rng.uniform(-6, 6, n))).astype(np.float32)


def same_bits(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert got.tobytes() == want.tobytes(), f"{what}: GPU result differs from the host's"


def same_everywhere(comm, arr, what):
    digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    assert len(set(comm.allgather_object(digest))) == 1, f"{what}: ranks differ"


@pytest.mark.parametrize("compression", ["squinch", "bf16", "fp16", "none"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_allreduce_gpu_equals_host(cp, comm, compression, rounding):
    x = values(1, comm.rank)
    want = np.asarray(comm.allreduce(x.copy(), compression=compression, rounding=rounding,
                                     seed=5))
    got = cp.asnumpy(comm.allreduce(cp.asarray(x), compression=compression, rounding=rounding,
                                    seed=5))
    same_bits(got, want, f"allreduce {compression} {rounding}")
    same_everywhere(comm, got, "allreduce")


def test_reduce_scatter_allgather_gpu_equal_host(cp, comm):
    x = values(2, comm.rank)
    same_bits(cp.asnumpy(comm.reduce_scatter(cp.asarray(x))),
              np.asarray(comm.reduce_scatter(x.copy())), "reduce_scatter")
    same_bits(cp.asnumpy(comm.allgather(cp.asarray(x), compression="squinch")),
              np.asarray(comm.allgather(x.copy(), compression="squinch")), "allgather")
    b = cp.asarray(values(3, comm.rank))
    comm.broadcast(b, root=1 % comm.size)
    same_everywhere(comm, cp.asnumpy(b), "broadcast")


def test_error_feedback_and_side_stream_gpu_equal_host(cp, comm):
    from squinchcomm.collectives import ErrorFeedback

    ef_host, ef_gpu = ErrorFeedback(), ErrorFeedback()
    for step in range(3):
        x = values(10 + step, comm.rank)
        want = np.asarray(comm.allreduce(x.copy(), name="g", error_feedback=ef_host))
        with cp.cuda.Stream(non_blocking=True) as s:
            got_d = comm.allreduce(cp.asarray(x), name="g", error_feedback=ef_gpu)
            s.synchronize()
        same_bits(cp.asnumpy(got_d), want, f"error feedback step {step}")


def test_torch_cuda_tensors_equal_host(cp, comm):
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.from_numpy(values(20, comm.rank)).to(dtype)
        want = comm.allreduce(t.clone())
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            d = t.cuda()
            got = comm.allreduce(d)
        stream.synchronize()
        assert got.is_cuda and got.dtype == dtype
        same_bits(got.cpu().view(torch.int16 if dtype != torch.float32 else torch.int32).numpy(),
                  want.view(torch.int16 if dtype != torch.float32 else torch.int32).numpy(),
                  f"allreduce {dtype}")


def _hvd_grads(torch, hvd, comm, device):
    ps = list(exact_model(torch, device).ps)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(ps, lr=0.0),
                                   named_parameters=[(f"p{i}", p) for i, p in enumerate(ps)],
                                   compression=hvd.Compression.squinch_with(error_feedback=True),
                                   fusion_threshold=40_000, communicator=comm)
    stream = torch.cuda.Stream() if device == "cuda" else None
    out = []
    for step in range(3):
        cs = exact_grads(torch, step, comm.rank, device)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            opt.zero_grad()
            sum((p * c).sum() for p, c in zip(ps, cs)).backward()
            opt.synchronize()
            out += [p.grad.cpu().numpy().copy() for p in ps]
            with opt.skip_synchronize():
                opt.step()
    opt.remove_hooks()
    return out


def test_torch_distributed_optimizer_cuda_equals_cpu(cp, comm):
    torch = pytest.importorskip("torch")
    import squinchcomm.torch as hvd

    want = _hvd_grads(torch, hvd, comm, "cpu")
    got = _hvd_grads(torch, hvd, comm, "cuda")
    for i, (g, w) in enumerate(zip(got, want)):
        same_bits(g, w, f"DistributedOptimizer gradient {i}")
        same_everywhere(comm, g, f"gradient {i}")


def test_torch_ddp_hook_cuda_equals_cpu(cp, comm):
    torch = pytest.importorskip("torch")
    if os.environ.get("SQUINCHCOMM_TEST_TRANSPORT", "mpi") != "torch":
        pytest.skip("DDP needs a torch.distributed group (SQUINCHCOMM_TEST_TRANSPORT=torch)")
    from torch.nn.parallel import DistributedDataParallel as DDP

    from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook

    results = {}
    for device in ("cpu", "cuda"):
        model = exact_model(torch, device)
        ddp = DDP(model, bucket_cap_mb=0.04)
        ddp.register_comm_hook(SquinchHookState(min_compress_bytes=0, timeout=60), squinch_hook)
        stream = torch.cuda.Stream() if device == "cuda" else None
        grads = []
        for step in range(3):
            cs = exact_grads(torch, step, comm.rank, device)
            if stream is not None:
                with torch.cuda.stream(stream):
                    ddp(cs).backward()
                    grads += [p.grad.cpu().numpy().copy() for p in model.ps]
            else:
                ddp(cs).backward()
                grads += [p.grad.numpy().copy() for p in model.ps]
            model.zero_grad()
        results[device] = grads
    for i, (g, w) in enumerate(zip(results["cuda"], results["cpu"])):
        same_bits(g, w, f"DDP hook gradient {i}")
        same_everywhere(comm, g, f"DDP gradient {i}")
