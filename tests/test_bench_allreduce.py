"""The collective benchmarks run under real mpirun / torchrun and report sane rows.

Small jobs (64K-256K, -n 2 -w 0) at 2, 3 and 4 ranks over MPI and torch gloo,
for allreduce, reduce_scatter and allgather with every method. Checked from
the JSON: a row per method and size, busbw = algbw * the nccl-tests factor
(recomputed here from the formula), the wire model, errors within what each
method can do, bit-identical results. Bad arguments fail alike on every rank,
quickly. Nothing about timing is asserted (shared CI machines).
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers import base_env, free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="mpirun not installed (extra: mpi)")
KB = 1 << 10


def _mpirun(n, args, timeout=300):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ["mpirun", "-n", str(n), "--oversubscribe", "-x", "PYTHONPATH", "-x",
           "NUMBA_NUM_THREADS", "-x", "OMP_NUM_THREADS", sys.executable, "-m",
           "squinchcomm.bench", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _bench(tmp_path, n, args, launcher="mpirun"):
    """Run a benchmark job; return (stdout, JSON document)."""
    out = tmp_path / "bench.json"
    args = [*args, "--json", str(out)]
    if launcher == "torchrun":
        pytest.importorskip("torch")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", "-m", "squinchcomm.bench", *args]
        proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=300,
                              cwd=ROOT)
    else:
        proc = _mpirun(n, args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout, json.loads(out.read_text())


def _check(doc, collective, methods, sizes, itemsize=4):
    """Rows for every method and size; formulas; errors plausible for each method."""
    world = doc["world_size"]
    factor = (2 if collective == "allreduce" else 1) * (world - 1) / world
    rows = {(r["size"], r["method"]): r for r in doc["rows"]}
    assert doc["collective"] == collective
    assert set(rows) == {(s, m) for s in sizes for m in methods}
    for (size, method), r in rows.items():
        count = size // itemsize
        assert r["collective"] == collective and r["count"] == count
        if collective != "allreduce":
            assert count % world == 0  # equal per-rank parts, nccl-tests style
        assert r["time_us"] > 0
        assert r["algbw"] == pytest.approx(size / (r["time_us"] * 1e-6) / 1e9)
        assert r["busbw"] == pytest.approx(r["algbw"] * factor)
        wire = {"engine_fp32": 4 * count if collective != "allgather" else itemsize * count,
                "squinch": 6 * math.ceil(count / 8),
                "squinch_ef": 6 * math.ceil(count / 8)}.get(method, 2 * count)
        if method == "auto":  # one of fp32, bf16, Squinch: the wire says which, its error agrees
            fp32 = 4 * count if collective != "allgather" else itemsize * count
            picks = [(w, m) for w, m in ((fp32, "engine_fp32"), (2 * count, "bf16"),
                                         (6 * math.ceil(count / 8), "squinch"))
                     if factor * w / 1e6 == pytest.approx(r["wire_mb"], rel=1e-3)]
            if len(picks) > 1:  # fp16 all-gathered uncompressed also sends 2 B, exactly
                picks = [p for p in picks if (p[1] == "engine_fp32") == (r["rel_rms"] == 0)]
            assert len(picks) == 1, (r, picks)
            wire, method = picks[0]
        if not method.startswith(("powersgd", "squinch_hier")):
            assert r["wire_mb"] == pytest.approx(factor * wire / 1e6, rel=1e-3), method
        if collective == "reduce_scatter":
            assert r["bit_identical"] is None  # shards differ by design
        else:
            assert r["bit_identical"], f"{method}@{size}: ranks got different bytes"
        rel = r["rel_rms"]
        if method == "engine_fp32":
            assert rel == 0 if collective == "allgather" else rel < 1e-6, r
        elif method in ("squinch", "squinch_hier"):
            assert 0.01 < rel < 0.1, r
        elif method in ("squinch_ef", "squinch_hier_ef"):
            # Each call also pays back earlier residuals; their mean is closer.
            assert r["rel_rms_mean_of_calls"] < rel < 0.15, r
        elif method.startswith("powersgd"):
            # Gaussian noise has no low-rank structure: about all of it is error.
            assert math.isfinite(rel) and math.isfinite(r["max_err"]) and rel < 2, r
        elif method.endswith("fp16"):
            assert rel < 1e-3, r  # 0 when the input already is fp16
        else:  # bf16 casts
            assert 0 < rel < 1e-2, r
    return rows


def test_allreduce_mpi_two_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    out, doc = _bench(tmp_path, 2, ["allreduce", "-b", "64K", "-e", "256K", "-f", "4",
                                    "-n", "2", "-w", "0"])
    assert out.count("allreduce benchmark") == 1, out  # rank 0 alone prints
    assert "busbw(GB/s)" in out and "reduce_encode" in out and "avg busbw" in out
    # Over MPI the default is everything MPI can run; one node: no hierarchy.
    methods = ["engine_fp32", "squinch", "squinch_ef", "fp16", "bf16", "auto"]
    assert doc["methods"] == methods
    assert list(doc["not_run"]) == ["squinch_hier, squinch_hier_ef"]
    _check(doc, "allreduce", methods, [64 * KB, 256 * KB])
    # Stages of the compressed path (auto's only at sizes where it picked one).
    staged = {(s["size"], s["method"]) for s in doc["stages"]}
    assert {x for x in staged if x[1] != "auto"} == {
        (s, m) for s in (64 * KB, 256 * KB) for m in methods if m not in ("engine_fp32", "auto")}
    assert len(doc["peak_rss_mb"]) == 2 and min(doc["peak_rss_mb"]) > 0


def test_allreduce_torch_hooks_in_place(tmp_path):
    """Every torch method, PyTorch's hooks included, under torchrun, in place."""
    _, doc = _bench(tmp_path, 2, ["allreduce", "--transport", "torch", "--inplace", "-b", "256K",
                                  "-e", "256K", "-n", "2", "-w", "0"], launcher="torchrun")
    methods = ["engine_fp32", "engine_bf16", "ddp_fp16", "ddp_bf16", "powersgd1", "powersgd4",
               "squinch", "squinch_ef", "fp16", "bf16", "auto"]
    rows = _check(doc, "allreduce", methods, [256 * KB])
    # 64K elements are one 64 x 1024 matrix: PowerSGD allreduces P (64 x r) and
    # Q (1024 x r) in fp32, so it must have run compressed.
    for rank in (1, 4):
        r = rows[(256 * KB, f"powersgd{rank}")]
        assert r["wire_mb"] == pytest.approx((64 + 1024) * rank * 4 / 1e6)


@pytest.mark.parametrize("collective", ["reduce_scatter", "allgather"])
def test_reduce_scatter_allgather_mpi_three_ranks(tmp_path, collective):
    pytest.importorskip("mpi4py")
    _, doc = _bench(tmp_path, 3, [collective, "-b", "64K", "-e", "64K", "-n", "2", "-w", "0"])
    methods = ["engine_fp32", "squinch", "squinch_ef", "fp16", "bf16", "auto"]
    if collective == "allgather":
        methods.remove("squinch_ef")
    count = (64 * KB // 4) // 3 * 3  # rounded down to a multiple of 3
    _check(doc, collective, methods, [count * 4])


@pytest.mark.parametrize("collective", ["reduce_scatter", "allgather"])
def test_reduce_scatter_allgather_torch_fp16(tmp_path, collective):
    pytest.importorskip("torch")
    _, doc = _bench(tmp_path, 2, [collective, "--transport", "torch", "-d", "float16",
                                  "-b", "64K", "-e", "64K", "-n", "2", "-w", "0"])
    methods = ["engine_fp32", "squinch", "squinch_ef", "fp16", "bf16", "auto"]
    if collective == "allgather":
        methods.remove("squinch_ef")
    rows = _check(doc, collective, methods, [64 * KB], itemsize=2)
    assert rows[(64 * KB, "squinch")]["type"] == "float16"


def test_hierarchical_mpi_four_ranks_bfloat16(tmp_path):
    """Two simulated nodes of two ranks; bfloat16 buffers (torch tensors over MPI)."""
    pytest.importorskip("mpi4py")
    pytest.importorskip("torch")
    methods = ["squinch_hier", "squinch_hier_ef"]
    _, doc = _bench(tmp_path, 4, ["allreduce", "--node-size", "2", "-d", "bfloat16",
                                  "--methods", ",".join(methods), "-b", "64K", "-e", "64K",
                                  "-n", "2", "-w", "0"])
    rows = _check(doc, "allreduce", methods, [64 * KB], itemsize=2)
    # Only the cross-node bytes: 2 nodes, each rank sends half of its node's
    # half-tensor slice's Squinch payload.
    count = 64 * KB // 2
    hier = 2 * (2 - 1) / 2 * 6 * math.ceil(count / 2 / 8)
    assert rows[(64 * KB, "squinch_hier")]["wire_mb"] == pytest.approx(hier / 1e6)


@pytest.mark.parametrize("args, message", [
    (["allreduce", "--methods", "squinch,nope"], "allreduce offers engine_fp32"),
    (["allreduce", "--methods", "engine_bf16"], "MPI has no bfloat16 datatype"),
    (["allreduce", "--methods", "ddp_fp16"], "use --transport torch"),
    (["reduce_scatter", "--inplace"], "only allreduce takes out="),
    (["allreduce", "--methods", "squinch_hier"], "one node holds all 2 ranks"),
    (["allreduce", "--node-size", "3"], "--node-size 3 does not divide the world size 2"),
])
def test_bad_arguments_fail_quickly_under_mpirun(args, message):
    pytest.importorskip("mpi4py")
    t0 = time.monotonic()
    proc = _mpirun(2, [*args, "-b", "64K", "-e", "64K", "-n", "1", "-w", "0"], timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 100


def test_unusable_hierarchy_fails_alike_on_every_torch_rank():
    """Found after the process group is up: every rank must exit, none wait."""
    pytest.importorskip("torch")
    port, world = free_port(), 2
    procs = [subprocess.Popen(
        [sys.executable, "-m", "squinchcomm.bench", "allreduce", "--transport", "torch",
         "--methods", "squinch,squinch_hier_ef", "-b", "64K", "-e", "64K", "-n", "1"],
        env=base_env(RANK=r, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for r in range(world)]
    try:
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [2] * world, errors
    lines = [[x for x in e.splitlines() if "error:" in x] for e in errors]
    assert lines[0] == lines[1] and "one node holds all 2 ranks" in lines[0][0], errors
