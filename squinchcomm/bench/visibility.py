"""Visibility-mask attention: O(N) mask memory and blockwise vs dense forward time.

Run from the repository root::

    python -m squinchcomm.bench visibility           # writes bench/results/visibility.{json,md,png}
    python -m squinchcomm.bench visibility --quick   # seconds-long smoke run

For each sequence length N and each pattern (causal, causal sliding window,
packed documents causal inside each, see :mod:`squinchcomm.nn.visibility`),
batch 1, float32, no autograd, it reports:

- mask memory: ``visibility_start`` + ``visibility_limit`` bytes (O(N)) vs the
  dense boolean Q x K mask (O(N^2), one byte per entry);
- tiles the blockwise path skips out of all (query tile, key tile) pairs;
- forward seconds (median of ``--repeats`` after one untimed warm-up call) of
  the blockwise :func:`~squinchcomm.nn.visibility.visibility_attention`, the
  dense reference :func:`~squinchcomm.nn.visibility.dense_visibility_attention`
  and torch's ``scaled_dot_product_attention`` with the dense boolean mask;
- max |difference| of the blockwise and SDPA outputs from the dense reference.

A dense path whose estimated working set does not fit in half the available
memory is skipped (noted in the table). Dense calls whose warm-up took longer
than ``--slow-s`` are timed once instead of ``--repeats`` times. The load
average before and after the run is recorded: on a shared machine the timings
are only as good as it is idle.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from squinchcomm.bench.common import versions, write_results
from squinchcomm.nn import visibility as vis

__all__ = ["main", "patterns", "PATHS"]

DEFAULT_PROG = "python -m squinchcomm.bench visibility"
PATHS = ("blockwise", "dense", "sdpa_dense_mask")
# Live float32 (Q x K) tensors of dense_visibility_attention at its peak
# (scores, masked scores, shifted copy, exp), used to decide whether it fits.
_DENSE_LIVE_SCORE_TENSORS = 4


def patterns(n: int, window: int, docs: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return ``{name: (start, limit)}`` of the measured patterns at length ``n``.

    ``documents`` packs ``docs`` documents of (nearly) equal length.
    """
    doc_ids = torch.arange(n) * docs // n
    return {
        "causal": vis.causal(n),
        f"sliding_window_{window}": vis.sliding_window(n, window),
        f"documents_{docs}": vis.documents(doc_ids),
    }


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _timed(fn, repeats: int, slow_s: float) -> tuple[torch.Tensor, float, int]:
    """Call ``fn`` once untimed (warm-up, its output is returned), then time it.

    Returns ``(output, median seconds, timed calls)``; a single timed call when
    the warm-up took longer than ``slow_s`` (pass ``inf`` to always repeat).
    """
    t0 = time.perf_counter()
    out = fn()
    calls = 1 if time.perf_counter() - t0 > slow_s else repeats
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), calls


def _measure(n: int, name: str, start, limit, args, gen) -> dict:
    """One (length, pattern) row: memory, tiles, times and output differences."""
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=gen) for _ in range(3))
    tiles = vis.block_visibility(start, limit, torch.arange(n), args.block, args.block)
    dense_mask_bytes = n * n * torch.empty((), dtype=torch.bool).element_size()
    dense_work = _DENSE_LIVE_SCORE_TENSORS * args.heads * n * n * 4 + dense_mask_bytes
    avail = _available_bytes()
    row = {
        "n": n, "pattern": name,
        "visibility_bytes": start.nbytes + limit.nbytes,
        "dense_mask_bytes": dense_mask_bytes,
        "tiles": tiles.numel(),
        "skipped_tiles": int((tiles == 0).sum()),
        "dense_working_set_bytes": dense_work,
        "seconds": {}, "timed_calls": {}, "max_abs_diff_vs_dense": {}, "skipped": {},
    }
    fns = {
        "blockwise": lambda: vis.visibility_attention(
            q, k, v, start, limit, block_q=args.block, block_k=args.block),
        "dense": lambda: vis.dense_visibility_attention(q, k, v, start, limit),
        "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=vis.dense_mask(start, limit, n)),
    }
    outs = {}
    with torch.no_grad():
        for path, fn in fns.items():
            if path != "blockwise" and (
                n > args.dense_max_n or (avail is not None and dense_work > avail // 2)
            ):
                row["skipped"][path] = (
                    f"dense working set ~{dense_work / 2**30:.1f} GiB, N > --dense-max-n "
                    f"{args.dense_max_n} or over half of MemAvailable"
                )
                continue
            # The blockwise path always gets its repeats: its many small ops suffer
            # most when other jobs take a core, and the median filters that out.
            slow_s = math.inf if path == "blockwise" else args.slow_s
            outs[path], row["seconds"][path], row["timed_calls"][path] = _timed(
                fn, args.repeats, slow_s)
    if "dense" in outs:
        for path in ("blockwise", "sdpa_dense_mask"):
            if path in outs:
                diff = (outs[path] - outs["dense"]).abs().max().item()
                row["max_abs_diff_vs_dense"][path] = diff
    return row


def _parse(argv):
    p = argparse.ArgumentParser(prog=DEFAULT_PROG, description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1024,2048,4096,8192",
                   help="sequence lengths N, comma-separated (quick: 256,512)")
    p.add_argument("--window", type=int, default=256, help="sliding window W (keys per query)")
    p.add_argument("--docs", type=int, default=8, help="packed documents per sequence")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=128, help="query and key tile size")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (median reported)")
    p.add_argument("--slow-s", type=float, default=5.0,
                   help="time a dense path once if its warm-up call took longer (seconds)")
    p.add_argument("--dense-max-n", type=int, default=8192,
                   help="skip the dense paths above this N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a machine shared with other jobs, "
                        "multi-threaded small ops stall on descheduled threads; 2 threads "
                        "made the tile loop ~50x slower under load here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="N = 256,512, 2 repeats: a smoke run")
    p.add_argument("--out", default="bench/results",
                   help="directory for visibility.{json,md,png}")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "256,512", 2
    try:
        args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated ints, got {args.sizes!r}")
    if not args.size_list or min(args.size_list) < 1:
        p.error(f"--sizes must be ints >= 1, got {args.sizes!r}")
    for name in ("window", "docs", "heads", "head_dim", "block", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _fmt_bytes(b: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b} B"


def _markdown(doc: dict) -> str:
    m, p = doc["machine"], doc["parameters"]
    lines = [
        "# Visibility-mask attention: mask memory and forward time",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['versions'].get('torch')} "
        f"(torch threads: {m['torch_threads']}, see --threads), {m['platform']}. "
        "Load average (1 min) "
        f"{m['load_average_1_5_15_min']['before'][0]:.1f} before, "
        f"{m['load_average_1_5_15_min']['after'][0]:.1f} after the run: other jobs shared "
        "the machine, so timings are noisy (compare orders of magnitude, not percents).",
        "",
        f"Parameters: batch 1, {p['heads']} heads, head dim {p['head_dim']}, float32, "
        f"forward only (no_grad), tiles {p['block']}x{p['block']}, median of {p['repeats']} "
        f"timed calls after one warm-up (dense paths: one call if the warm-up took > "
        f"{p['slow_s']} s), "
        f"sliding window W={p['window']}, {p['docs']} packed documents of equal length.",
        "",
        "| N | pattern | start+limit | dense bool mask | tiles skipped | blockwise s | "
        "dense s | SDPA+mask s | dense/blockwise | max abs diff blockwise | "
        "max abs diff SDPA |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def sec(row, path):
        if path in row["skipped"]:
            return "skipped"
        calls = row["timed_calls"][path]
        return f"{row['seconds'][path]:.4f}" + ("" if calls > 1 else " (1 call)")

    def diff(row, path):
        d = row["max_abs_diff_vs_dense"].get(path)
        return "n/a" if d is None else f"{d:.1e}"

    for r in doc["rows"]:
        s = r["seconds"]
        ratio = f"{s['dense'] / s['blockwise']:.1f}x" if "dense" in s else "n/a"
        lines.append(
            f"| {r['n']} | {r['pattern']} | {_fmt_bytes(r['visibility_bytes'])} | "
            f"{_fmt_bytes(r['dense_mask_bytes'])} | {r['skipped_tiles']}/{r['tiles']} | "
            f"{sec(r, 'blockwise')} | {sec(r, 'dense')} | {sec(r, 'sdpa_dense_mask')} | "
            f"{ratio} | {diff(r, 'blockwise')} | {diff(r, 'sdpa_dense_mask')} |")
    notes = sorted({f"N={r['n']} {path}: {why}" for r in doc["rows"]
                    for path, why in r["skipped"].items()})
    lines += ["", "start+limit are int64 (int32 would halve them). Dense mask: one byte per "
              "(query, key). Max abs diff: against dense_visibility_attention's output."]
    if notes:
        lines += ["", "Skipped:"] + [f"- {n}" for n in notes]
    if doc.get("plot"):
        lines += ["", f"Plot: `{doc['plot']}` (forward seconds vs N, log-log)."]
    lines += ["", f"Done in {doc['seconds_total']} s.", ""]
    return "\n".join(lines)


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["pattern"] for r in doc["rows"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), sharey=True)
    for ax, name in zip(list(axes) if len(names) > 1 else [axes], names):
        rows = [r for r in doc["rows"] if r["pattern"] == name]
        for path_name in PATHS:
            pts = [(r["n"], r["seconds"][path_name]) for r in rows if path_name in r["seconds"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=path_name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("sequence length N")
        ax.grid(True, which="both", alpha=0.3)
    (axes[0] if len(names) > 1 else axes).set_ylabel("forward seconds (median)")
    (axes[0] if len(names) > 1 else axes).legend()
    fig.suptitle(f"visibility attention, CPU ({doc['machine']['cpu_count']} cores, "
                 f"{doc['machine']['torch_threads']} torch threads), "
                 f"{doc['parameters']['heads']} heads x {doc['parameters']['head_dim']}, fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> dict:
    """Run the visibility benchmark; write ``visibility.{json,md}`` (and ``.png``) to --out.

    Returns:
        The JSON document (``rows``: one dict per (N, pattern)).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    load_before = os.getloadavg()
    rows = []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:  # restore the thread count for callers in the same process (tests)
        for n in args.size_list:
            for name, (start, limit) in patterns(n, args.window, args.docs).items():
                rows.append(_measure(n, name, start, limit, args, gen))
                r = rows[-1]
                print(f"N={n:6d} {name:20s} skipped {r['skipped_tiles']}/{r['tiles']} "
                      + " ".join(f"{k}={v:.4f}s" for k, v in r["seconds"].items()), flush=True)
    finally:
        torch.set_num_threads(threads_before)
    doc = {
        "benchmark": "visibility",
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "machine": {"platform": platform.platform(), "cpu": versions()["cpu"],
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                    "load_average_1_5_15_min": {"before": load_before,
                                                "after": os.getloadavg()},
                    "versions": versions()},
        "parameters": {k: getattr(args, k) for k in
                       ("sizes", "window", "docs", "heads", "head_dim", "block", "repeats",
                        "slow_s", "dense_max_n", "threads", "seed")},
        "rows": rows,
        "plot": None,
        "seconds_total": None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        _plot(doc, out / "visibility_time_vs_n.png")
        doc["plot"] = str(out / "visibility_time_vs_n.png")
    doc["seconds_total"] = round(time.perf_counter() - t0, 1)
    write_results(out, "visibility", doc, _markdown(doc))
    return doc


if __name__ == "__main__":
    main(prog="python -m squinchcomm.bench.visibility")
