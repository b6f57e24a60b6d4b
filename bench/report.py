"""Plots and the summary tables from the benchmark results in bench/results/.

    python bench/report.py [--results bench/results]

Reads the JSON files the benchmarks wrote (nothing is measured here) and writes

- ``busbw_vs_size.png``: bus bandwidth against tensor size, one panel per link
  rate of the shaped cluster (``shaped_4rank_<rate>.json``), one line per method;
- ``speedup_vs_rate.png``: allreduce time per method and Squinch's speedup over
  each peer against the link rate, at one size (64 MiB by default);
- ``error_vs_bits.png``: relative RMS error against bits per element, for one
  quantization (``quality.json``) and for a whole allreduce (the shaped run at
  1 Gbit/s, where PowerSGD and the engines' casts appear too);
- ``train_tokens_per_s.png``: training throughput per method and link rate
  (``shaped_train_4rank_<rate>.json``);
- ``summary.md``: the tables the README quotes, each with the command and machine
  that produced its numbers.

bench/reproduce.py runs every benchmark and then this script.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from squinchcomm import wire_bytes

RESULTS = Path(__file__).resolve().parent / "results"
#: Squinch's wire bytes per element over fp32's and bf16's: the speedup limits.
WIRE_LIMIT = {"fp32": 4 / 0.75, "16-bit": 2 / 0.75}


def rate_gbit(network: str) -> float:
    """The link rate in Gbit/s from a network description ('every link 1gbit ...')."""
    from squinchcomm.bench.model import network_rate

    return network_rate(network) / 1e9


def rate_label(gbit: float) -> str:
    return f"{gbit:g} Gbit/s" if gbit >= 1 else f"{gbit * 1000:g} Mbit/s"


def load_runs(results: Path, pattern: str) -> dict[float, dict]:
    """{link rate in Gbit/s: JSON document} for the shaped-cluster files matching ``pattern``."""
    runs = {}
    for path in sorted(results.glob(pattern)):
        doc = json.loads(path.read_text())
        doc["_path"] = path.name
        runs[rate_gbit(doc["network"])] = doc
    return dict(sorted(runs.items()))


def rows_at(doc: dict, size: int) -> dict[str, dict]:
    """{method: row} of one document at one fp32 size."""
    return {r["method"]: r for r in doc["rows"] if r["size"] == size}


def crossover(rates: list[float], speedups: list[float]) -> float | None:
    """The link rate where the speedup falls through 1, interpolated linearly in
    log(rate) against log(speedup) between the two measured rates around it;
    None when it stays on one side of 1 over the measured rates."""
    pts = list(zip(rates, speedups))
    for (r0, s0), (r1, s1) in zip(pts, pts[1:]):
        if s0 >= 1.0 > s1:
            f = math.log(s0) / (math.log(s0) - math.log(s1))
            return math.exp(math.log(r0) + f * (math.log(r1) - math.log(r0)))
    return None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------- plots
def plot_busbw(runs: dict[float, dict], out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4.2), squeeze=False)
    for ax, (rate, doc) in zip(axes[0], runs.items()):
        methods = list(dict.fromkeys(r["method"] for r in doc["rows"]))
        for m in methods:
            rows = sorted((r for r in doc["rows"] if r["method"] == m), key=lambda r: r["size"])
            ax.plot([r["size"] / 2**20 for r in rows], [r["busbw"] for r in rows], marker="o",
                    ls="-" if m.startswith("squinch") else "--", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("allreduce size (MiB of fp32)")
        ax.set_ylabel("busbw (GB/s, fp32 bytes)")
        ax.set_title(f"{doc.get('world_size', 4)} hosts, {rate_label(rate)} links")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Bus bandwidth (effective: uncompressed bytes / time x 2(N-1)/N), shaped "
                 "cluster on one 2-core machine, torch gloo", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_speedup(runs: dict[float, dict], size: int, out: Path) -> Path:
    plt = _plt()
    rates = list(runs)
    per_rate = {r: rows_at(doc, size) for r, doc in runs.items()}
    methods = list(dict.fromkeys(m for rows in per_rate.values() for m in rows))
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        pts = [(r, per_rate[r][m]["time_us"] / 1e6) for r in rates if m in per_rate[r]]
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                  ls="-" if m.startswith("squinch") else "--")
    for m in methods:
        if m.startswith("squinch"):
            continue
        pts = [(r, per_rate[r][m]["time_us"] / per_rate[r]["squinch"]["time_us"])
               for r in rates if m in per_rate[r] and "squinch" in per_rate[r]]
        ax_s.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"over {m}")
    ax_s.axhline(1.0, color="gray", lw=1)
    ax_s.axhline(WIRE_LIMIT["fp32"], color="gray", ls="--", lw=1, label="wire limit vs fp32 5.33x")
    ax_s.axhline(WIRE_LIMIT["16-bit"], color="gray", ls=":", lw=1,
                 label="wire limit vs 16-bit 2.67x")
    for ax in (ax_t, ax_s):
        ax.set_xscale("log")
        ax.set_xlabel("link rate per direction (Gbit/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_yscale("log")
    ax_t.set_ylabel(f"allreduce time (s), {size / 2**20:g} MiB fp32")
    ax_s.set_ylabel("Squinch speedup (peer time / Squinch time)")
    fig.suptitle("Squinch on a shaped 4-host cluster (network namespaces, tc tbf, torch gloo; "
                 "4 ranks share a 2-core CPU for the codec)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_error_vs_bits(quality: dict | None, allreduce: dict | None, size: int, out: Path):
    plt = _plt()
    panels = [p for p in (quality, allreduce) if p is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    axes = list(axes[0])
    if quality is not None:
        ax = axes.pop(0)
        for data in dict.fromkeys(r["data"] for r in quality["rows"]):
            rows = [r for r in quality["rows"] if r["data"] == data]
            ax.scatter([r["bits_per_element"] for r in rows], [r["rel_rms"] for r in rows],
                       label=data, s=18)
        for r in quality["rows"]:
            if r["data"] == quality["rows"][0]["data"]:
                ax.annotate(r["method"], (r["bits_per_element"], r["rel_rms"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_title("one quantization (python -m squinchcomm.bench quality)", fontsize=9)
        ax.legend(fontsize=7)
    if allreduce is not None:
        ax = axes.pop(0)
        world = allreduce.get("world_size", 4)
        for m, r in rows_at(allreduce, size).items():
            # bits per element: the wire bytes relative to an fp32 ring's 32 bits
            bits = 32 * r["wire_mb"] * 1e6 / wire_bytes(r["count"], world, "none")
            # With error feedback one call's error is not the point: each call also
            # pays back earlier residuals; the mean of the calls' results is.
            ef = r.get("error_feedback")
            err = max(r["rel_rms_mean_of_calls"] if ef else r["rel_rms"], 1e-9)
            ax.scatter([bits], [err], s=22)
            ax.annotate(m + (" (mean of calls)" if ef else ""), (bits, err), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"a whole {world}-rank allreduce, {size / 2**20:g} MiB Gaussian "
                     "(bench allreduce)", fontsize=9)
    for ax in fig.axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("wire bits per element")
        ax.set_ylabel("relative RMS error")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_training(train_runs: dict[float, dict], out: Path) -> Path:
    plt = _plt()
    methods = list(dict.fromkeys(r["method"] for d in train_runs.values() for r in d["rows"]))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(train_runs))
    for i, (rate, doc) in enumerate(train_runs.items()):
        by = {r["method"]: r for r in doc["rows"]}
        ax.bar([j + i * width for j in range(len(methods))],
               [by[m]["tokens_per_s"] if m in by else 0 for m in methods], width,
               label=rate_label(rate))
    ax.set_xticks([j + width * (len(train_runs) - 1) / 2 for j in range(len(methods))])
    ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s (all ranks)")
    ax.set_title("GPT training step on the shaped 4-host cluster, per gradient compression",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- tables
def _fmt_ms(us: float) -> str:
    return f"{us / 1e3:,.0f}" if us >= 1e5 else f"{us / 1e3:,.1f}"


def allreduce_table(runs: dict[float, dict], size: int) -> list[str]:
    """Time per method at each rate, and Squinch's speedup over it."""
    rates = list(runs)
    per_rate = {r: rows_at(doc, size) for r, doc in runs.items()}
    methods = list(dict.fromkeys(m for rows in per_rate.values() for m in rows))
    head = "| method | wire MB/rank | rel RMS | " + " | ".join(
        f"{rate_label(r)}: ms (Squinch speedup)" for r in rates) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(rates)]
    for m in methods:
        ref = next(per_rate[r][m] for r in rates if m in per_rate[r])
        cells = []
        for r in rates:
            row, sq = per_rate[r].get(m), per_rate[r].get("squinch")
            if row is None:
                cells.append("")
            elif m.startswith("squinch") and m != "squinch" and "engine_fp32" in per_rate[r]:
                fp32 = per_rate[r]["engine_fp32"]["time_us"]
                cells.append(f"{_fmt_ms(row['time_us'])} ({fp32 / row['time_us']:.2f}x vs fp32)")
            elif sq is None or m == "squinch":
                cells.append(_fmt_ms(row["time_us"]))
            else:
                cells.append(f"{_fmt_ms(row['time_us'])} ({row['time_us'] / sq['time_us']:.2f}x)")
        wire = f"{ref['wire_mb']:.1f}"
        if m == "auto":  # what it sends depends on its pick at each rate
            wire = " / ".join(f"{per_rate[r][m]['wire_mb']:.1f}" for r in rates
                              if m in per_rate[r])
        lines.append(f"| {m} | {wire} | {ref['rel_rms']:.1e} | " + " | ".join(cells) + " |")
    return lines


def size_table(doc: dict) -> list[str]:
    """Time per method at every size of one run, Squinch's speedup over fp32 per size."""
    sizes = sorted({r["size"] for r in doc["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in doc["rows"]))
    lines = ["| method | " + " | ".join(f"{s / 2**20:g} MiB" for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for m in methods:
        cells = []
        for s in sizes:
            row = rows_at(doc, s).get(m)
            cells.append(_fmt_ms(row["time_us"]) if row else "")
        lines.append(f"| {m} (ms) | " + " | ".join(cells) + " |")
    if {"squinch", "engine_fp32"} <= set(methods):
        ratios = []
        for s in sizes:
            rows = rows_at(doc, s)
            ratios.append(f"{rows['engine_fp32']['time_us'] / rows['squinch']['time_us']:.2f}x")
        lines.append("| Squinch speedup over engine_fp32 | " + " | ".join(ratios) + " |")
    return lines


#: The methods compression="auto" chooses between, as the sweep names their rows.
AUTO_CANDIDATES = {"none": "engine_fp32", "bf16": "bf16", "squinch": "squinch"}


def auto_pick(rows: dict[str, dict]) -> str | None:
    """The row ``auto`` sent in at one size: the candidate whose wire bytes
    its row shows (the three differ: 4, 2 and 0.75 bytes per element)."""
    wire = rows["auto"]["wire_mb"]
    for row in AUTO_CANDIDATES.values():
        if row in rows and abs(rows[row]["wire_mb"] - wire) <= 1e-9 + 1e-6 * wire:
            return row
    return None


def auto_table(runs: dict[float, dict]) -> list[str]:
    """compression="auto" against the fastest of fp32, bf16 and Squinch, per
    rate and size: the method it picked, and two ratios to the fastest row:
    the picked method's own row (the choice, without the noise between two
    rows of the same method) and the auto row itself."""
    lines = ["| rate | size | auto picked | fastest | picked row / fastest | auto row / fastest |",
             "|---|---:|---|---|---:|---:|"]
    worst_pick = worst_row = 0.0
    for rate, doc in runs.items():
        for size in sorted({r["size"] for r in doc["rows"]}):
            rows = rows_at(doc, size)
            present = [m for m in AUTO_CANDIDATES.values() if m in rows]
            if "auto" not in rows or len(present) < len(AUTO_CANDIDATES):
                continue
            fastest = min(present, key=lambda m: rows[m]["time_us"])
            pick = auto_pick(rows)
            best = rows[fastest]["time_us"]
            by_pick = rows[pick]["time_us"] / best if pick else float("nan")
            by_row = rows["auto"]["time_us"] / best
            worst_pick, worst_row = max(worst_pick, by_pick), max(worst_row, by_row)
            lines.append(f"| {rate_label(rate)} | {size / 2**20:g} MiB | {pick} | {fastest} "
                         f"({_fmt_ms(best)} ms) | {by_pick:.2f} | {by_row:.2f} |")
    if len(lines) == 2:
        return []
    lines += ["", f"Worst over the sweep: the picked method's row is {worst_pick:.2f}x the "
              f"fastest row, the auto row {worst_row:.2f}x (goal: within 1.05x)."]
    return lines


def training_table(train_runs: dict[float, dict]) -> list[str]:
    rates = list(train_runs)
    methods = list(dict.fromkeys(r["method"] for d in train_runs.values() for r in d["rows"]))
    lines = ["| method | " + " | ".join(f"{rate_label(r)}: tokens/s (speedup)" for r in rates)
             + " | final loss | params identical |",
             "|---|" + "---:|" * len(rates) + "---:|---|"]
    for m in methods:
        cells, last = [], None
        for r in rates:
            row = next((x for x in train_runs[r]["rows"] if x["method"] == m), None)
            if row is None:
                cells.append("")
                continue
            last = row
            cells.append(f"{row['tokens_per_s']:,.0f} ({row['speedup']:.2f}x)")
        lines.append(f"| {m} | " + " | ".join(cells)
                     + f" | {last['loss']:.3f} | {'yes' if last['params_identical'] else 'NO'} |")
    return lines


def _versions(doc: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in (doc.get("versions") or {}).items())


def _source(doc: dict) -> str:
    return f"`{doc['_path']}`" if "_path" in doc else ""


def summary(results: Path, size: int) -> str:
    out = ["# Benchmark summary (generated by `python bench/report.py`; do not edit)", ""]
    runs = load_runs(results, "shaped_4rank_*bit.json")
    if runs:
        first = next(iter(runs.values()))
        out += [f"## Allreduce on the shaped cluster, {size / 2**20:g} MiB fp32, "
                f"{first.get('world_size', 4)} hosts", "",
                f"Network: {first['network']}.", f"Versions: {_versions(first)}.",
                "Time = median of the slowest rank. In brackets: that method's time / Squinch's "
                "(Squinch's speedup over it); for Squinch variants, the fp32 allreduce's time / "
                "theirs.",
                "Files: " + ", ".join(_source(d) for d in runs.values()), ""]
        out += allreduce_table(runs, size)
        rates = list(runs)
        for peer in ("engine_fp32", "engine_bf16", "ddp_fp16"):
            pairs = [(r, rows_at(d, size)) for r, d in runs.items()]
            pairs = [(r, rows) for r, rows in pairs if {"squinch", peer} <= set(rows)]
            if not pairs:
                continue
            speed = [rows[peer]["time_us"] / rows["squinch"]["time_us"] for _, rows in pairs]
            cross = crossover([r for r, _ in pairs], speed)
            where = (f"about {rate_label(float(f'{cross:.2g}'))}" if cross is not None else
                     ("above the fastest measured rate" if speed[-1] >= 1 else
                      "below the slowest measured rate"))
            out += ["", f"Crossover against {peer} (Squinch stops beating it; interpolated "
                    f"between measured rates {', '.join(rate_label(r) for r in rates)}): "
                    f"**{where}**."]
        auto = auto_table(runs)
        if auto:
            out += ["", "### compression=\"auto\" against the fastest of fp32, bf16 and Squinch",
                    ""] + auto
        for rate, doc in runs.items():
            if len({r["size"] for r in doc["rows"]}) > 1:
                out += ["", f"### Every size at {rate_label(rate)}", ""] + size_table(doc)
    for coll in ("reduce_scatter", "allgather"):
        for rate, doc in load_runs(results, f"shaped_{coll}_4rank_*bit.json").items():
            out += ["", f"## {coll} on the shaped cluster at {rate_label(rate)} "
                    f"({_source(doc)})", ""] + size_table(doc)
    for rate, doc in load_runs(results, "shaped_hier_*bit.json").items():
        out += ["", f"## Hierarchical: {doc['network']} ({_source(doc)})", ""] + size_table(doc)
    train = load_runs(results, "shaped_train_4rank_*bit.json")
    if train:
        first = next(iter(train.values()))
        out += ["", "## Training step (GPT example) on the shaped cluster", "",
                "Model and steps: " + ", ".join(
                    f"{k} {first['args'][k]}" for k in ("layers", "width", "heads", "seq",
                                                        "batch", "steps", "warmup")
                    if k in first.get("args", {})) + " (per rank); loss: the last run's.",
                "Files: " + ", ".join(_source(d) for d in train.values()), ""]
        out += training_table(train)
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--size", default=64 * 2**20, type=int,
                   help="fp32 bytes for the per-rate tables and plots (default 64 MiB)")
    args = p.parse_args(argv)
    res = args.results
    written = []
    runs = load_runs(res, "shaped_4rank_*bit.json")
    if runs:
        written.append(plot_busbw(runs, res / "busbw_vs_size.png"))
        written.append(plot_speedup(runs, args.size, res / "speedup_vs_rate.png"))
    quality = res / "quality.json"
    q = json.loads(quality.read_text()) if quality.exists() else None
    ar = runs.get(1.0)
    if q is not None or ar is not None:
        written.append(plot_error_vs_bits(q, ar, args.size, res / "error_vs_bits.png"))
    train = load_runs(res, "shaped_train_4rank_*bit.json")
    if train:
        written.append(plot_training(train, res / "train_tokens_per_s.png"))
    (res / "summary.md").write_text(summary(res, args.size))
    written.append(res / "summary.md")
    for w in written:
        print(f"wrote {w}")
    return written


if __name__ == "__main__":
    main()
