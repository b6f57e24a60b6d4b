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


def _run(cmd, timeout=300):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout


def _losses(out):
    return [float(line.split("train loss")[1].split()[0]) for line in out.splitlines()
            if "train loss" in line]


SMALL = ["--layers", "1", "--width", "64", "--heads", "2", "--seq", "64", "--batch", "4"]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (extra: mpi)")
def test_gpt_training_example_under_mpirun():
    out = _run(["mpirun", "-n", "2", "--oversubscribe", "-x", "PYTHONPATH", sys.executable,
                str(ROOT / "examples" / "gpt_train.py"), "--steps", "30", "--eval-every", "15",
                "--lr", "1e-2", *SMALL])
    assert "ranks 2" in out and "compression squinch" in out and "tokens/s" in out
    losses = _losses(out)
    assert len(losses) == 2 and all(0 < v < 6 for v in losses)
    assert losses[-1] < 5.0  # below the uniform-bytes entropy ln(256) = 5.55: it learns


def test_gpt_training_example_under_torchrun():
    pytest.importorskip("torch")
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(ROOT / "examples" / "gpt_train.py"),
                "--steps", "4", "--eval-every", "2", *SMALL])
    assert "ranks 2" in out and len(_losses(out)) == 2


def test_ddp_example_with_the_hook():
    pytest.importorskip("torch")
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(ROOT / "examples" / "ddp_squinch.py"),
                "--steps", "3", "--hook", "squinch", "--layers", "1", "--width", "64",
                "--heads", "2"])
    assert "# ranks 2  hook squinch" in out
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1]) for line in steps] == [3]
    assert 0 < float(steps[0].split("loss")[1].split()[0]) < 6
    # The example's claim: every rank ends with the same weights (sha256 of the parameters,
    # all-gathered), since the hook gives every rank the same averaged gradients.
    final = [line for line in out.splitlines() if line.startswith("val loss")]
    assert len(final) == 1 and final[0].endswith("parameters identical on all ranks: yes"), out


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (extra: mpi)")
def test_synthetic_benchmark_runs_every_compression():
    out = _run(["mpirun", "-n", "2", "--oversubscribe", "-x", "PYTHONPATH", sys.executable,
                str(ROOT / "examples" / "synthetic_benchmark.py"), "--num-iters", "1",
                "--num-batches-per-iter", "1", "--num-warmup-batches", "1",
                "--layers", "1", "--width", "64", "--seq", "64", "--batch", "2"])
    for name in ("none", "fp16", "bf16", "squinch"):
        assert f"{name:>8}:" in out and "tokens/s per rank" in out


def _torchrun_one_rank(*args):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "1", str(ROOT / "examples" / "gpt_train.py"), *SMALL, *args])


def test_gpt_example_switches_on_zreg_relu2_clamping_and_packed_documents():
    pytest.importorskip("torch")
    out = _torchrun_one_rank("--steps", "4", "--eval-every", "2", "--zreg", "1e-3",
                             "--mlp-act", "relu2", "--clamp", "weight", "--clamp-bits", "6",
                             "--packed-docs")
    losses = _losses(out)
    assert len(losses) == 2 and all(0 < v < 6 for v in losses)
    z = [float(line.split("attn |Z|")[1].split()[0]) for line in out.splitlines()
         if "attn |Z|" in line]
    assert len(z) == 2 and all(0 < v < 50 for v in z)


def test_gpt_example_distills_from_a_dumped_teacher(tmp_path):
    pytest.importorskip("torch")
    teacher_dir = tmp_path / "teacher"
    out = _torchrun_one_rank("--steps", "3", "--eval-every", "3",
                             "--dump-teacher", str(teacher_dir))
    assert "teacher samples: 3 shards" in out
    assert len(list(teacher_dir.glob("*.sqdk"))) == 3
    out = _torchrun_one_rank("--steps", "3", "--eval-every", "3", "--width", "32",
                             "--distill-dir", str(teacher_dir), "--distill-weight", "0.5")
    distill = [float(line.split("distill")[1].split()[0]) for line in out.splitlines()
               if "distill" in line]
    # Cross-entropy from the teacher to the student: at least the teacher's entropy, > 0.
    assert len(distill) == 1 and 0 < distill[0] < 10
    assert len(_losses(out)) == 1


def test_clamp_constant_without_a_limit_is_an_argparse_error():
    """It printed a traceback on every rank; now one usage error, exit 2,
    before anything starts."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "gpt_train.py"), "--clamp",
                           "constant"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "--clamp constant needs --clamp-limit" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_example_help_is_complete(script):
    """--help exits 0 with the whole description (it was cut after its first
    line, mid-sentence) and a help text for every option."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--help"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    first_paragraph = open(ROOT / "examples" / script).read().split('"""')[1].split("\n\n")[0]
    assert " ".join(first_paragraph.split()) in " ".join(out.split())
    options = out.split("options:")[1].splitlines()
    for i, line in enumerate(options):
        if not line.startswith("  -") or line.strip().startswith("-h, --help"):
            continue
        signature_end = line.find("  ", 2)  # argparse puts two spaces before the help
        has_text = signature_end > 0 and line[signature_end:].strip()
        continued = i + 1 < len(options) and options[i + 1].startswith(" " * 8) \
            and not options[i + 1].strip().startswith("-")
        assert has_text or continued, f"{script}: no help for {line.strip()}"
