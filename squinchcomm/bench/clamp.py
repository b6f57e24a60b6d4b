"""Dynamic Clamping: quantization error of ReLU^2 FFN activations vs the weight scale.

Run from the repository root::

    python -m squinchcomm.bench clamp           # writes bench/results/clamp.{json,md,png}
    python -m squinchcomm.bench clamp --quick   # seconds-long smoke run

For each bit width and each FFN weight scale ``s``, the activations
``relu(h @ (s W).T) ** 2`` are fake-quantized with a constant limit (tuned at
``s = 1`` as ``multiplier * rms``) and with the dynamic limits ``std``, ``rms``
and ``weight`` (the last predicted from ``rms(W) * sqrt(fan_in)``, squared for
ReLU^2); see :func:`measure_error_vs_scale`, which this command calls once
per bit width. Reported: SQNR in dB and the fraction of
nonzero activations quantized to 0. Shrinking weights narrow the value band
(it scales as ``s^2``): a constant limit flushes it to zero, a dynamic one
follows it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from squinchcomm.bench.common import versions, write_results
from squinchcomm.nn.clamp import DEFAULT_MULTIPLIER, DynamicClamp, dynamic_limit, sqnr_db

__all__ = ["main", "measure_error_vs_scale", "LIMIT_MODES"]

DEFAULT_PROG = "python -m squinchcomm.bench clamp"
LIMIT_MODES = ("constant", "std", "rms", "weight")
# Weight scales 10 .. 1e-3, four points per decade.
DEFAULT_SCALES = ",".join(f"{10 ** (1 - i / 4):.3g}" for i in range(17))


def measure_error_vs_scale(scales=(1.0, 0.3, 0.1, 0.03, 0.01), bits: int = 8,
                           multiplier: float = DEFAULT_MULTIPLIER, tokens: int = 512,
                           d_in: int = 256, d_ff: int = 1024, seed: int = 0) -> list:
    """Quantization error of ReLU^2 FFN activations vs the FFN weight scale.

    Steps: 1. draw unit-normal inputs ``h`` (tokens, d_in) and a weight ``W``
    (d_ff, d_in) with unit pre-activation RMS; 2. tune the constant limit at
    scale 1 as ``multiplier * rms`` of the activations there; 3. for each
    scale ``s``, quantize ``relu(h @ (s W).T) ** 2`` with the constant limit
    and with each dynamic mode (``"weight"`` with ``power=2``).

    Returns:
        One dict per scale: ``scale``, ``sqnr_db`` (mode -> dB) and
        ``zeroed`` (mode -> fraction of nonzero activations quantized to 0).
    """
    gen = torch.Generator().manual_seed(seed)
    # Step 1
    h = torch.randn(tokens, d_in, generator=gen)
    w = torch.randn(d_ff, d_in, generator=gen) / math.sqrt(d_in)
    # Step 2: the "rms" limit at scale 1, frozen
    limit = float(dynamic_limit(torch.relu(h @ w.T) ** 2, "rms", multiplier))
    clamps = {"constant": DynamicClamp(bits, "constant", limit=limit),
              **{m: DynamicClamp(bits, m, multiplier, power=2.0 if m == "weight" else 1.0)
                 for m in ("std", "rms", "weight")}}
    # Step 3
    rows = []
    for s in scales:
        ws = w * s
        y = torch.relu(h @ ws.T) ** 2  # (tokens, d_ff)
        nonzero = y != 0
        row = {"scale": float(s), "sqnr_db": {}, "zeroed": {}}
        for name, clamp in clamps.items():
            q = clamp(y, weight=ws)
            row["sqnr_db"][name] = sqnr_db(y, q)
            row["zeroed"][name] = ((q == 0) & nonzero).sum().item() / max(nonzero.sum().item(), 1)
        rows.append(row)
    return rows


def _numbers(p, flag: str, text: str, kind=float) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag} must be comma-separated numbers, got {text!r}")
    if not values:
        p.error(f"{flag} must list at least one value")
    return values


def _parse(argv):
    p = argparse.ArgumentParser(prog=DEFAULT_PROG, description=__doc__.split("\n")[0])
    p.add_argument("--scales", default=DEFAULT_SCALES,
                   help="FFN weight scales, comma-separated (default 10 .. 1e-3, 4 per decade)")
    p.add_argument("--bits", default="8,4", help="bit widths, comma-separated")
    p.add_argument("--multiplier", type=float, default=DEFAULT_MULTIPLIER,
                   help="limit in units of the measured scale (constant: of the rms at scale 1)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="3 scales, 256 tokens, d_ff 256: a smoke run")
    p.add_argument("--out", default="bench/results", help="directory for clamp.{json,md,png}")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    args = p.parse_args(argv)
    if args.quick:
        args.scales, args.tokens, args.d_ff = "1,0.1,0.01", 256, 256
    args.scale_list = _numbers(p, "--scales", args.scales)
    args.bit_list = _numbers(p, "--bits", args.bits, int)
    if min(args.scale_list) <= 0:
        p.error(f"--scales must be > 0, got {args.scales!r}")
    if min(args.bit_list) < 2:
        p.error(f"--bits must be >= 2, got {args.bits!r}")
    for name in ("tokens", "d_in", "d_ff"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _markdown(doc: dict) -> str:
    m, p = doc["machine"], doc["parameters"]
    lines = [
        "# Dynamic Clamping: quantization error vs FFN weight scale",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['versions'].get('torch')}, "
        f"{m['platform']} (numbers are deterministic for the seed; no timings).",
        "",
        f"Data: activations `relu(h @ (s W).T) ** 2`, h: ({p['tokens']}, {p['d_in']}) unit "
        f"normal, W: ({p['d_ff']}, {p['d_in']}) with unit pre-activation RMS at s = 1, seed "
        f"{p['seed']}. Limits: constant = {p['multiplier']:g} x rms of the activations at "
        f"s = 1; std / rms = {p['multiplier']:g} x std / rms of the current activations; "
        f"weight = {p['multiplier']:g} x (rms(sW) sqrt(fan_in))^2.",
        "",
        "Each cell: SQNR dB / fraction of nonzero activations quantized to 0.",
    ]
    for bits in p["bits"]:
        lines += ["", f"## int{bits}", "",
                  "| weight scale | " + " | ".join(LIMIT_MODES) + " |",
                  "|---:|" + "---:|" * len(LIMIT_MODES)]
        for row in doc["results"][str(bits)]:
            cells = [f"{row['sqnr_db'][mode]:.1f} / {row['zeroed'][mode]:.3f}"
                     for mode in LIMIT_MODES]
            lines.append(f"| {row['scale']:.3g} | " + " | ".join(cells) + " |")
    if doc.get("plot"):
        lines += ["", f"Plot: `{doc['plot']}` (SQNR vs weight scale, log x)."]
    lines += ["", f"Done in {doc['seconds_total']} s.", ""]
    return "\n".join(lines)


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_list = doc["parameters"]["bits"]
    fig, axes = plt.subplots(2, len(bits_list), figsize=(5 * len(bits_list), 6.5),
                             sharex=True, squeeze=False)
    for col, bits in enumerate(bits_list):
        rows = doc["results"][str(bits)]
        scales = [r["scale"] for r in rows]
        for mode in LIMIT_MODES:
            # SQNR of an all-zero output is 0 dB; inf (exact) cannot be drawn
            sq = [r["sqnr_db"][mode] if math.isfinite(r["sqnr_db"][mode]) else float("nan")
                  for r in rows]
            axes[0][col].plot(scales, sq, marker="o", label=mode)
            axes[1][col].plot(scales, [r["zeroed"][mode] for r in rows], marker="o", label=mode)
        axes[0][col].set_title(f"int{bits}")
        axes[0][col].set_ylabel("SQNR (dB)")
        axes[1][col].set_ylabel("nonzero values flushed to 0")
        axes[1][col].set_xlabel("FFN weight scale s")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("ReLU^2 FFN activations: constant vs dynamic clamp limits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> dict:
    """Run the clamp benchmark; write ``clamp.{json,md}`` (and the ``.png``) to --out.

    Returns:
        The JSON document; ``results[str(bits)]`` is the list returned by
        :func:`measure_error_vs_scale` for those bits.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    t0 = time.perf_counter()
    results = {
        str(bits): measure_error_vs_scale(
            scales=args.scale_list, bits=bits, multiplier=args.multiplier, tokens=args.tokens,
            d_in=args.d_in, d_ff=args.d_ff, seed=args.seed)
        for bits in args.bit_list
    }
    doc = {
        "benchmark": "clamp",
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "machine": {"platform": platform.platform(), "cpu": versions()["cpu"],
                    "cpu_count": os.cpu_count(), "versions": versions()},
        "parameters": {"scales": args.scale_list, "bits": args.bit_list,
                       "multiplier": args.multiplier, "tokens": args.tokens,
                       "d_in": args.d_in, "d_ff": args.d_ff, "seed": args.seed},
        "modes": list(LIMIT_MODES),
        "results": results,
        "plot": None,
        "seconds_total": None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        _plot(doc, out / "clamp_error_vs_weight_scale.png")
        doc["plot"] = str(out / "clamp_error_vs_weight_scale.png")
    doc["seconds_total"] = round(time.perf_counter() - t0, 1)
    write_results(out, "clamp", doc, _markdown(doc))
    return doc


if __name__ == "__main__":
    main(prog="python -m squinchcomm.bench.clamp")
