"""GPU buffers through the public API: ``codec.*``, ``Communicator`` over NCCL,
``DistributedOptimizer`` and the DDP hook, each bit-identical to the same data
on the CPU path, and in stream order on a non-default stream.

The codec checks run in this process. Everything that needs a process group
(one rank: NCCL cannot put two ranks on one GPU) runs in a fresh worker
process, ``python tests/test_cuda_paths.py CHECK``, which first computes the
CPU result (gloo / MPI singleton) and then the GPU one. The tests skip without
a usable GPU and fail instead when ``SQUINCHCOMM_TEST_GPU=1``; test names with
``torch_`` are the torch-layer part of bench/gpu_check.sh.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, squinch_data
from conftest import cupy_gpu, no_gpu  # noqa: E402
from exact_grads import exact_grads, exact_model  # noqa: E402
from squinch_data import assert_bits_equal  # noqa: E402
from workers import base_env, exit_after, free_port, run_workers  # noqa: E402

from squinchcomm import codec  # noqa: E402

N = 10_007  # odd: a partial last block
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture(scope="module")
def cp():
    return cupy_gpu()


@pytest.fixture(scope="module")
def torch_cuda(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        no_gpu("torch.cuda.is_available() is False")
    return torch


def host_values(seed: int, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))).astype(np.float32)


def same_bits(got, want, what: str):
    assert_bits_equal(np.asarray(got), np.asarray(want), what)


# ---------------------------------------------------------------- codec.* in this process
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_codec_cupy_equals_host(cp, rounding):
    x = host_values(1)
    res = (host_values(2) * np.float32(1e-3)).astype(np.float32)
    want_res = res.copy()
    want = codec.encode(x, rounding=rounding, seed=7, offset=3, residual=want_res)
    d_res = cp.asarray(res)
    got = codec.encode(cp.asarray(x), rounding=rounding, seed=7, offset=3, residual=d_res)
    same_bits(cp.asnumpy(got), want, "encode payload")
    same_bits(cp.asnumpy(d_res), want_res, "encode residual")
    same_bits(cp.asnumpy(codec.decode(got, N)), codec.decode(want, N), "decode")
    stack = np.stack([want, codec.encode(host_values(3))])
    out = host_values(4)
    want_acc = codec.decode_accumulate(stack, N, out.copy(), scale=0.5)
    d_out = cp.asarray(out)
    codec.decode_accumulate(cp.asarray(stack), N, d_out, scale=0.5)
    same_bits(cp.asnumpy(d_out), want_acc, "decode_accumulate")
    same_bits(cp.asnumpy(codec.reduce_encode(cp.asarray(stack), N, scale=0.5, rounding=rounding,
                                             seed=9)),
              codec.reduce_encode(stack, N, scale=0.5, rounding=rounding, seed=9),
              "reduce_encode")


def test_codec_cupy_refuses_overlapping_buffers(cp):
    x = cp.asarray(host_values(5))
    with pytest.raises(ValueError, match="residual overlaps x"):
        codec.encode(x, residual=x)
    payload = codec.encode(x)
    with pytest.raises(ValueError, match="out overlaps payloads"):
        codec.reduce_encode(cp.stack([payload, payload]), N,
                            out=cp.stack([payload, payload])[0])
    big = cp.zeros(2 * N, cp.float32)
    with pytest.raises(ValueError, match="out overlaps"):
        codec.decode(big.view(cp.uint8)[: payload.size], N, out=big[N // 4: N // 4 + N])


def test_codec_debug_mode_checks_each_launch(cp, monkeypatch):
    monkeypatch.setenv("SQUINCHCOMM_CUDA_DEBUG", "1")
    x = host_values(6)
    same_bits(cp.asnumpy(codec.encode(cp.asarray(x))), codec.encode(x), "encode (debug)")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_codec_torch_cuda_equals_cpu(torch_cuda, dtype):
    torch = torch_cuda
    t = torch.from_numpy(host_values(7)).to(getattr(torch, dtype))
    want = codec.encode(t, rounding="stochastic", seed=1)
    got = codec.encode(t.cuda(), rounding="stochastic", seed=1)
    assert got.is_cuda
    same_bits(got.cpu().numpy(), want.numpy(), f"encode {dtype}")
    out_cpu = torch.empty(N, dtype=getattr(torch, dtype))
    out_gpu = out_cpu.cuda()
    codec.decode(want, N, out=out_cpu)
    codec.decode(got, N, out=out_gpu)
    same_bits(out_gpu.cpu().view(torch.int16 if dtype != "float32" else torch.int32).numpy(),
              out_cpu.view(torch.int16 if dtype != "float32" else torch.int32).numpy(),
              f"decode to {dtype}")


def test_codec_torch_follows_the_current_stream(torch_cuda):
    """Work on a non-default torch stream: the codec launches on that stream,
    after the producer's kernels, without a device-wide synchronize."""
    torch = torch_cuda
    src = torch.from_numpy(host_values(8, 1 << 24)).cuda()
    want = codec.encode(src.cpu())
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        x = torch.empty_like(src)
        torch.cuda._sleep(50_000_000)  # delays the stream's next kernels
        x.copy_(src)  # producer on `stream`
        got = codec.encode(x)  # must run after the copy, on `stream`
        done = torch.cuda.Event()
        done.record(stream)
    done.synchronize()
    same_bits(got.cpu().numpy(), want.numpy(), "encode after a producer on a side stream")


# ---------------------------------------------------------------- worker checks
WAIT = 60.0


def check_communicator_nccl():
    """Communicator over NcclTransport (world 1) on CuPy arrays and CUDA
    tensors equals the same calls over MPI on the host, bit for bit."""
    import cupy
    import torch
    from mpi4py import MPI

    from squinchcomm.collectives import Communicator
    from squinchcomm.transport.nccl import NcclTransport

    cpu = Communicator(MPI.COMM_WORLD.Dup(), min_compress_bytes=0, timeout=WAIT)
    gpu = Communicator(NcclTransport(MPI.COMM_WORLD, device=0, timeout=WAIT),
                       min_compress_bytes=0, timeout=WAIT)
    for comp in ("squinch", "bf16", "fp16", "none"):
        for seed in (0, 1):
            x = host_values(10 + seed)
            want = cpu.allreduce(x.copy(), compression=comp, rounding="stochastic", seed=seed)
            got = gpu.allreduce(cupy.asarray(x), compression=comp, rounding="stochastic",
                                seed=seed)
            same_bits(cupy.asnumpy(got), np.asarray(want), f"allreduce {comp} (CuPy)")
            got_t = gpu.allreduce(torch.from_numpy(x).cuda(), compression=comp,
                                  rounding="stochastic", seed=seed)
            assert got_t.is_cuda
            same_bits(got_t.cpu().numpy(), np.asarray(want), f"allreduce {comp} (torch)")
    x = host_values(12)
    same_bits(cupy.asnumpy(gpu.reduce_scatter(cupy.asarray(x))), np.asarray(cpu.reduce_scatter(x)),
              "reduce_scatter")
    same_bits(cupy.asnumpy(gpu.allgather(cupy.asarray(x), compression="squinch")),
              np.asarray(cpu.allgather(x, compression="squinch")), "allgather squinch")
    ef_cpu = Communicator(MPI.COMM_WORLD.Dup(), min_compress_bytes=0, error_feedback=True)
    ef_gpu = Communicator(NcclTransport(MPI.COMM_WORLD, device=0, timeout=WAIT),
                          min_compress_bytes=0, error_feedback=True)
    for step in range(3):
        x = host_values(20 + step)
        want = ef_cpu.allreduce(x.copy(), name="g")
        got = ef_gpu.allreduce(cupy.asarray(x), name="g")
        same_bits(cupy.asnumpy(got), np.asarray(want), f"error feedback step {step}")
    # A non-default CuPy stream: the result is ordered on it.
    with cupy.cuda.Stream(non_blocking=True) as s:
        big = cupy.asarray(host_values(30, 1 << 22))
        got = gpu.allreduce(big)
        s.synchronize()
    same_bits(cupy.asnumpy(got), np.asarray(cpu.allreduce(host_values(30, 1 << 22))),
              "allreduce on a side stream")


def _train(torch, kind, device, steps=3):
    """Averaged gradients of ``steps`` steps (Squinch with error feedback,
    several buckets) through DistributedOptimizer (``zero``: its sharded
    variant, the shards' gradients), DDP + squinch_hook, or FSDP2's
    reduce-scatter object of squinchcomm.torch.fsdp (``fsdp``: called as FSDP
    calls it, on its stream) over the default group; on CUDA inside a
    non-default stream."""
    model = exact_model(torch, device)
    rs = None
    if kind in ("optimizer", "zero"):
        import squinchcomm.torch as hvd

        hvd.init("torch", min_compress_bytes=0, timeout=WAIT)
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), named_parameters=model.named_parameters(),
            compression=hvd.Compression.squinch_with(error_feedback=True), fusion_threshold=40_000,
            shard_optimizer_state=kind == "zero")
        assert len(opt.buckets) > 1, opt.buckets
        run = model
    elif kind == "diloco":
        import functools

        import squinchcomm.torch as hvd

        hvd.init("torch", min_compress_bytes=0, timeout=WAIT)
        # Powers of two wherever a product meets a sum (inner lr, outer momentum,
        # mixing 0.5): a fused multiply-add on the GPU rounds like the CPU's.
        outer = functools.partial(torch.optim.SGD, lr=1.0, momentum=0.5, nesterov=True)
        opt = hvd.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.125), sync_every=2,
                         fragments=2, fragment_sync_delay=1, outer_optimizer=outer,
                         compression=hvd.Compression.squinch_with(error_feedback=True))
        run = model
    elif kind == "fsdp":
        from squinchcomm.torch import fsdp

        rs = fsdp._CompressedReduceScatter(fsdp.FSDPCompression(
            error_feedback=True, min_compress_bytes=0, timeout=WAIT), "unit")
        run, opt = model, torch.optim.SGD(model.parameters(), lr=0.0)
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook

        run = DDP(model, bucket_cap_mb=0.04, device_ids=[0] if device == "cuda" else None)
        run.register_comm_hook(SquinchHookState(min_compress_bytes=0, timeout=WAIT), squinch_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stream = torch.cuda.Stream() if device == "cuda" else None
    grads = []
    for step in range(steps):
        cs = exact_grads(torch, step, 0, device)
        with torch.cuda.stream(stream) if stream is not None else _null():
            opt.zero_grad()
            run(cs).backward()
            if kind in ("optimizer", "zero"):
                opt.synchronize()
            if rs is not None:
                import torch.distributed as dist

                flat = torch.cat([p.grad.reshape(-1) for p in model.ps])
                out = rs.allocate((flat.numel(),), dtype=flat.dtype, device=flat.device)
                rs(out, flat, dist.group.WORLD, dist.ReduceOp.AVG)
                reduced = [out]
            elif kind == "zero":
                reduced = [s.grad for s, *_ in opt._sq_shards]
            elif kind == "diloco":  # the step syncs: the global and local parameters after it
                opt.step()
                reduced = [*opt.global_parameters().values(), *model.ps]
            else:
                reduced = [p.grad for p in model.ps]
            grads += [g.detach().to("cpu", non_blocking=False).clone() for g in reduced]
            if kind != "diloco":
                with opt.skip_synchronize() if kind in ("optimizer", "zero") else _null():
                    opt.step()
    if stream is not None:
        stream.synchronize()
    return [g.numpy() for g in grads]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_torch(kind: str, device: str, out: str):
    """One rank over the default group (gloo on the CPU, NCCL on the GPU):
    save the averaged gradients of every step to ``out`` (.npz)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{os.environ['TEST_PORT']}",
                            rank=0, world_size=1)
    np.savez(out, *_train(torch, kind, device))


def _run_worker(*args: str):
    """Run this file as a one-rank worker; fail with its output if it fails."""
    run_workers(Path(__file__).resolve(), list(args), [base_env(TEST_PORT=free_port())], 240,
                f"worker {args}")


def test_communicator_nccl_equals_host(cp):
    pytest.importorskip("mpi4py")
    _run_worker("communicator")


@pytest.mark.parametrize("kind", ["optimizer", "ddp", "zero", "fsdp", "diloco"])
def test_torch_nccl_on_a_side_stream_equals_cpu(torch_cuda, tmp_path, kind):
    """DistributedOptimizer (and its sharded variant) / the DDP hook / FSDP2's
    compressed reduce-scatter on a CUDA model over a one-rank NCCL group, run
    inside a non-default stream, average to the gradients of the same steps
    on the CPU over gloo, bit for bit (error feedback included); DiLoCo
    (streaming: an exchange in flight across a step) gives the same global
    and local parameters after every step."""
    for device in ("cpu", "cuda"):
        _run_worker("torch", kind, device, str(tmp_path / f"{device}.npz"))
    cpu, gpu = np.load(tmp_path / "cpu.npz"), np.load(tmp_path / "cuda.npz")
    per_step = {"optimizer": 4, "ddp": 4, "fsdp": 1, "diloco": 8}.get(kind)
    assert len(cpu.files) == len(gpu.files) > 0
    assert per_step is None or len(cpu.files) == 3 * per_step
    for name in cpu.files:
        same_bits(gpu[name], cpu[name], f"{kind}: gradient {name}")


def _worker(argv):
    if argv[0] == "torch":
        check_torch(*argv[1:])
    else:
        check_communicator_nccl()
    print(f"{argv}: ok")


if __name__ == "__main__":
    exit_after(_worker, sys.argv[1:])
