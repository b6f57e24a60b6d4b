"""Allreduce bandwidth and error: the engine's fp32 allreduce next to compressed ones.

    mpirun -n 4 python -m squinchcomm.bench allreduce -b 1M -e 64M -f 4 -n 10 -w 2 \\
        --transport mpi --methods engine_fp32,squinch,squinch_ef,fp16,bf16 [--json FILE]

nccl-tests style, printed by rank 0 only. Every method runs in the same job on
the same input buffers, interleaved iteration by iteration (so a noisy
neighbour slows all methods alike), each call after the engine's blocking
barrier (MPI_Barrier / torch.distributed.barrier, untimed):

- ``engine_fp32``: the transport's own allreduce of fp32 (``compression="none"``:
  MPI ``Iallreduce`` or torch ``all_reduce``), the baseline;
- ``squinch``: the Squinch allreduce (encode, all-to-all, decode-accumulate +
  re-encode, all-gather, decode), nearest rounding unless ``--rounding``;
- ``squinch_ef``: the same with error feedback (a named residual that lives
  across the iterations, as in training);
- ``fp16`` / ``bf16``: the same algorithm with a 2-byte cast on the wire.

Columns (``--op average``, the gradient case):

- ``time(us)``: median over iterations of the slowest rank's time for one call
  (barrier, then the call; the barrier is not timed);
- ``algbw`` = fp32 bytes / time: effective bandwidth, the same numerator for
  every method, so a compressed method that is faster shows a higher algbw;
- ``busbw`` = algbw * 2(N-1)/N, nccl-tests' allreduce bus bandwidth (what a
  ring allreduce of fp32 would have to push per link to match the time);
- ``wire(MB/rank)``: bytes each rank sends per call, 1e6 bytes per MB, in the
  ring / direct-exchange model 2(N-1)/N * payload: 4 B per element for the
  engine's fp32 (MPI and gloo may pick other algorithms at some sizes), 0.75 B
  for Squinch (all-to-all then all-gather of 6-byte blocks of 8), 2 B for
  fp16/bf16;
- ``relRMS`` = ||y - exact|| / ||exact||, ``maxerr`` = max |y - exact|, against the
  float64 average of every rank's input, computed on each rank from the
  (seed, rank)-derived inputs (nccl-tests' "verifiable"); worst rank reported;
- ``ident``: whether every rank's result hashed to the same bytes.

For error feedback the per-call error is not the point (each call also pays
back the residual of earlier calls); the footer gives the error of the mean
of all calls' results, which error feedback drives towards zero.

A second table splits the compressed methods' time into the stages of
``Communicator.timings`` (milliseconds per call, mean over the timed
iterations): rank 0, and the maximum over ranks. ``other`` = rank 0's mean call
time minus its stages: the metadata check, buffer allocation and Python glue.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import time

import numpy as np

from squinchcomm import __version__, config
from squinchcomm.bench.common import size_sweep, versions

__all__ = ["main", "run", "METHODS", "STAGES"]

#: method -> (compression, error feedback)
METHODS = {
    "engine_fp32": ("none", False),
    "squinch": ("squinch", False),
    "squinch_ef": ("squinch", True),
    "fp16": ("fp16", False),
    "bf16": ("bf16", False),
}
STAGES = ("encode", "alltoall", "reduce_encode", "allgather", "decode")
_PAYLOAD_PER_ELEMENT = {"none": 4.0, "fp16": 2.0, "bf16": 2.0}


def _payload_bytes(comp: str, n: int) -> float:
    """Bytes of one whole tensor of ``n`` elements on the wire."""
    if comp == "squinch":
        from squinchcomm import codec

        return float(codec.encoded_nbytes(n))
    return _PAYLOAD_PER_ELEMENT[comp] * n


def _input(seed: int, rank: int, n: int) -> np.ndarray:
    """Rank ``rank``'s gradient-like input: standard normal float32 from (seed, rank)."""
    return np.random.default_rng([seed, rank]).standard_normal(n, dtype=np.float32)


def _exact_average(seed: int, world: int, n: int) -> np.ndarray:
    """The float64 average of every rank's input, computed locally."""
    acc = np.zeros(n, np.float64)
    for r in range(world):
        acc += _input(seed, r, n)
    acc /= world
    return acc


def _errors(y: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """(relative RMS error, max absolute error) of ``y`` against ``exact``."""
    diff = y.astype(np.float64) - exact
    norm = float(np.sqrt(np.dot(exact, exact)))
    return float(np.sqrt(np.dot(diff, diff))) / (norm or 1.0), float(np.abs(diff).max())


def _methods(spec: str) -> list[str]:
    chosen = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise ValueError(f"--methods {spec!r}: choose a comma list of {', '.join(METHODS)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--methods {spec!r} names a method twice: list each once")
    return chosen


def _make_communicator(transport: str, rounding: str, check_metadata: bool | None):
    """The Communicator under test, over MPI COMM_WORLD or torch gloo."""
    from squinchcomm.collectives import Communicator

    if transport == "mpi":
        from squinchcomm.transport.mpi import MPITransport

        tr = MPITransport()
    elif transport == "torch":
        from squinchcomm.transport.torch_dist import TorchTransport, init_process_group_from_env

        init_process_group_from_env(backend="gloo")
        tr = TorchTransport()
    else:
        raise ValueError(f"--transport {transport!r}: choose mpi or torch")
    # min_compress_bytes=0: measure the compressed path at every size, the
    # small ones included (that is what the threshold study needs);
    # hierarchical off: on one node it would skip compression entirely.
    return Communicator(tr, min_compress_bytes=0, hierarchical=False, error_feedback=False,
                        rounding=rounding, check_metadata=check_metadata)


def _engine_barrier(comm):
    """A barrier that releases every rank at nearly the same moment.

    The library's own ``comm.barrier()`` polls a non-blocking barrier with a
    sleeping back-off, so ranks leave it up to a millisecond apart and that
    skew would be charged to the next timed call. The engine's blocking
    barrier (MPI_Barrier, torch.distributed.barrier) spins instead. It is
    never timed, so using the engine's here measures nothing of the engine.
    """
    tr = comm.transport
    mpi_comm = getattr(tr, "comm", None)
    if mpi_comm is not None and type(mpi_comm).__module__.startswith("mpi4py"):
        return mpi_comm.Barrier
    group = getattr(tr, "group", None)
    if type(tr).__name__ == "TorchTransport" and group is not None:
        import torch.distributed as dist

        return lambda: dist.barrier(group=group)
    return comm.barrier


def run(comm, sizes, methods, iters=10, warmup=2, seed=0, emit=None):
    """Measure every method at every size on ``comm``; collective (all ranks call it).

    Args:
        comm: a :class:`~squinchcomm.collectives.Communicator`.
        sizes: fp32 byte sizes.
        methods: names from :data:`METHODS`.
        iters / warmup: timed and untimed calls per method and size.
        seed: input seed (inputs derive from (seed, rank)).
        emit: called as ``emit(row, stage_row_or_None)`` per method and size on
            every rank (the rows are the same everywhere).

    Returns:
        (rows, stage rows): lists of dicts, identical on every rank.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"-n {iters} -w {warmup}: pass at least one timed iteration and "
                         "a non-negative warm-up count")
    world, rank = comm.size, comm.rank
    barrier = _engine_barrier(comm)
    ring = 2 * (world - 1) / world
    rows, stage_rows = [], []
    for size in sizes:
        n = max(1, size // 4)
        x = _input(seed, rank, n)                                    # (n,) float32
        exact = _exact_average(seed, world, n)                       # (n,) float64
        outs = {m: np.empty(n, np.float32) for m in methods}
        # The mean of every call's result: error feedback's promise is that
        # this converges to the exact average even though each call is lossy.
        sums = {m: np.zeros(n, np.float64) for m in methods if m != "engine_fp32"}
        times = {m: [] for m in methods}
        stages = {m: {} for m in methods}
        for it in range(warmup + iters):
            timed = it >= warmup
            for m in methods:  # interleaved: drift and noise hit every method alike
                comp, ef = METHODS[m]
                barrier()
                comm.timings = stages[m] if timed and comp != "none" else None
                t0 = time.perf_counter()
                comm.allreduce(x, op="average", compression=comp, out=outs[m],
                               error_feedback=ef, name=f"bench/{m}/{n}" if ef else None)
                dt = time.perf_counter() - t0
                comm.timings = None
                if timed:
                    times[m].append(dt)
                if m in sums:
                    sums[m] += outs[m]
        calls = warmup + iters
        mine = {}
        for m in methods:
            rel, mx = _errors(outs[m], exact)
            rel_mean = _errors((sums[m] / calls), exact)[0] if m in sums else rel
            mine[m] = dict(times=times[m], rel=rel, max=mx, rel_mean=rel_mean,
                           digest=hashlib.blake2b(outs[m].tobytes(), digest_size=16).hexdigest(),
                           stages={k: v / iters for k, v in stages[m].items()})
        everyone = comm.transport.allgather_object(mine, comm.timeout)
        for m in methods:
            comp, ef = METHODS[m]
            per_rank = [e[m] for e in everyone]
            # A call ends when its slowest rank does: per-iteration max, then median.
            slowest = [max(r["times"][i] for r in per_rank) for i in range(iters)]
            t = statistics.median(slowest)
            algbw = 4 * n / t / 1e9
            row = dict(size=4 * n, count=n, type="float32", redop="avg", method=m,
                       compression=comp, error_feedback=ef, time_us=t * 1e6,
                       time_us_rank0=statistics.median(per_rank[0]["times"]) * 1e6,
                       algbw=algbw, busbw=algbw * ring,
                       wire_mb=ring * _payload_bytes(comp, n) / 1e6,
                       rel_rms=max(r["rel"] for r in per_rank),
                       max_err=max(r["max"] for r in per_rank),
                       rel_rms_mean_of_calls=max(r["rel_mean"] for r in per_rank),
                       calls=calls,
                       bit_identical=len({r["digest"] for r in per_rank}) == 1,
                       times_us=[v * 1e6 for v in slowest])
            rows.append(row)
            srow = None
            if comp != "none":
                r0 = per_rank[0]["stages"]
                mean0 = statistics.fmean(per_rank[0]["times"])
                srow = dict(size=4 * n, method=m,
                            rank0_ms={s: r0.get(s, 0.0) * 1e3 for s in STAGES},
                            max_ms={s: max(r["stages"].get(s, 0.0) for r in per_rank) * 1e3
                                    for s in STAGES},
                            call_ms=mean0 * 1e3,
                            other_ms=(mean0 - sum(r0.values())) * 1e3)
                stage_rows.append(srow)
            if emit is not None:
                emit(row, srow)
        del x, exact, outs, sums
    return rows, stage_rows


# ---------------------------------------------------------------------------- output
def _header(args, comm, transport_desc) -> str:
    v = versions()
    numba_threads = os.environ.get("NUMBA_NUM_THREADS", "unset (one per core)")
    return "\n".join([
        f"# squinchcomm {__version__} allreduce benchmark",
        f"# sizes {args.minbytes}..{args.maxbytes} x{args.stepfactor} (fp32 bytes)  iters "
        f"{args.iters}  warmup {args.warmup}  seed {args.seed}  op average",
        f"# methods {args.methods}",
        f"# network {os.environ.get('SQUINCHCOMM_BENCH_NETWORK') or 'this machine (shared memory / loopback)'}",
        f"# transport {transport_desc}  world {comm.size}  rounding {comm.rounding}  "
        f"min_compress_bytes 0  hierarchical off  check_metadata {comm.check_metadata}",
        f"# codec backend {config.codec_backend()}  NUMBA_NUM_THREADS {numba_threads}  "
        f"host {platform.node()} {platform.machine()}  cores {os.cpu_count()}",
        "# " + "  ".join(f"{k} {val}" for k, val in v.items()),
        "# time = median over iterations of the slowest rank (barrier before each call, "
        "not timed); methods interleaved per iteration",
        "# algbw = fp32 bytes / time (effective, same numerator for every method); "
        "busbw = algbw * 2(N-1)/N",
        "# wire = MB (1e6 B) each rank sends per call, ring/direct model 2(N-1)/N * payload: "
        "fp32 4 B/elem, fp16/bf16 2, squinch 0.75",
        "# relRMS, maxerr: worst rank vs the exact fp64 average; ident: all ranks' results "
        "bit-identical",
        f"# {'size':>10} {'count':>10} {'type':>7} {'redop':>5} {'method':>11} "
        f"{'time(us)':>10} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'wire(MB/rank)':>13} "
        f"{'relRMS':>9} {'maxerr':>9} {'ident':>5}",
    ])


def _row(r) -> str:
    return (f"  {r['size']:>10} {r['count']:>10} {r['type']:>7} {r['redop']:>5} "
            f"{r['method']:>11} {r['time_us']:>10.1f} {r['algbw']:>11.3f} {r['busbw']:>11.3f} "
            f"{r['wire_mb']:>13.3f} {r['rel_rms']:>9.2e} {r['max_err']:>9.2e} "
            f"{'yes' if r['bit_identical'] else 'NO':>5}")


def _stage_table(stage_rows) -> str:
    lines = ["#",
             "# Per-stage time of the compressed methods, ms per call (mean over timed "
             "iterations): rank 0 / max over ranks",
             "# exchange stages include waiting for the slowest peer; other = rank 0 call "
             "time - its stages (metadata check, allocation, glue)",
             f"# {'size':>10} {'method':>11} " + " ".join(f"{s:>15}" for s in STAGES)
             + f" {'other':>7} {'call':>8}"]
    for s in stage_rows:
        cells = " ".join(f"{s['rank0_ms'][k]:>7.2f}/{s['max_ms'][k]:<7.2f}" for k in STAGES)
        lines.append(f"# {s['size']:>10} {s['method']:>11} {cells} {s['other_ms']:>7.2f} "
                     f"{s['call_ms']:>8.2f}")
    return "\n".join(lines)


def _footer(rows, methods) -> str:
    lines = ["#"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        lines.append(f"# {m:>11}: avg busbw {statistics.fmean(r['busbw'] for r in mine):.3f} "
                     f"GB/s, worst relRMS {max(r['rel_rms'] for r in mine):.2e}, relRMS of "
                     f"the mean of {mine[0]['calls']} calls "
                     f"{max(r['rel_rms_mean_of_calls'] for r in mine):.2e}")
    bad = [f"{r['method']}@{r['size']}" for r in rows if not r["bit_identical"]]
    lines.append("# bit-identical results on every rank: "
                 + ("all rows" if not bad else "NOT for " + ", ".join(bad)))
    if not os.environ.get("SQUINCHCOMM_BENCH_NETWORK"):  # set by bench/shaped_cluster.py
        lines.append("# one machine: the exchange runs through shared memory/loopback, so "
                     "compression cannot win on time here; see the stage table for where time "
                     "goes")
    return "\n".join(lines)


def main(argv=None):
    """Run the benchmark (collective: every rank calls it); returns the result dict."""
    p = argparse.ArgumentParser(prog="python -m squinchcomm.bench allreduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--minbytes", default="1M", help="smallest fp32 size (default 1M)")
    p.add_argument("-e", "--maxbytes", default="64M", help="largest fp32 size (default 64M)")
    p.add_argument("-f", "--stepfactor", type=int, default=4, help="size multiplier (default 4)")
    p.add_argument("-n", "--iters", type=int, default=10, help="timed calls (default 10)")
    p.add_argument("-w", "--warmup", type=int, default=2, help="untimed calls (default 2)")
    p.add_argument("--transport", default="mpi", help="mpi (COMM_WORLD) or torch (gloo)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list of {', '.join(METHODS)} (default all)")
    p.add_argument("--rounding", default="nearest", help="Squinch rounding: nearest|stochastic")
    p.add_argument("--no-check-metadata", dest="check_metadata", action="store_false",
                   default=None, help="skip the per-call metadata allgather (default: the "
                                      "library default, SQUINCHCOMM_CHECK_METADATA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="rank 0 writes rows and parameters as JSON")
    args = p.parse_args(argv)
    # Validate before any collective, so every rank fails the same way.
    sizes = size_sweep(args.minbytes, args.maxbytes, args.stepfactor)
    methods = _methods(args.methods)
    if args.transport not in ("mpi", "torch"):
        raise ValueError(f"--transport {args.transport!r}: choose mpi or torch")
    if args.rounding not in ("nearest", "stochastic"):
        raise ValueError(f"--rounding {args.rounding!r}: choose nearest or stochastic")

    # The engines are left to process exit: destroy_process_group() with gloo in
    # torch 2.13 sometimes aborts a rank after all the work is done (seen here).
    comm = _make_communicator(args.transport, args.rounding, args.check_metadata)
    root = comm.rank == 0
    desc = "mpi (mpi4py, Open MPI COMM_WORLD)" if args.transport == "mpi" else \
        "torch (torch.distributed gloo)"
    if root:
        print(_header(args, comm, desc), flush=True)

    def emit(row, _srow):
        if root:
            print(_row(row), flush=True)

    rows, stage_rows = run(comm, sizes, methods, args.iters, args.warmup, args.seed, emit)
    doc = {"args": vars(args), "versions": versions(), "transport": desc,
           "network": os.environ.get("SQUINCHCOMM_BENCH_NETWORK") or "this machine",
           "world_size": comm.size, "numba_num_threads": os.environ.get("NUMBA_NUM_THREADS"),
           "check_metadata": comm.check_metadata, "rows": rows, "stages": stage_rows}
    if root:
        if stage_rows:
            print(_stage_table(stage_rows), flush=True)
        print(_footer(rows, methods), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(doc, fh, indent=1)
    comm.barrier()  # nobody tears the transport down while rank 0 still writes
    return doc


if __name__ == "__main__":
    main()
