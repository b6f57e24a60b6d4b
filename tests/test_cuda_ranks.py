"""GPU buffers across real ranks on one GPU: 2 ranks with CuPy arrays and
CUDA tensors on device 0, over a torch.distributed gloo group (workers
started here, no MPI needed) and over MPI (staged through the host; under
``mpirun`` when it is installed).

Each collective runs twice on the same data, once from host buffers and once
from GPU buffers: the results must be bit-identical to each other and on
every rank. The torch checks (``torch_`` tests: DistributedOptimizer, the DDP
hook, torch CUDA tensors, all on a non-default stream) are the torch part of
bench/gpu_check.sh. Skips without a GPU, fails instead when
``SQUINCHCOMM_TEST_GPU=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a worker script too
from conftest import cupy_gpu  # noqa: E402
from exact_grads import exact_grads, exact_model  # noqa: E402
from workers import base_env, exit_after, free_port, run_workers  # noqa: E402

WAIT = 60.0
pytestmark = pytest.mark.gpu


# ---------------------------------------------------------------- worker side
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


def check_allreduce(cp, comm):
    for compression in ("squinch", "bf16", "fp16", "none"):
        for rounding in ("nearest", "stochastic"):
            x = values(1, comm.rank)
            want = np.asarray(comm.allreduce(x.copy(), compression=compression,
                                             rounding=rounding, seed=5))
            got = cp.asnumpy(comm.allreduce(cp.asarray(x), compression=compression,
                                            rounding=rounding, seed=5))
            same_bits(got, want, f"allreduce {compression} {rounding}")
            same_everywhere(comm, got, "allreduce")


def check_reduce_scatter_allgather_broadcast(cp, comm):
    x = values(2, comm.rank)
    same_bits(cp.asnumpy(comm.reduce_scatter(cp.asarray(x))),
              np.asarray(comm.reduce_scatter(x.copy())), "reduce_scatter")
    same_bits(cp.asnumpy(comm.allgather(cp.asarray(x), compression="squinch")),
              np.asarray(comm.allgather(x.copy(), compression="squinch")), "allgather")
    b = cp.asarray(values(3, comm.rank))
    comm.broadcast(b, root=1 % comm.size)
    same_everywhere(comm, cp.asnumpy(b), "broadcast")


def check_error_feedback_on_a_side_stream(cp, comm):
    from squinchcomm.collectives import ErrorFeedback

    ef_host, ef_gpu = ErrorFeedback(), ErrorFeedback()
    for step in range(3):
        x = values(10 + step, comm.rank)
        want = np.asarray(comm.allreduce(x.copy(), name="g", error_feedback=ef_host))
        with cp.cuda.Stream(non_blocking=True) as s:
            got = comm.allreduce(cp.asarray(x), name="g", error_feedback=ef_gpu)
            s.synchronize()
        same_bits(cp.asnumpy(got), want, f"error feedback step {step}")


def check_torch_cuda_tensors(cp, comm):
    import torch

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        t = torch.from_numpy(values(20, comm.rank)).to(dtype)
        want = comm.allreduce(t.clone())
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            got = comm.allreduce(t.cuda())
        stream.synchronize()
        assert got.is_cuda and got.dtype == dtype
        same_bits(got.cpu().view(bits).numpy(), want.view(bits).numpy(), f"allreduce {dtype}")


def _hvd_grads(torch, comm, device):
    import squinchcomm.torch as hvd

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


def check_torch_distributed_optimizer(cp, comm):
    import torch

    want, got = _hvd_grads(torch, comm, "cpu"), _hvd_grads(torch, comm, "cuda")
    for i, (g, w) in enumerate(zip(got, want)):
        same_bits(g, w, f"DistributedOptimizer gradient {i}")
        same_everywhere(comm, g, f"gradient {i}")


def check_torch_ddp_hook(cp, comm):
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook

    results = {}
    for device in ("cpu", "cuda"):
        model = exact_model(torch, device)
        ddp = DDP(model, bucket_cap_mb=0.04)
        ddp.register_comm_hook(SquinchHookState(min_compress_bytes=0, timeout=WAIT), squinch_hook)
        stream = torch.cuda.Stream() if device == "cuda" else None
        grads = []
        for step in range(3):
            cs = exact_grads(torch, step, comm.rank, device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                ddp(cs).backward()
                grads += [p.grad.cpu().numpy().copy() for p in model.ps]
            model.zero_grad()
        if stream is not None:
            stream.synchronize()
        results[device] = grads
    for i, (g, w) in enumerate(zip(results["cuda"], results["cpu"])):
        same_bits(g, w, f"DDP hook gradient {i}")
        same_everywhere(comm, g, f"DDP gradient {i}")


def check_auto(cp, comm):
    """compression="auto" on GPU buffers: with a stated slow link the bits of
    the host path and of Squinch; a probe on this communicator agrees across
    ranks."""
    from squinchcomm import LinkModel

    comm.set_link_model(LinkModel.from_rates(comm.size, 50e6))
    x = values(3, comm.rank)
    want = np.asarray(comm.allreduce(x.copy(), compression="auto"))
    got = cp.asnumpy(comm.allreduce(cp.asarray(x), compression="auto"))
    same_bits(got, want, "allreduce auto")
    same_bits(want, np.asarray(comm.allreduce(x.copy(), compression="squinch")), "auto = squinch")
    model = comm.measure_link(probe_bytes=[64 << 10, 256 << 10], repeats=1)
    same_everywhere(comm, np.frombuffer(repr(model.to_dict()).encode(), np.uint8), "link model")
    comm.link_model = None


CHECKS = {
    "arrays": [check_allreduce, check_reduce_scatter_allgather_broadcast,
               check_error_feedback_on_a_side_stream, check_auto],
    "torch": [check_torch_cuda_tensors, check_torch_distributed_optimizer, check_torch_ddp_hook],
}


def worker_main(group: str, transport: str) -> None:
    """One rank: build the communicator over ``transport``, run ``group``'s checks."""
    import cupy as cp

    from squinchcomm.collectives import Communicator

    cp.cuda.Device(0).use()
    if transport == "gloo":
        from squinchcomm.transport.torch_dist import init_process_group_from_env

        comm = Communicator(init_process_group_from_env(backend="gloo"), min_compress_bytes=0,
                            timeout=WAIT)
    else:
        from mpi4py import MPI

        comm = Communicator(MPI.COMM_WORLD.Dup(), min_compress_bytes=0, timeout=WAIT)
    for check in CHECKS[group]:
        if check is check_torch_ddp_hook and transport != "gloo":
            continue  # DDP needs a torch.distributed group
        check(cp, comm)
        print(f"rank {comm.rank}: {check.__name__} ok", flush=True)


# ---------------------------------------------------------------- pytest side
@pytest.fixture(scope="module")
def gpu():
    cupy_gpu()


def _run(group: str, transport: str, ranks: int = 2) -> str:
    script = Path(__file__).resolve()
    if transport == "gloo":
        port = free_port()
        envs = [base_env(RANK=r, WORLD_SIZE=ranks, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
                for r in range(ranks)]
        return "\n".join(run_workers(script, [group, transport], envs, 100,
                                     f"{group} over gloo on {ranks} ranks"))
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun is not installed on this machine (the gloo variant covers 2 ranks)")
    env = base_env(OMPI_ALLOW_RUN_AS_ROOT=1, OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
    proc = subprocess.run([mpirun, "-n", str(ranks), "--oversubscribe", sys.executable,
                           str(script), group, transport], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout


# ids without "mpi": pytest-mpi would take that keyword for its own marker.
@pytest.mark.parametrize("transport", ["gloo", "mpi"], ids=["gloo", "mpirun"])
def test_gpu_buffers_across_ranks(gpu, transport):
    out = _run("arrays", transport)
    for check in CHECKS["arrays"]:
        assert out.count(f"{check.__name__} ok") == 2, out


@pytest.mark.parametrize("transport", ["gloo", "mpi"], ids=["gloo", "mpirun"])
def test_torch_cuda_across_ranks(gpu, transport):
    pytest.importorskip("torch")
    out = _run("torch", transport)
    for check in CHECKS["torch"]:
        if check is check_torch_ddp_hook and transport != "gloo":
            continue
        assert out.count(f"{check.__name__} ok") == 2, out


if __name__ == "__main__":
    exit_after(worker_main, sys.argv[1], sys.argv[2])
