"""The README's main job, run for real: 4 MPI ranks (mpirun), small tensor."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (extra: mpi)")
def test_codec_allreduce_demo_under_mpirun():
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               NUMBA_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ["mpirun", "-n", "4", "--oversubscribe", "-x", "PYTHONPATH", "-x", "NUMBA_NUM_THREADS",
           sys.executable, str(ROOT / "examples" / "codec_allreduce_demo.py"),
           "--mib", "1", "--steps", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "results bit-identical on all ranks: yes" in out
    assert "ranks 4" in out
    # Two 6-bit quantizations of t(3) data averaged over 4 ranks: well under 20% RMS.
    errors = out.split("relative RMS error vs exact fp64 average:")[1]
    per_step = float(errors.split()[0])
    summed = float(errors.split("per step,")[1].split()[0])
    assert 0 < per_step < 0.2
    assert summed < per_step  # error feedback: the running sum is more accurate than a step
    assert "(5.33x less)" in out  # 2(N-1)/N * 4 B vs 2(N-1)/N * 0.75 B per element
