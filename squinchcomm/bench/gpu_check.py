"""The device check: every CUDA part of the library, on one GPU, in under 9 minutes.

    PYTHONPATH=. bench/gpu_check.sh OUT            # on the lent GPU machine
    python -m squinchcomm.bench gpu-check --out OUT

It runs from a copy of the repository with nothing to install (the GPU
machine has torch, CuPy, NCCL, numba, mpi4py and pytest), in this order, each
part within its own time budget (a part that would start with less than its
minimum left is skipped and reported as skipped):

1. ``kernels``: the GPU kernel tests (tests/test_cuda.py: bit-exact against
   the oracle on many sizes and alignments, stochastic rounding, error
   feedback, fp16/bf16, grid-stride, one input above 2^31 elements, NVRTC
   with the backend's options) with ``SQUINCHCOMM_TEST_GPU=1`` and
   ``SQUINCHCOMM_CUDA_DEBUG=1``.
2. ``arrays``: CuPy arrays and CUDA tensors through ``codec.*`` and
   ``Communicator`` (tests/test_cuda_paths.py, world size 1 over NCCL, and
   tests/test_transport_nccl.py), then 2 ranks over gloo and over MPI (under
   mpirun, where installed) with GPU buffers on the one GPU
   (tests/test_cuda_ranks.py), bit-identical to the CPU path on the same data.
3. ``torch``: ``DistributedOptimizer`` and the DDP hook on CUDA tensors at one
   rank over NCCL and at 2 ranks over gloo, on a non-default torch stream
   (the torch tests of the same two files).
4. ``bench``: the codec benchmark at 256 MiB next to a device-to-device copy
   measured in the same run (GB/s and the ratio; target >= 0.85 of the copy
   for encode, decode and reduce-encode) and the single-GPU pipeline benchmark.
5. ``sanitizer``: compute-sanitizer memcheck and racecheck over one short run
   of every kernel (``--smoke``), where the tool is installed.
6. ``parity``: ``bench parity --device cuda --quick`` at one rank (torchrun), a smoke test.

Full logs go to OUT/NN_part.log, benchmark JSON beside them, and
OUT/summary.json holds every part's status (passed, failed, timeout, skipped),
time, reason and numbers; a short table is printed last. Without a usable GPU
every part is reported as skipped (exit 0); any failure or timeout exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["main", "PARTS"]

ROOT = Path(__file__).resolve().parents[2]
TOTAL_BUDGET_S = 540.0  # 9 minutes, the whole check
CODEC_TARGET = 0.85  # fraction of the device-to-device copy (encode, decode, reduce-encode)


@dataclass
class Part:
    """One part of the check: commands run in order within ``budget_s``;
    skipped when less than ``min_s`` of the whole check's time is left."""

    name: str
    what: str
    budget_s: float
    min_s: float
    commands: list[list[str]]
    #: A failing command whose output matches this says the machine cannot run
    #: the tool (compute-sanitizer under gVisor: "Device not supported"): the
    #: part is reported skipped with that line, not failed.
    unsupported: str | None = None


@dataclass
class Result:
    name: str
    status: str  # passed | failed | timeout | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    reason: str = ""
    log: str = ""
    numbers: dict = field(default_factory=dict)


def _pytest(*paths: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *paths]


def parts(out: Path) -> list[Part]:
    """The check's parts, in order, writing their artefacts under ``out``."""
    py = sys.executable
    return [
        Part("kernels", "CUDA kernels vs the oracle, NVRTC", 150, 60,
             [_pytest("tests/test_cuda.py")]),
        Part("arrays", "codec.* and Communicator on CuPy/CUDA tensors, 1 rank NCCL, "
             "2 ranks gloo and MPI", 130, 40,
             [_pytest("tests/test_cuda_paths.py", "tests/test_transport_nccl.py",
                      "tests/test_cuda_ranks.py", "-k", "not torch_")]),
        Part("torch", "DistributedOptimizer (ZeRO too), DDP hook, FSDP2 reduce-scatter on CUDA, "
             "streams, 1 and 2 ranks", 110, 30,
             [_pytest("tests/test_cuda_paths.py", "tests/test_cuda_ranks.py", "-k", "torch_")]),
        Part("bench", "codec vs device copy at 256 MiB; single-GPU pipeline", 70, 30,
             [[py, "-m", "squinchcomm.bench", "codec", "--backends", "cuda", "-b", "256M",
               "-e", "256M", "-n", "20", "-w", "3", "--json", str(out / "codec_gpu.json")],
              [py, "-m", "squinchcomm.bench", "pipeline", "--device", "cuda", "-b", "16M", "-e",
               "256M", "-f", "4", "-n", "5", "--json", str(out / "pipeline_gpu.json")]]),
        Part("sanitizer", "compute-sanitizer memcheck + racecheck, every kernel once", 40, 20,
             [["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", py, "-m",
               "squinchcomm.bench.gpu_check", "--smoke"] for tool in ("memcheck", "racecheck")],
             unsupported=r"Device not supported|not supported on this"),
        Part("parity", "loss parity smoke run on the GPU (1 rank, NCCL)", 40, 25,
             [[py, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m",
               "squinchcomm.bench", "parity", "--device", "cuda", "--quick", "--methods",
               "fp32,bf16,squinch", "--seeds", "0", "--out", str(out / "parity")]]),
    ]


PARTS = tuple(p.name for p in parts(Path(".")))


# ---------------------------------------------------------------- probing
def gpu_reason() -> str | None:
    """Why the GPU parts cannot run here (None: a CUDA GPU is usable)."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, no driver, a broken installation
        return f"CuPy cannot reach a CUDA GPU ({type(exc).__name__}: {exc})"
    if count < 1:
        return "no CUDA device is visible"
    return None


def machine() -> dict:
    """What the GPU machine is (best effort; empty fields where unknown)."""
    info = {"host": os.uname().nodename, "python": sys.version.split()[0]}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            info["gpu"] = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    for module in ("torch", "cupy", "numba", "mpi4py", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except Exception:
            info[module] = None
    return info


# ---------------------------------------------------------------- one part
# pytest's closing line ("3 passed, 2 skipped in 1.20s"), once per rank under mpirun.
_PYTEST_SUMMARY = re.compile(r"^[=\s]*((?:\d+ \w+(?:, )?)+) in [\d.]+s", re.M)
_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)")


def _numbers(part: str, text: str, out: Path) -> dict:
    """The figures worth a line in the table, from a part's log and files."""
    nums: dict = {}
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colour codes (pytest under mpirun)
    for line in _PYTEST_SUMMARY.findall(text):
        for count, what in _PYTEST_COUNTS.findall(line):
            what = "error" if what.startswith("error") else what
            nums[what] = nums.get(what, 0) + int(count)
    if part == "bench" and (out / "codec_gpu.json").exists():
        data = json.loads((out / "codec_gpu.json").read_text())
        for row in data.get("rows", []) if isinstance(data, dict) else data:
            if row.get("backend") == "cuda":
                nums[f"{row['op']}_GBps"] = round(row["gbps"], 1)
                nums[f"{row['op']}_x_copy"] = round(row["vs_copy"], 3)
                nums["copy_GBps"] = round(row["copy_gbps"], 1)
        judged = [nums.get(f"{op}_x_copy") for op in ("encode", "decode", "reduce_encode")]
        if all(v is not None for v in judged):
            nums["codec_target_met"] = min(judged) >= CODEC_TARGET
    return nums


def run_part(index: int, part: Part, out: Path, left_s: float, env: dict) -> Result:
    """Run ``part``'s commands in order; stop at the first failure."""
    log = out / f"{index:02d}_{part.name}.log"
    res = Result(part.name, "passed", budget_s=part.budget_s, log=log.name)
    budget = min(part.budget_s, left_s)
    if budget < part.min_s:
        res.status, res.reason = "skipped", (f"{left_s:.0f} s left of the {TOTAL_BUDGET_S:.0f} "
                                             f"s check, part needs >= {part.min_s:.0f} s")
        log.write_text(res.reason + "\n")
        return res
    missing = [c[0] for c in part.commands if shutil.which(c[0]) is None]
    if missing:
        res.status, res.reason = "skipped", f"{missing[0]} is not installed on this machine"
        log.write_text(res.reason + "\n")
        return res
    t0 = time.monotonic()
    with log.open("w") as fh:
        for cmd in part.commands:
            remaining = budget - (time.monotonic() - t0)
            fh.write(f"$ {' '.join(cmd)}  (timeout {remaining:.0f} s)\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=max(1.0, remaining))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the command and what it started
                proc.wait()
                res.status, res.reason = "timeout", f"{cmd[2:5]} ran past the part's budget"
                break
            if proc.returncode != 0:
                fh.flush()
                found = (re.search(part.unsupported, log.read_text(errors="replace"))
                         if part.unsupported else None)
                if found:
                    res.status, res.reason = "skipped", f"not supported here: {found.group(0)}"
                else:
                    res.status = "failed"
                    res.reason = f"exit {proc.returncode}: {' '.join(cmd[1:6])}"
                break
    res.seconds = round(time.monotonic() - t0, 1)
    res.numbers = _numbers(part.name, log.read_text(errors="replace"), out)
    return res


# ---------------------------------------------------------------- smoke run
def smoke() -> None:
    """Every kernel once on small, odd, misaligned inputs (compute-sanitizer's run)."""
    import cupy
    import numpy as np

    from squinchcomm import codec

    rng = np.random.default_rng(0)
    for n in (1, 9, 4099):
        x = cupy.asarray(rng.standard_normal(n + 1, dtype=np.float32))[1:]  # misaligned view
        res = cupy.zeros(n, cupy.float32)
        p = codec.encode(x, rounding="stochastic", seed=1, residual=res)
        stack = cupy.stack([p, p, p])
        codec.decode(p, n)
        codec.decode_accumulate(stack, n, cupy.zeros(n, cupy.float32), scale=1 / 3)
        codec.reduce_encode(stack, n, scale=1 / 3, residual=cupy.zeros(n, cupy.float32))
        codec.encode(x.astype(cupy.float16))
    cupy.cuda.get_current_stream().synchronize()
    print("smoke: every kernel ran")


# ---------------------------------------------------------------- the check
def _table(results: list[Result]) -> str:
    lines = [f"{'part':<10} {'status':<8} {'time':>7} {'budget':>7}  numbers / reason"]
    for r in results:
        detail = " ".join(f"{k}={v}" for k, v in r.numbers.items())
        if r.reason:
            detail = f"{detail}  [{r.reason}]" if detail else r.reason
        lines.append(f"{r.name:<10} {r.status:<8} {r.seconds:>6.0f}s {r.budget_s:>6.0f}s  "
                     f"{detail}")
    return "\n".join(lines)


def check(out: Path, only: list[str] | None = None, budget_s: float = TOTAL_BUDGET_S) -> dict:
    """Run the check into ``out``; return the summary (also written as summary.json)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SQUINCHCOMM_TEST_GPU="1", SQUINCHCOMM_CUDA_DEBUG="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    reason = gpu_reason()
    t0 = time.monotonic()
    results = []
    for i, part in enumerate(parts(out), 1):
        if only and part.name not in only:
            results.append(Result(part.name, "skipped", budget_s=part.budget_s,
                                  reason="not selected (--only)"))
        elif reason is not None:
            results.append(Result(part.name, "skipped", budget_s=part.budget_s,
                                  reason=f"no GPU: {reason}"))
        else:
            left = budget_s - (time.monotonic() - t0)
            results.append(run_part(i, part, out, left, env))
        print(f"# {results[-1].name}: {results[-1].status} ({results[-1].seconds:.0f} s)",
              flush=True)
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "gpu": reason is None,
        "budget_s": budget_s,
        "seconds": round(time.monotonic() - t0, 1),
        "codec_target_x_copy": CODEC_TARGET,
        "parts": [asdict(r) for r in results],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.txt").write_text(_table(results) + "\n")
    print(_table(results))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m squinchcomm.bench gpu-check",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=None,
                   help="folder for logs, JSON and summary.json (the device tool's $OUT)")
    p.add_argument("--only", default=None, help=f"comma list of parts ({', '.join(PARTS)})")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET_S,
                   help="seconds for the whole check (default 540)")
    p.add_argument("--smoke", action="store_true",
                   help="run every kernel once and exit (what compute-sanitizer watches)")
    args = p.parse_args(argv)
    if args.smoke:
        smoke()
        return 0
    if args.out is None:
        p.error("--out FOLDER is required (the device tool's $OUT)")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    bad = sorted(set(only or ()) - set(PARTS))
    if bad:
        p.error(f"unknown parts {bad}; choose from {', '.join(PARTS)}")
    summary = check(args.out, only, args.budget)
    failed = [r["name"] for r in summary["parts"] if r["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
