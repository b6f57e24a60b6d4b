"""Run every benchmark behind the README's tables and plots, then the report.

    sudo python bench/reproduce.py                 # everything, ~3 h on 2 cores
    sudo python bench/reproduce.py --only shaped,report
    python bench/reproduce.py --list               # the commands, without running them

Each step writes its JSON and its printed table (``.txt``) into ``--out``
(default ``bench/results/``); the header of every table records the machine,
versions and the exact parameters, and ``commands.md`` there lists every
command this script ran. Steps:

    codec     Numba codec throughput, 1-256 MiB          (python -m squinchcomm.bench codec)
    quality   error per method on Gaussian, t3, GPT grads (... quality)
    pipeline  single-process codec pipeline per allreduce (... pipeline)
    mpi       4 MPI ranks on this machine, 1-64 MiB     (mpirun ... allreduce)
    shaped    4 hosts at 200 Mbit/s, 1 and 10 Gbit/s, 1-256 MiB, every method (auto too)
    collectives  reduce_scatter and allgather at 1 Gbit/s, 1-64 MiB
    hier      2 hosts x 2 ranks at 200 Mbit/s and 1 Gbit/s, 64 MiB: flat vs hierarchical
    train     the GPT training step per compression method, 4 hosts at each rate
    overlap   the step unshaped vs 200 Mbit/s and 1 Gbit/s, 2 and 4 hosts (wire hidden?)
    model     the speedup model from the pipeline numbers, checked against the shaped runs
    companions  Z-Reg, QAT, Dynamic Clamping, visibility attention, distillation
    parity    loss parity: 13 gradient methods x 5 seeds on 4 ranks, Z-Reg at 1e-4 (~100 min)
    diloco    DiLoCo and Streaming DiLoCo against synchronous training: loss against wire
              bytes (3 seeds, ~25 min), and the training step on 4 hosts at 200 Mbit/s, 1 Gbit/s
    report    plots and summary.md (bench/report.py)

The shaped steps need root (network namespaces and tc); the others do not.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it
from squinchcomm.bench.parity import DILOCO_STUDY  # noqa: E402

RATES = ("200mbit", "1gbit", "10gbit")
_MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _shaped(rate: str, log: str, bench: list[str], ranks_per_host: int = 1,
            ranks: int = 4) -> list[str]:
    return _py("bench/shaped_cluster.py", "--ranks", str(ranks), "--ranks-per-host",
               str(ranks_per_host), "--rate", rate, "--timeout", "3600", "--log", log, "--",
               *bench)


def steps(out: Path) -> dict[str, list[tuple[list[str], str | None]]]:
    """{step: [(command, file its stdout goes to, or None when it writes its own)]}."""
    o = lambda name: str(out / name)  # noqa: E731
    shaped = [(_shaped(r, o(f"shaped_4rank_{r}.txt"),
                       ["allreduce", "-b", "1M", "-e", "256M", "-f", "4", "-n", "3", "-w", "1",
                        "--json", o(f"shaped_4rank_{r}.json")]), None) for r in RATES]
    collectives = [(_shaped("1gbit", o(f"shaped_{c}_4rank_1gbit.txt"),
                            [c, "-b", "1M", "-e", "64M", "-f", "4", "-n", "3", "-w", "1",
                             "--json", o(f"shaped_{c}_4rank_1gbit.json")]), None)
                   for c in ("reduce_scatter", "allgather")]
    train = [(_shaped(r, o(f"shaped_train_4rank_{r}.txt"),
                      ["train", "--json", o(f"shaped_train_4rank_{r}.json")]), None)
             for r in RATES]
    # Issue 12's proof: the step on an unshaped link against 200 Mbit/s and
    # 1 Gbit/s, 4 MiB buckets (bench/results/overlap/NOTES.md).
    overlap = [(_shaped(r, o(f"overlap/after_{n}rank_{r}.txt"),
                        ["train", "--methods", "squinch,ddp_squinch", "--bucket-bytes", "4M",
                         "--first-bucket-bytes", "4M", "--json",
                         o(f"overlap/after_{n}rank_{r}.json")], ranks=n), None)
               for n in (2, 4) for r in ("none", "200mbit", "1gbit")]
    return {
        "codec": [(["env", "NUMBA_NUM_THREADS=2", *_py("-m", "squinchcomm.bench", "codec", "-b",
                                                       "1M", "-e", "256M", "-f", "4", "-n", "10",
                                                       "--json", o("codec_cpu.json"))],
                   o("codec_cpu.txt"))],
        "quality": [(_py("-m", "squinchcomm.bench", "quality", "--out", str(out)), None)],
        "pipeline": [(_py("-m", "squinchcomm.bench", "pipeline", "--ranks", "4", "-b", "1M", "-e",
                          "256M", "-f", "4", "-n", "5", "--json", o("pipeline_cpu.json")),
                      o("pipeline_cpu.txt"))],
        "mpi": [(["mpirun", "-n", "4", "--oversubscribe", "-x", "NUMBA_NUM_THREADS=1",
                  *_py("-m", "squinchcomm.bench", "allreduce", "-b", "1M", "-e", "64M", "-f", "4",
                       "-n", "5", "-w", "1", "--transport", "mpi", "--no-progress", "--json",
                       o("allreduce_mpi_4rank.json"))], o("allreduce_mpi_4rank.txt"))],
        "shaped": shaped,
        "collectives": collectives,
        "hier": [(_shaped(r, o(f"shaped_hier_2x2_{r}.txt"),
                          ["allreduce", "-b", "64M", "-e", "64M", "-n", "3", "-w", "1",
                           "--methods", "engine_fp32,squinch,squinch_ef,squinch_hier,"
                           "squinch_hier_ef", "--json", o(f"shaped_hier_2x2_{r}.json")],
                          ranks_per_host=2), None) for r in ("200mbit", "1gbit")],
        "train": train,
        "overlap": overlap,
        # The prediction uses the single-process pipeline numbers (a rank with the
        # machine to itself); the validation uses each run's own stage times,
        # since there 4 ranks share the 2 cores.
        "model": [(_py("-m", "squinchcomm.bench", "model", "--ranks", "4", "--pipeline",
                       o("pipeline_cpu.json"), "--json", o("model_cpu.json")),
                   o("model_cpu.txt")),
                  (_py("-m", "squinchcomm.bench", "model", "--ranks", "4", "--validate",
                       *[o(f"shaped_4rank_{r}.json") for r in RATES], "--json",
                       o("model_validate.json")), o("model_validate.txt"))],
        # The companion techniques (squinchcomm.nn), one process each.
        # (--threads 1: on a loaded 2-core machine 2 torch threads ran 20-50x slower)
        "companions": [(_py("-m", "squinchcomm.bench", *cmd, "--out", path), None)
                       for cmd, path in (
                           (["zreg", "--threads", "1"], str(out)),
                           (["zreg", "--threads", "1", "--seed", "1"], o("zreg_seed1")),
                           (["qat", "--weight-decay", "0,1", "--threads", "1"], str(out)),
                           (["clamp"], str(out)), (["visibility"], str(out)),
                           (["distill"], str(out)),
                           (["distill", "--vocab", "word:8192", "--batch", "16"], str(out)))],
        # Issue 7's experiment: does Squinch train to bf16's loss?
        # Then the Z-Reg pair at a tenth of the coefficient, with its references.
        "parity": [(["mpirun", "-n", "4", "--oversubscribe", "-x", "NUMBA_NUM_THREADS=1",
                     *_py("-m", "squinchcomm.bench", "parity", *extra, "--out", str(out))], None)
                   for extra in ([], ["--zreg-coef", "1e-4", "--name", "parity_zreg1e-4",
                                      "--methods", "fp32,bf16,squinch-ef,bf16+zreg,"
                                      "squinch-ef+zreg"])],
        # Issue 17: DiLoCo's loss against bytes, then its step time on slow links.
        "diloco": [(["mpirun", "-n", "4", "--oversubscribe", "-x", "NUMBA_NUM_THREADS=1",
                     *_py("-m", "squinchcomm.bench", "parity", *extra, "--seeds", "0,1,2",
                          "--out", o("diloco"))], None)
                   # the study, then the plain-averaging diagnosis the README quotes
                   for extra in (["--methods", DILOCO_STUDY, "--name", "diloco"],
                                 ["--methods", "diloco10-fp32-avg", "--name", "diloco_avg"])]
        + [(_shaped(r, o(f"diloco/shaped_train_4rank_{r}.txt"),
                    ["train", "--methods", "hvd_fp32,squinch_ef,diloco_squinch,sdiloco_squinch",
                     "--steps", "20", "--json", o(f"diloco/shaped_train_4rank_{r}.json")]), None)
           for r in ("200mbit", "1gbit")],
        "report": [(_py("bench/report.py", "--results", str(out)), None)],
    }


def _show(cmd: list[str]) -> str:
    """The command as a reader would type it: ``python``, paths relative to the repo."""
    return shlex.join("python" if c == sys.executable else c.replace(f"{ROOT}/", "")
                      for c in cmd)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--only", help="comma list of steps (default: all, in order)")
    p.add_argument("--list", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    plan = steps(args.out.resolve())
    chosen = list(plan) if not args.only else [s.strip() for s in args.only.split(",")]
    bad = [s for s in chosen if s not in plan]
    if bad:
        raise SystemExit(f"--only {args.only!r}: unknown step(s) {bad}; choose from "
                         f"{', '.join(plan)}")
    needs_root = {"shaped", "collectives", "hier", "train", "overlap", "diloco"} & set(chosen)
    if needs_root and os.geteuid() != 0 and not args.list:
        raise SystemExit(f"steps {sorted(needs_root)} build network namespaces and need root: "
                         "run with sudo, or leave them out with --only")
    for sub in ("overlap", "diloco"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **_MPI_ENV, PYTHONPATH=str(ROOT))
    for step in chosen:
        for cmd, stdout in plan[step]:
            text = _show(cmd) + (f" > {_show([stdout])}" if stdout else "")
            print(f"# [{step}] {text}", flush=True)
            if args.list:
                continue
            t0 = time.monotonic()
            with open(stdout, "w") if stdout else open(os.devnull, "w") as fh:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True,
                                      stdout=fh if stdout else None)
            print(f"# [{step}] exit {proc.returncode} after {time.monotonic() - t0:.0f} s",
                  flush=True)
            if proc.returncode:
                raise SystemExit(f"step {step} failed (exit {proc.returncode}): {text}")
    if not args.list:
        (args.out / "commands.md").write_text(
            "# Commands behind bench/results (`sudo python bench/reproduce.py` runs them all)\n\n"
            + "\n".join(f"- `{step}`: `{_show(cmd)}`" + (f" > `{_show([so])}`" if so else "")
                        for step, cmds in plan.items() for cmd, so in cmds) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
