"""Plot time and speedup against link rate from bench/shaped_cluster.py results.

    python bench/plot_shaped.py [bench/results/shaped_4rank_*_64M.json ...]

Reads the JSON files the shaped-cluster runs wrote (one per link rate, the
rate parsed from the file's network description) and writes
bench/results/shaped_speedup_vs_rate.png: allreduce time per method and the
speedup of every method over the engine's fp32 allreduce, with the 5.33x wire
limit of Squinch drawn for reference.
"""

from __future__ import annotations

import glob
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_UNITS = {"kbit": 1e-6, "mbit": 1e-3, "gbit": 1.0}


def rate_gbit(network: str) -> float:
    """The link rate in Gbit/s from a network description ('every link 1gbit ...')."""
    m = re.search(r"every link (\d+(?:\.\d+)?)(kbit|mbit|gbit)", network)
    if not m:
        raise ValueError(f"no link rate in network description {network!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def load(paths):
    """{method: [(rate, time_s)]} over the files, sorted by rate."""
    series: dict[str, list[tuple[float, float]]] = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        network = doc.get("network") or doc["args"].get("network") or _network_from_txt(path)
        rate = rate_gbit(network)
        for row in doc["rows"]:
            series.setdefault(row["method"], []).append((rate, row["time_us"] / 1e6))
    return {m: sorted(v) for m, v in series.items()}


def _network_from_txt(json_path) -> str:
    """The '# network ...' header line of the .txt saved beside the JSON."""
    txt = Path(json_path).with_suffix(".txt")
    for line in txt.read_text().splitlines():
        if line.startswith("# network"):
            return line
    raise ValueError(f"{txt} has no '# network' line")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    paths = argv or sorted(glob.glob(str(RESULTS / "shaped_4rank_*_64M.json")))
    if not paths:
        raise SystemExit("no shaped-cluster results: run bench/shaped_cluster.py first")
    series = load(paths)
    if "engine_fp32" not in series:
        raise SystemExit("the results need the engine_fp32 method as the baseline")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = dict(series["engine_fp32"])
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, points in series.items():
        rates = [r for r, _ in points]
        ax_t.plot(rates, [t for _, t in points], marker="o", label=method)
        if method != "engine_fp32":
            ax_s.plot(rates, [base[r] / t for r, t in points if r in base], marker="o",
                      label=method)
    ax_s.axhline(1.0, color="gray", lw=1)
    ax_s.axhline(4 / 0.75, color="gray", ls="--", lw=1, label="wire limit 5.33x")
    for ax in (ax_t, ax_s):
        ax.set_xscale("log")
        ax.set_xlabel("link rate per direction (Gbit/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("allreduce time (s), 64 MiB fp32, 4 ranks")
    ax_s.set_ylabel("speedup over gloo fp32 allreduce")
    fig.suptitle("Squinch on a shaped 4-host cluster (network namespaces, tc tbf, torch gloo; "
                 "2-core CPU codec)", fontsize=10)
    fig.tight_layout()
    out = RESULTS / "shaped_speedup_vs_rate.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
