"""The training-step benchmark trains for real on 2 ranks (torchrun) and 3 (mpirun).

A tiny model (one layer, width 32) keeps each run to seconds. Checked: every
method's row, finite losses, the tokens/s and speedup columns against the
times they come from, the wire model against the parameter count, identical
parameters on every rank, and that a bad option fails before any collective
(so every rank fails alike instead of one hanging). Nothing about which method
is faster is asserted (one shared machine).
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from squinchcomm.bench import train  # noqa: E402
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--seq", "32", "--batch", "2",
        "--steps", "3", "--warmup", "2", "--sync-every", "3"]


def _env():
    # min_compress_bytes 0: the tiny model's FSDP units (under 64 KiB) compress too
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                NUMBA_NUM_THREADS="1", PYTHONPATH=str(ROOT), SQUINCHCOMM_MIN_COMPRESS_BYTES="0")


def _run(cmd, timeout=240):
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _table(stdout):
    """{method: printed cells} from rank 0's table."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and not line.startswith("#") and cells[0] in train.METHODS:
            rows[cells[0]] = cells[1:]
    return rows


def _check(doc, stdout, methods, world):
    assert stdout.count("training-step benchmark") == 1, stdout  # rank 0 alone prints
    assert doc["world_size"] == world
    params = TinyGPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)).num_params()
    assert doc["params"] == params
    rows = {r["method"]: r for r in doc["rows"]}
    printed = _table(stdout)
    assert list(rows) == list(printed) == methods
    ring = 2 * (world - 1) / world
    base = rows["hvd_fp32"]["time_ms"]
    for m, r in rows.items():
        assert r["params_identical"], f"{m}: ranks ended with different parameters"
        assert printed[m][-2] == "yes"
        # The exposed wait is part of the step (hvd methods), absent for DDP.
        if m.startswith(("ddp_", "fsdp_", "hsdp_")):
            assert r["wait_ms"] is None and printed[m][-1] == "-"
        else:
            assert 0 <= r["wait_ms"] <= max(r["step_times_ms"])
            assert float(printed[m][-1]) == pytest.approx(r["wait_ms"], abs=0.06)
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"])
        assert 0 < r["loss"] < 6  # around ln(256) = 5.55 after a few steps
        assert r["time_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(world * 2 * 32 / (r["time_ms"] / 1e3))
        assert r["speedup"] == pytest.approx(base / r["time_ms"])
        assert float(printed[m][2]) == pytest.approx(base / r["time_ms"], abs=0.006)
        if "diloco" in m:  # one step in H syncs: the mean over the timed steps
            assert r["time_ms"] == pytest.approx(sum(r["step_times_ms"]) / 3)
            assert 0 <= r["exposed_ms"] <= r["exchange_ms"] + 1
        else:
            assert r["time_ms"] == pytest.approx(sorted(r["step_times_ms"])[1])  # median of 3
    # The wire model: fp32 sends every gradient element as 4 bytes, casts 2.
    for m in ("hvd_fp32", "ddp_fp32"):
        if m in rows:
            assert rows[m]["wire_mb"] == pytest.approx(ring * 4 * params / 1e6)
    for m in ("hvd_fp16", "hvd_bf16", "ddp_fp16"):
        if m in rows:
            assert rows[m]["wire_mb"] == pytest.approx(ring * 2 * params / 1e6)
    for m in ("squinch", "squinch_ef", "ddp_squinch"):  # 6-bit blocks: ~0.75 B per element
        if m in rows:
            assert rows[m]["wire_mb"] == pytest.approx(ring * 0.75 * params / 1e6, rel=0.01)
    if "hvd_auto" in rows:  # each bucket in fp32, bf16 or 6-bit blocks: between the extremes
        assert (ring * 0.75 * params / 1e6 * 0.99 <= rows["hvd_auto"]["wire_mb"]
                <= ring * 4 * params / 1e6 * 1.0001)
    # FSDP: fp32 parameter all-gathers (two per block, one for the root unit)
    # and the gradient reduce-scatter, (N-1)/N of each payload.
    block = sum(p.numel() for p in TinyGPT(GPTConfig(block_size=32, n_layer=1, n_head=2,
                                                     n_embd=32)).h[0].parameters())
    gathered = (N1 := (world - 1) / world) * 4 * (params + block)
    if "fsdp_fp32" in rows:
        assert rows["fsdp_fp32"]["wire_mb"] == pytest.approx((gathered + N1 * 4 * params) / 1e6)
    if "fsdp_squinch" in rows:
        assert rows["fsdp_squinch"]["wire_mb"] == pytest.approx(
            (gathered + N1 * 0.75 * params) / 1e6, rel=0.01)
    if "hsdp_squinch" in rows and doc["nodes"] == 1:  # one node: plain FSDP, nothing across
        assert rows["hsdp_squinch"]["wire_mb"] == pytest.approx((gathered + N1 * 4 * params) / 1e6)
    if "fsdp_fp32" in rows:  # exact like hvd_fp32; the compressed one really compresses
        assert rows["fsdp_fp32"]["losses"] == pytest.approx(rows["hvd_fp32"]["losses"], abs=1e-4)
        if "fsdp_squinch" in rows:
            assert rows["fsdp_squinch"]["losses"] != rows["fsdp_fp32"]["losses"]
    if "zero_squinch" in rows:  # 6-bit reduce-scatter, fp32 all-gather: (N-1)/N each
        assert rows["zero_squinch"]["wire_mb"] == pytest.approx(
            N1 * (0.75 + 4) * params / 1e6, rel=0.01)
    # DiLoCo, H = 3 with 2 warm-up steps: the 3 timed steps carry one sync of
    # every parameter (plain: at step 3; streaming: its 3 fragments at 3, 4, 5).
    for m in ("diloco_squinch", "sdiloco_squinch"):
        if m in rows:
            assert rows[m]["wire_mb"] == pytest.approx(ring * 0.75 * params / 1e6 / 3, rel=0.01)
    if "ddp_powersgd4" in rows:  # rank-4 factors: far less than fp32, more than nothing
        assert 0 < rows["ddp_powersgd4"]["wire_mb"] < 0.5 * rows["hvd_fp32"]["wire_mb"]
    # Same initial weights and batches: the two exact methods train alike.
    if "ddp_fp32" in rows:
        assert rows["ddp_fp32"]["losses"] == pytest.approx(rows["hvd_fp32"]["losses"], abs=1e-4)


def test_every_method_under_torchrun(tmp_path):
    out = tmp_path / "train.json"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", "-m", "squinchcomm.bench", "train", *TINY,
                 "--json", str(out)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    _check(json.loads(out.read_text()), proc.stdout, list(train.METHODS), world=2)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (extra: mpi)")
def test_three_ranks_under_mpirun(tmp_path):
    out = tmp_path / "train.json"
    methods = ["hvd_fp32", "squinch_ef", "ddp_powersgd4", "ddp_squinch"]
    proc = _run(["mpirun", "-n", "3", "--oversubscribe", "-x", "PYTHONPATH", "-x",
                 "NUMBA_NUM_THREADS", sys.executable, "-m", "squinchcomm.bench", "train",
                 *TINY, "--methods", ",".join(reversed(methods)), "--json", str(out)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # hvd_fp32, the speedup baseline, runs first whatever the order given
    _check(json.loads(out.read_text()), proc.stdout, ["hvd_fp32", *reversed(methods[1:])],
           world=3)


@pytest.mark.parametrize("argv, match", [
    (["--methods", "hvd_fp32,sqeeze"], "unknown sqeeze; choose a comma list of hvd_fp32"),
    (["--methods", "squinch,squinch"], "names a method twice"),
    (["--methods", "ddp_powersgd4", "--warmup", "1"], "pass --warmup >= 2"),
    (["--steps", "0"], "at least one timed step"),
])
def test_bad_options_fail_before_any_collective(argv, match):
    with pytest.raises(ValueError, match=match):
        train.main(argv)
    assert not torch.distributed.is_initialized()  # so no rank waits for the others


def test_bad_methods_fail_fast_on_every_rank():
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", "-m", "squinchcomm.bench", "train",
                 "--methods", "nope"], timeout=90)
    assert proc.returncode != 0
    assert "--methods 'nope': unknown nope" in proc.stderr, proc.stderr[-3000:]


def test_wire_model():
    n = 1 << 20
    fp32 = train.wire_bytes_per_rank("hvd_fp32", [n], world=4, min_compress_bytes=65536)
    assert fp32 == 1.5 * 4 * n
    assert train.wire_bytes_per_rank("ddp_fp16", [n, n], 4, 65536) == 2 * 1.5 * 2 * n
    sq = train.wire_bytes_per_rank("squinch", [n], 4, 65536)
    assert sq == pytest.approx(1.5 * 0.75 * n, rel=1e-3)
    # squinchcomm sends a buffer under min_compress_bytes uncompressed; torch's hook casts it.
    assert train.wire_bytes_per_rank("ddp_squinch", [1000], 4, 65536) == 1.5 * 4 * 1000
    assert train.wire_bytes_per_rank("hvd_bf16", [1000], 4, 65536) == 1.5 * 4 * 1000
    assert train.wire_bytes_per_rank("ddp_fp16", [1000], 4, 65536) == 1.5 * 2 * 1000
    assert train.wire_bytes_per_rank("squinch", [n], 1, 0) == 0  # one rank sends nothing
