"""The allreduce benchmark runs under real mpirun and reports sane errors.

One small job at 2 ranks (``-b 64K -e 256K``); the JSON is checked for every
method at every size, the engine's fp32 allreduce is exact to fp32 rounding,
Squinch is lossy but within its two-quantization budget, and every rank got
the same bytes. Nothing about timing is asserted (shared CI machines).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="mpirun not installed (extra: mpi)")


def test_allreduce_benchmark_under_mpirun(tmp_path):
    pytest.importorskip("mpi4py")
    from squinchcomm.bench.allreduce import METHODS

    out = tmp_path / "allreduce.json"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               NUMBA_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ["mpirun", "-n", "2", "--oversubscribe", "-x", "PYTHONPATH", "-x", "NUMBA_NUM_THREADS",
           sys.executable, "-m", "squinchcomm.bench", "allreduce", "-b", "64K", "-e", "256K",
           "-f", "4", "-n", "2", "-w", "1", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # Rank 0 alone prints: one header, not two.
    assert proc.stdout.count("allreduce benchmark") == 1, proc.stdout
    assert "busbw(GB/s)" in proc.stdout and "reduce_encode" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["world_size"] == 2
    rows = {(r["size"], r["method"]): r for r in doc["rows"]}
    assert set(rows) == {(s, m) for s in (64 << 10, 256 << 10) for m in METHODS}
    for (size, method), r in rows.items():
        assert r["bit_identical"], f"{method}@{size}: ranks got different bytes"
        assert r["time_us"] > 0 and r["algbw"] > 0
        if method == "engine_fp32":
            assert r["rel_rms"] < 1e-6
        elif method == "squinch":
            assert 0 < r["rel_rms"] < 0.15
        elif method == "squinch_ef":
            # Error feedback: each call is lossy, their mean is closer than one call.
            assert r["rel_rms_mean_of_calls"] < r["rel_rms"] < 0.3
        else:  # fp16 / bf16 casts
            assert 0 < r["rel_rms"] < 1e-2
    # Wire model: Squinch sends 0.75 / 4 of the fp32 bytes (to block padding).
    sq, fp = rows[(64 << 10, "squinch")], rows[(64 << 10, "engine_fp32")]
    assert sq["wire_mb"] == pytest.approx(fp["wire_mb"] * 0.75 / 4, rel=1e-3)
    stages = {(s["size"], s["method"]) for s in doc["stages"]}
    assert stages == {(s, m) for s in (64 << 10, 256 << 10) for m in METHODS
                      if m != "engine_fp32"}
