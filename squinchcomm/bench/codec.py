"""Codec bandwidth: encode / decode / decode-accumulate next to a memory copy.

    python -m squinchcomm.bench codec -b 1M -e 256M -f 4 -n 20 -w 3

For each size (bytes of float32 data) and backend, every operation is timed
(median of ``-n`` runs after ``-w`` warm-ups) together with a plain copy of
the same float32 buffer in the same run. ``GB/s`` counts the float32 side:
input bytes for encode, output bytes for decode and decode-accumulate (k
payloads summed into one fp32 buffer). ``x copy`` = copy time / op time, the
figure of merit (1.0 = as fast as moving the fp32 data once).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from squinchcomm import __version__, codec
from squinchcomm.bench.common import add_sweep_args, size_sweep, versions

__all__ = ["main", "run"]

OPS = ("encode", "encode_sr", "decode", "decode_acc", "reduce_encode")


def _timer(gpu: bool):
    """Return ``time(fn, n, warmup) -> median seconds`` for host or device work."""
    if not gpu:
        def run_host(fn, n, warmup):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        return run_host
    import cupy

    def run_gpu(fn, n, warmup):
        for _ in range(warmup):
            fn()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(n):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        return statistics.median(times)
    return run_gpu


def _cases(x, k, backend):
    """The timed operations on the float32 array ``x`` (NumPy or CuPy)."""
    xp = np if isinstance(x, np.ndarray) else __import__("cupy")
    n = x.size
    kw = {} if backend == "cuda" else {"backend": backend}
    payload = codec.encode(x, **kw)
    stack = xp.stack([payload] * k)
    out_p = xp.empty_like(payload)
    out_f = xp.empty_like(x)
    return {
        "encode": lambda: codec.encode(x, out=out_p, **kw),
        "encode_sr": lambda: codec.encode(x, rounding="stochastic", seed=1, out=out_p, **kw),
        "decode": lambda: codec.decode(payload, n, out=out_f, **kw),
        "decode_acc": lambda: codec.decode_accumulate(stack, n, out_f, scale=1.0 / k, **kw),
        "reduce_encode": lambda: codec.reduce_encode(stack, n, scale=1.0 / k, out=out_p, **kw),
    }


def run(sizes, backends, ops=OPS, k=4, iters=20, warmup=3, seed=0):
    """Measure; return a list of result rows (dicts)."""
    rows = []
    for backend in backends:
        gpu = backend == "cuda"
        timer = _timer(gpu)
        for nbytes in sizes:
            n = max(8, nbytes // 4)
            host = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
            if gpu:
                import cupy

                x = cupy.asarray(host)
            else:
                x = host
            copy_dst = x.copy()
            xp = np if not gpu else __import__("cupy")
            t_copy = timer(lambda: xp.copyto(copy_dst, x), iters, warmup)
            cases = _cases(x, k, backend)
            for op in ops:
                t = timer(cases[op], iters, warmup)
                rows.append(dict(backend=backend, op=op, size=4 * n, count=n, type="float32",
                                 k=k if op in ("decode_acc", "reduce_encode") else 1,
                                 time_us=t * 1e6, gbps=4 * n / t / 1e9,
                                 copy_gbps=4 * n / t_copy / 1e9, vs_copy=t_copy / t))
    return rows


def _header(args, backends):
    lines = [f"# squinchcomm {__version__} codec benchmark",
             f"# sizes {args.minbytes}..{args.maxbytes} x{args.stepfactor}  iters {args.iters}  "
             f"warmup {args.warmup}  k {args.k}  backends {','.join(backends)}",
             f"# host {platform.node()} {platform.machine()} {platform.processor() or ''}".rstrip(),
             "# " + "  ".join(f"{k} {v}" for k, v in versions().items()),
             "# GB/s counts float32 bytes (input for encode, output for decode*); "
             "x copy = copy time / op time, same buffer size, same run",
             f"# {'backend':>8} {'op':>13} {'size':>12} {'count':>11} {'type':>7} {'k':>2} "
             f"{'time(us)':>10} {'GB/s':>7} {'copyGB/s':>8} {'x copy':>6}"]
    return "\n".join(lines)


def _row(r):
    return (f"  {r['backend']:>8} {r['op']:>13} {r['size']:>12} {r['count']:>11} {r['type']:>7} "
            f"{r['k']:>2} {r['time_us']:>10.1f} {r['gbps']:>7.2f} {r['copy_gbps']:>8.2f} "
            f"{r['vs_copy']:>6.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m squinchcomm.bench codec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p, iters=20, warmup=3)
    p.add_argument("-k", type=int, default=4, help="payloads per decode-accumulate (ranks)")
    p.add_argument("--backends", default="auto",
                   help="comma list of numba, oracle, cuda (auto: numba, plus cuda with a GPU)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--json", metavar="FILE", help="also write the rows and parameters as JSON")
    args = p.parse_args(argv)
    backends = _backends(args.backends)
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - set(OPS)
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; choose from {', '.join(OPS)}")
    try:
        sizes = size_sweep(args.minbytes, args.maxbytes, args.stepfactor)
    except ValueError as exc:
        p.error(str(exc))
    print(_header(args, backends), flush=True)
    rows = []
    for size in sizes:
        for r in run([size], backends, ops, args.k, args.iters, args.warmup):
            print(_row(r), flush=True)
            rows.append(r)
    big = [r for r in rows if r["size"] == sizes[-1]]
    print("# at the largest size: " + "; ".join(
        f"{r['backend']} {r['op']} {r['gbps']:.2f} GB/s ({r['vs_copy']:.2f}x copy)" for r in big))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "versions": versions(), "rows": rows}, fh, indent=1)
    return rows


def _backends(spec: str):
    if spec != "auto":
        chosen = [b for b in spec.split(",") if b]
        bad = set(chosen) - set(codec.BACKENDS)
        if bad:
            raise SystemExit(f"unknown backends {sorted(bad)}; choose from {codec.BACKENDS}")
        return chosen
    chosen = ["numba"]
    try:
        import cupy

        if cupy.is_available():
            chosen.append("cuda")
    except ImportError:
        pass
    return chosen


if __name__ == "__main__":
    main()
