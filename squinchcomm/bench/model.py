"""A model of allreduce time against link rate: when does Squinch pay?

    python -m squinchcomm.bench model --ranks 4 --size 64M --pipeline pipeline_cpu.json
    python -m squinchcomm.bench model --ranks 64 --size 256M --codec-gbps 400 \\
        --rates 10gbit,100gbit,400gbit --efficiency 0.9 --alpha 10us
    python -m squinchcomm.bench model --validate bench/results/shaped_4rank_*bit.json

This is a stated model, not a measurement. For N ranks, an allreduce of n
float32 elements and links of rate B bytes/s per direction:

    T_fp32    = 2(N-1)/N * 4 n    / (eff B) + 2(N-1) alpha
    T_bf16    = 2(N-1)/N * 2 n    / (eff B) + 2(N-1) alpha
    T_squinch = max(C, W) + min(C, W) / K + 2(N-1) alpha + overhead
    W         = 2(N-1)/N * 0.75 n / (eff B),   C = C_codec(n, N)

- the wire terms are the bytes each rank sends in a ring allreduce (fp32,
  bf16) or in Squinch's all-to-all + all-gather of 6-byte blocks of 8 values
  (0.75 B per element), at ``eff`` (``--efficiency``), the fraction of the link
  rate the engine reaches;
- ``alpha`` is the latency of one of the 2(N-1) message steps;
- ``C_codec`` is the compute one rank spends per call (encode of the whole
  tensor, reduce_encode of its shard from N payloads, decode of the whole
  tensor), measured by ``python -m squinchcomm.bench pipeline --json FILE``
  and read with ``--pipeline FILE`` (interpolated per size), or stated as a
  throughput with ``--codec-gbps`` (GB/s of fp32, the pipeline's ``codecGB/s``
  column); ``overhead`` is a fixed cost per call of the compressed path
  (kernel launches, the extra collective; ``--overhead``, default 0);
- ``K`` is the number of chunks the compressed allreduce of
  ``squinchcomm/collectives.py`` pipelines the tensor in: ceil(4n /
  pipeline_bytes) block-aligned chunks (``--pipeline-bytes``, default 16M as
  in the library; 0 = no pipelining, K = 1).

The pipeline is modelled as two stages, codec and wire, over K equal chunks:
chunk k is on the wire while chunk k+1 is encoded and chunk k-1 reduced and
decoded, so only the shorter stage of the first or last chunk is not hidden
behind the longer stage. This is an idealisation: it assumes the codec and the
wire overlap perfectly (no contention for cores or memory, equal chunks) and
counts the latency once, not per chunk. K = 1 is the unpipelined algorithm,
T_squinch = C + W + 2(N-1) alpha + overhead (stages back to back).

The speedup is bounded by the wire-byte ratio, 4 / 0.75 = 5.33x over fp32 and
2 / 0.75 = 2.67x over bf16, reached as the link gets slow. The crossover rate,
above which compression stops paying, solves T_squinch = T_fp32 (or T_bf16);
alpha cancels out of it. Within each regime both sides are linear in 1/rate,
and their difference falls as 1/rate grows, so there is one crossover, in
closed form (``crossover_bps``):

    codec the longer stage (C >= W):  1/rate* = (C + overhead)     / (w_b - w_sq / K)
    wire the longer stage  (W >  C):  1/rate* = (C / K + overhead) / (w_b - w_sq)

where w_sq and w_b = 8 * 2(N-1)/N * (0.75, 4 or 2) n / eff are Squinch's and the
baseline's wire times multiplied by the rate in bits/s. K = 1 gives the
unpipelined rate* = 8 * 2(N-1)/N * (4 - 0.75) n / (eff (C + overhead)) bits/s.

For a GPU cluster pass a GPU pipeline JSON (``pipeline --device cuda``
on one GPU of that cluster); without one the GPU numbers are unmeasured and
only the formula is given.

``--validate FILE...`` compares the model with shaped-cluster runs
(``bench/shaped_cluster.py``, JSON of ``python -m squinchcomm.bench allreduce``
with ``engine_fp32`` and ``squinch`` rows and a per-stage table). The link
rate comes from the file's network description ("every link 1gbit each way").
The efficiency is fitted per file from its ``engine_fp32`` row, so the fp32
model equals the measurement by construction and the Squinch prediction is
the test. C_codec comes from ``--pipeline`` / ``--codec-gbps`` when given, else
from the file's own stage table (encode + reduce_encode + decode, rank 0).
K comes from the file's ``pipeline_bytes`` entry when it records one, else
from ``--pipeline-bytes`` (the output says which).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import re
from pathlib import Path

from squinchcomm import __version__, collectives
from squinchcomm.bench.common import parse_size, versions
from squinchcomm.codec.format import BLOCK, BLOCK_BYTES
from squinchcomm.collectives.policy import overlapped_seconds, pipeline_chunks

__all__ = ["main", "parse_rate", "parse_time", "wire_bytes", "pipeline_chunks",
           "allreduce_times", "crossover_bps", "codec_seconds", "validate", "BYTES_PER_ELEMENT"]

# Bytes per element on the wire, by method (Squinch: 6-byte blocks of 8 values).
BYTES_PER_ELEMENT = {"fp32": 4.0, "bf16": 2.0, "squinch": BLOCK_BYTES / BLOCK}
DEFAULT_RATES = "200mbit,1gbit,10gbit,25gbit,100gbit,400gbit"
DEFAULT_PIPELINE_BYTES = 16 << 20  # Communicator's default pipeline_bytes
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_NUMBER = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?)"


# ---------------------------------------------------------------------------- units
def parse_rate(text: str) -> float:
    """Parse a link rate in tc's units (``200mbit``, ``1gbit``, ``2.5gbit``) into bits/s."""
    m = re.fullmatch(rf"\s*{_NUMBER}\s*(bit|kbit|mbit|gbit|tbit)\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"rate {text!r}: use a positive rate like 200mbit, 1gbit or 2.5gbit "
                         "(bits per second, per link direction)")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def parse_time(text: str) -> float:
    """Parse a duration (``10us``, ``0.4ms``, ``0``) into seconds."""
    m = re.fullmatch(rf"\s*{_NUMBER}\s*(s|ms|us|ns)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"time {text!r}: use a non-negative duration like 0, 10us or 0.4ms")
    return float(m.group(1)) * _TIME_UNITS[(m.group(2) or "s").lower()]


def format_rate(bps: float) -> str:
    """Bits/s as a short tc-style string (``200mbit``, ``1gbit``)."""
    for unit, scale in (("tbit", 1e12), ("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g}{unit}"
    return f"{bps:.3g}bit"


# ---------------------------------------------------------------------------- the model
def wire_bytes(n: int, ranks: int, method: str = "squinch") -> float:
    """Bytes one rank sends per allreduce of ``n`` elements (``method``: fp32,
    bf16 or squinch): the library's :func:`squinchcomm.wire_bytes`."""
    return collectives.wire_bytes(int(n), ranks, method)


def allreduce_times(n: int, ranks: int, rate_bps: float, efficiency: float, alpha: float,
                    codec_s: float, overhead: float = 0.0, chunks: int = 1) -> dict:
    """Modelled seconds per allreduce of ``n`` fp32 elements for fp32, bf16 and Squinch.

    Squinch's codec (``codec_s``) and wire time overlap over ``chunks`` (K)
    pipeline chunks: max(C, W) + min(C, W) / K. Returns ``{"fp32", "bf16",
    "squinch", "squinch_wire"}``; ``squinch_wire`` is Squinch's exchange part
    (wire + latency), without codec and overhead.
    """
    bytes_per_s = efficiency * rate_bps / 8
    latency = 2 * (ranks - 1) * alpha
    t = {m: wire_bytes(n, ranks, m) / bytes_per_s + latency for m in ("fp32", "bf16")}
    wire_s = wire_bytes(n, ranks, "squinch") / bytes_per_s
    t["squinch_wire"] = wire_s + latency
    t["squinch"] = overlapped_seconds(codec_s, wire_s, chunks) + latency + overhead
    return t


def crossover_bps(n: int, ranks: int, efficiency: float, codec_s: float, overhead: float = 0.0,
                  baseline: str = "fp32", chunks: int = 1) -> float:
    """The link rate (bits/s) where T_squinch = T_baseline; below it Squinch is faster.

    The latency terms are the same on both sides and cancel. In x = 1/rate the
    wire times are w_sq x and w_b x, and T_squinch - T_baseline =
    max(C, w_sq x) + min(C, w_sq x) / K + overhead - w_b x falls strictly
    with x (w_b > w_sq), from C + overhead at x = 0: one root, in the regime
    where the codec is the longer stage if that regime's root lies in it,
    else in the one where the wire is. ``inf`` when the codec and overhead
    cost nothing (Squinch pays at every rate).
    """
    if codec_s + overhead <= 0:
        return math.inf
    w_sq = 8 * wire_bytes(n, ranks, "squinch") / efficiency
    w_b = 8 * wire_bytes(n, ranks, baseline) / efficiency
    x = (codec_s + overhead) / (w_b - w_sq / chunks)  # codec the longer stage: w_sq x <= C
    if w_sq * x > codec_s:  # the root lies where the wire is the longer stage
        x = (codec_s / chunks + overhead) / (w_b - w_sq)
    return 1 / x


def codec_seconds(doc: dict, n: int, ranks: int) -> tuple[float, str]:
    """C_codec(n, N) from a pipeline JSON: (seconds per call, how it was obtained).

    The codec's cost per element is interpolated linearly in log(size) between
    the measured sizes at ``ranks``; outside them the nearest size's cost per
    element is used (and the note says "extrapolated").
    """
    rows = [r for r in doc.get("rows", []) if r.get("ranks") == ranks]
    if not rows:
        have = sorted({r.get("ranks") for r in doc.get("rows", [])})
        raise ValueError(f"the pipeline JSON has no rows for {ranks} ranks (it has {have}): run "
                         f"python -m squinchcomm.bench pipeline --ranks {ranks} --json FILE")
    per_el = sorted({r["count"]: r["codec_us"] * 1e-6 / r["count"] for r in rows}.items())
    counts = [c for c, _ in per_el]
    where = f"{doc.get('device', 'unknown device')}, {ranks} ranks"
    i = bisect.bisect_left(counts, n)
    if i < len(counts) and counts[i] == n:
        return per_el[i][1] * n, f"measured at this size ({where})"
    if i == 0 or i == len(counts):
        c, cost = per_el[0] if i == 0 else per_el[-1]
        return cost * n, (f"extrapolated from the cost per element at {4 * c} B ({where}; "
                          f"measured {4 * counts[0]}..{4 * counts[-1]} B)")
    (c0, e0), (c1, e1) = per_el[i - 1], per_el[i]
    w = math.log(n / c0) / math.log(c1 / c0)
    return (e0 + w * (e1 - e0)) * n, f"interpolated between {4 * c0} and {4 * c1} B ({where})"


# ---------------------------------------------------------------------------- validation
def _network(path: Path, doc: dict) -> str:
    """The network description of a benchmark JSON (or of the .txt saved beside it)."""
    network = doc.get("network") or doc.get("args", {}).get("network")
    if network:
        return network
    txt = path.with_suffix(".txt")
    if txt.exists():
        for line in txt.read_text().splitlines():
            if line.startswith("# network"):
                return line
    raise ValueError(f"{path}: no network description: expected a 'network' entry like "
                     "'every link 1gbit each way' (bench/shaped_cluster.py records it) or a "
                     f"{txt.name} beside it with a '# network' line")


def network_rate(network: str) -> float:
    """The link rate (bits/s) of a shaped-cluster description ('every link 1gbit each way')."""
    m = re.search(r"every link\s+(\S+)", network)
    if not m:
        raise ValueError(f"no link rate in network description {network!r}: expected "
                         "'every link <rate> ...' as bench/shaped_cluster.py writes it")
    return parse_rate(m.group(1))


def _pipeline_bytes(path: Path, doc: dict, assumed: int) -> tuple[int, str]:
    """The pipeline chunk size a benchmark JSON was measured with: (bytes, where from)."""
    recorded = doc.get("pipeline_bytes")
    if recorded is None:
        return assumed, f"--pipeline-bytes {assumed}, assumed: the file records no pipeline_bytes"
    if not isinstance(recorded, int) or recorded < 0:
        raise ValueError(f"{path}: 'pipeline_bytes' is {recorded!r}; expected the integer "
                         "chunk size in bytes the benchmark ran with (0: no pipelining)")
    return recorded, f"the file's pipeline_bytes {recorded}"


def validate(paths, alpha: float, overhead: float, pipeline: dict | None = None,
             codec_gbps: float | None = None,
             pipeline_bytes: int = DEFAULT_PIPELINE_BYTES) -> list[dict]:
    """Model vs measurement for every size of every shaped-cluster JSON in ``paths``.

    Per file and size: fit the efficiency from the ``engine_fp32`` time, take
    C_codec from ``pipeline`` / ``codec_gbps`` or else from the file's squinch
    stage times, K from the file's ``pipeline_bytes`` or else ``pipeline_bytes``,
    and predict the Squinch time. Returns one row per size.
    """
    out = []
    for path in map(Path, paths):
        doc = json.loads(path.read_text())
        rate = network_rate(_network(path, doc))
        chunk_bytes, chunk_source = _pipeline_bytes(path, doc, pipeline_bytes)
        ranks = doc.get("world_size")
        if not isinstance(ranks, int) or ranks < 2:
            raise ValueError(f"{path}: 'world_size' is {ranks!r}; a multi-rank allreduce "
                             "benchmark JSON records an integer >= 2")
        rows = {(r["method"], r["size"]): r for r in doc.get("rows", [])}
        stages = {(s["method"], s["size"]): s for s in doc.get("stages", [])}
        for size in sorted({s for m, s in rows if m == "squinch"}):
            fp32 = rows.get(("engine_fp32", size))
            if fp32 is None:
                raise ValueError(f"{path}: no engine_fp32 row at size {size}: the efficiency is "
                                 "fitted from it; run the benchmark with --methods "
                                 "engine_fp32,squinch")
            n, t_fp32 = rows[("squinch", size)]["count"], fp32["time_us"] * 1e-6
            latency = 2 * (ranks - 1) * alpha
            if t_fp32 <= latency:
                raise ValueError(f"{path}: engine_fp32 took {t_fp32 * 1e3:.3f} ms, less than "
                                 f"the modelled latency 2(N-1)*alpha = {latency * 1e3:.3f} ms: "
                                 "lower --alpha")
            eff = 8 * wire_bytes(n, ranks, "fp32") / (rate * (t_fp32 - latency))
            stage = stages.get(("squinch", size))
            measured_codec = measured_exchange = None
            if stage is not None:
                ms = stage["rank0_ms"]
                measured_codec = (ms["encode"] + ms["reduce_encode"] + ms["decode"]) * 1e-3
                measured_exchange = (ms["alltoall"] + ms["allgather"]) * 1e-3
            if pipeline is not None:
                codec_s, source = codec_seconds(pipeline, n, ranks)
                source = f"pipeline, {source}"
            elif codec_gbps is not None:
                codec_s, source = 4 * n / (codec_gbps * 1e9), f"--codec-gbps {codec_gbps:g}"
            elif measured_codec is not None:
                codec_s, source = measured_codec, "this file's stage times"
            else:
                raise ValueError(f"{path}: no squinch stage table at size {size} to take the "
                                 "codec time from: pass --pipeline FILE or --codec-gbps")
            chunks = pipeline_chunks(n, chunk_bytes)
            t = allreduce_times(n, ranks, rate, eff, alpha, codec_s, overhead, chunks)
            t_sq = rows[("squinch", size)]["time_us"] * 1e-6
            out.append(dict(file=str(path), rate_bps=rate, ranks=ranks, size=size, count=n,
                            efficiency=eff, codec_source=source, pipeline_bytes=chunk_bytes,
                            chunks=chunks, pipeline_source=chunk_source,
                            fp32_model_s=t["fp32"], fp32_measured_s=t_fp32,
                            squinch_model_s=t["squinch"], squinch_measured_s=t_sq,
                            codec_model_s=codec_s, codec_measured_s=measured_codec,
                            exchange_model_s=t["squinch_wire"],
                            exchange_measured_s=measured_exchange,
                            speedup_model=t["fp32"] / t["squinch"],
                            speedup_measured=t_fp32 / t_sq))
    return sorted(out, key=lambda r: (r["rate_bps"], r["size"]))


# ---------------------------------------------------------------------------- output
def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _formula_lines() -> list[str]:
    return [
        "# T_fp32    = 2(N-1)/N * 4 n / (eff B) + 2(N-1) alpha",
        "# T_bf16    = 2(N-1)/N * 2 n / (eff B) + 2(N-1) alpha",
        "# T_squinch = max(C, W) + min(C, W) / K + 2(N-1) alpha + overhead, "
        "W = 2(N-1)/N * 0.75 n / (eff B), C = C_codec",
        "# n = fp32 elements, B = link rate per direction (bytes/s), eff = fraction of it the "
        "engine reaches",
        "# K = pipeline chunks, ceil(4n / pipeline_bytes): codec and wire ideally overlapped "
        "but for one chunk (K = 1: back to back)",
    ]


def _on_gpu(pipeline: dict | None) -> bool:
    """Whether a pipeline JSON was measured with the CUDA codec."""
    return pipeline is not None and any(r.get("device") == "cuda" for r in pipeline["rows"])


def _gpu_note(on_gpu: bool) -> str:
    if on_gpu:
        return "# codec measured on a GPU: the rows model a GPU cluster with that codec"
    return ("# GPU cluster: pass a GPU pipeline JSON (pipeline --device cuda --json FILE); "
            "without one the GPU numbers are unmeasured and only the formula applies")


def _table(args, n, codec_s, codec_desc, rates, on_gpu: bool) -> dict:
    """Print the model table for the rate list; return it as a dict."""
    chunks = pipeline_chunks(n, args.pipeline_bytes)
    rows = []
    for text in rates:
        rate = parse_rate(text)
        t = allreduce_times(n, args.ranks, rate, args.efficiency, args.alpha, codec_s,
                            args.overhead, chunks)
        rows.append(dict(rate=text, rate_bps=rate, fp32_s=t["fp32"], bf16_s=t["bf16"],
                         squinch_s=t["squinch"], squinch_wire_s=t["squinch_wire"],
                         codec_s=codec_s, speedup_fp32=t["fp32"] / t["squinch"],
                         speedup_bf16=t["bf16"] / t["squinch"]))
    cross = {b: crossover_bps(n, args.ranks, args.efficiency, codec_s, args.overhead, b, chunks)
             for b in ("fp32", "bf16")}
    limit = {b: BYTES_PER_ELEMENT[b] / BYTES_PER_ELEMENT["squinch"] for b in ("fp32", "bf16")}
    print("\n".join([
        f"# squinchcomm {__version__} allreduce time model (a stated model, not a measurement)",
        f"# ranks {args.ranks}  size {4 * n} B fp32 ({n} elements)  efficiency "
        f"{args.efficiency:g}  alpha {args.alpha * 1e6:g} us per step  overhead "
        f"{args.overhead * 1e6:g} us per call",
        f"# C_codec {codec_s * 1e3:.3f} ms per call: {codec_desc}",
        f"# K = {chunks} pipeline chunk(s) (--pipeline-bytes {args.pipeline_bytes}"
        f"{', no pipelining' if args.pipeline_bytes == 0 else ''})",
        *_formula_lines(),
        f"# {'rate':>9} {'T_fp32(ms)':>11} {'T_bf16(ms)':>11} {'T_squinch(ms)':>13} "
        f"{'codec(ms)':>10} {'wire_sq(ms)':>11} {'x fp32':>7} {'x bf16':>7}",
    ]))
    for r in rows:
        print(f"  {r['rate']:>9} {r['fp32_s'] * 1e3:>11.2f} {r['bf16_s'] * 1e3:>11.2f} "
              f"{r['squinch_s'] * 1e3:>13.2f} {codec_s * 1e3:>10.2f} "
              f"{r['squinch_wire_s'] * 1e3:>11.2f} {r['speedup_fp32']:>7.2f} "
              f"{r['speedup_bf16']:>7.2f}")
    for b in ("fp32", "bf16"):
        where = ("none: with a free codec Squinch pays at every rate" if math.isinf(cross[b])
                 else f"{cross[b] / 1e9:.3g} Gbit/s per link direction; Squinch is faster "
                 "below it")
        print(f"# crossover T_squinch = T_{b}: {where}")
    print(f"# upper limit (C_codec, overhead, alpha -> 0; the wire-byte ratio): "
          f"{limit['fp32']:.2f}x over fp32, {limit['bf16']:.2f}x over bf16")
    print(_gpu_note(on_gpu))
    # JSON has no infinity: a crossover that does not exist is null.
    return dict(rows=rows, pipeline_bytes=args.pipeline_bytes, chunks=chunks,
                crossover_fp32_bps=None if math.isinf(cross["fp32"]) else cross["fp32"],
                crossover_bf16_bps=None if math.isinf(cross["bf16"]) else cross["bf16"],
                limit_fp32=limit["fp32"], limit_bf16=limit["bf16"])


def _print_validation(rows, on_gpu: bool):
    print("\n".join([
        f"# squinchcomm {__version__} allreduce time model vs shaped-cluster measurements",
        *_formula_lines(),
        "# eff fitted per file from its engine_fp32 row (the fp32 model equals the measurement "
        "by construction); the squinch time is the prediction",
        "# exchange = Squinch's wire + latency terms (model) vs alltoall + allgather stages "
        "(measured, rank 0, includes waiting for peers, excludes wire time hidden behind the "
        "codec)",
        f"# {'rate':>9} {'N':>3} {'size':>10} {'K':>3} {'eff':>5} {'fp32(ms)':>9} "
        f"{'squinch model/meas(ms)':>23} {'ratio':>6} {'codec model/meas(ms)':>21} "
        f"{'exchange model/meas(ms)':>24} {'x fp32 model/meas':>18}",
    ]))
    for r in rows:
        print(f"  {format_rate(r['rate_bps']):>9} {r['ranks']:>3} {r['size']:>10} "
              f"{r['chunks']:>3} {r['efficiency']:>5.2f} {r['fp32_measured_s'] * 1e3:>9.1f} "
              f"{_ms(r['squinch_model_s']) + ' / ' + _ms(r['squinch_measured_s']):>23} "
              f"{r['squinch_model_s'] / r['squinch_measured_s']:>6.2f} "
              f"{_ms(r['codec_model_s']) + ' / ' + _ms(r['codec_measured_s']):>21} "
              f"{_ms(r['exchange_model_s']) + ' / ' + _ms(r['exchange_measured_s']):>24} "
              f"{r['speedup_model']:>9.2f} / {r['speedup_measured']:.2f}")
    for source in sorted({r["codec_source"] for r in rows}):
        print(f"# codec time from {source}")
    for path, source in sorted({(r["file"], r["pipeline_source"]) for r in rows}):
        print(f"# K for {path}: {source}")
    print(_gpu_note(on_gpu))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m squinchcomm.bench model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4, help="N, ranks in the allreduce (default 4)")
    p.add_argument("--size", default="64M", help="fp32 bytes per allreduce (default 64M)")
    p.add_argument("--rates", default=DEFAULT_RATES,
                   help=f"comma list of link rates per direction (default {DEFAULT_RATES})")
    p.add_argument("--efficiency", type=float, default=0.9,
                   help="fraction of the link rate the engine reaches (default 0.9)")
    p.add_argument("--alpha", default="10us", help="latency per message step (default 10us)")
    p.add_argument("--overhead", default="0",
                   help="fixed cost per compressed call, e.g. 0.4ms (default 0)")
    codec_src = p.add_mutually_exclusive_group()
    codec_src.add_argument("--pipeline", metavar="FILE",
                           help="C_codec from a `pipeline --json` result, interpolated per size")
    codec_src.add_argument("--codec-gbps", type=float,
                           help="C_codec = 4n / (GB/s * 1e9): codec throughput in GB/s of fp32 "
                                "(inf: a free codec)")
    p.add_argument("--pipeline-bytes", default=f"{DEFAULT_PIPELINE_BYTES >> 20}M",
                   help="the compressed allreduce's pipeline chunk size in fp32 bytes, 0 = no "
                        "pipelining (default 16M as in the library; --validate uses a file's "
                        "own pipeline_bytes when it records one)")
    p.add_argument("--validate", nargs="+", metavar="FILE",
                   help="compare with shaped-cluster allreduce JSONs instead of the rate table")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    try:
        args.alpha, args.overhead = parse_time(args.alpha), parse_time(args.overhead)
        args.pipeline_bytes = parse_size(args.pipeline_bytes)
        rates = [r for r in args.rates.split(",") if r.strip()]
        for r in rates:
            parse_rate(r)
        if not rates:
            raise ValueError("--rates is empty: pass rates like 1gbit,10gbit")
        if args.ranks < 2:
            raise ValueError(f"--ranks {args.ranks}: an allreduce model needs N >= 2 ranks")
        if not 0 < args.efficiency <= 1:
            raise ValueError(f"--efficiency {args.efficiency}: pass a fraction in (0, 1]")
        if args.codec_gbps is not None and not args.codec_gbps > 0:
            raise ValueError(f"--codec-gbps {args.codec_gbps}: pass a positive throughput "
                             "(or inf)")
        pipeline = json.loads(Path(args.pipeline).read_text()) if args.pipeline else None
        doc = dict(args=vars(args), versions=versions())
        if args.validate:
            doc["validation"] = validate(args.validate, args.alpha, args.overhead, pipeline,
                                         args.codec_gbps, args.pipeline_bytes)
            _print_validation(doc["validation"], _on_gpu(pipeline))
        else:
            n = max(1, parse_size(args.size) // 4)
            if pipeline is not None:
                codec_s, note = codec_seconds(pipeline, n, args.ranks)
                codec_desc = f"from {args.pipeline}, {note}"
            elif args.codec_gbps is not None:
                codec_s = 4 * n / (args.codec_gbps * 1e9)
                codec_desc = f"--codec-gbps {args.codec_gbps:g} (stated, not measured)"
            else:
                raise ValueError("C_codec is unknown: pass --pipeline FILE (from python -m "
                                 "squinchcomm.bench pipeline --json FILE) or --codec-gbps X")
            table = _table(args, n, codec_s, codec_desc, rates, _on_gpu(pipeline))
            doc.update(table, size=4 * n, count=n, codec_source=codec_desc)
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    except KeyError as exc:
        p.error(f"a JSON lacks the entry {exc}: pass files written by the pipeline / allreduce "
                "benchmarks with --json")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    return doc


if __name__ == "__main__":
    main()
