"""The quality table: how much each gradient codec distorts real and synthetic data.

Run from the repository root::

    python -m squinchcomm.bench quality            # writes bench/results/quality.{md,json}
    python -m squinchcomm.bench.quality --quick    # a seconds-long smoke run, writes nothing

Codecs: Squinch (nearest and stochastic rounding; 6 bits per element, scales
included), fp16 and bf16 casts, and int8 / int4 block absmax with float32
scales at several block sizes (see :mod:`squinchcomm.codec.baselines`).

Data (fixed seeds):

- ``gaussian``: N(0, 1), ``--n`` elements.
- ``student_t3``: Student t with 3 degrees of freedom (heavy tails, outliers).
- ``gpt_grad@stepK``: the whole flattened gradient of a tiny byte-level GPT
  (:mod:`squinchcomm.models.tinygpt`) trained on the stdlib corpus
  (:mod:`squinchcomm.models.corpus`), at the first and the last step; for the
  last step also per-tensor statistics, slicing the jointly encoded vector
  (as a fused gradient buffer is sent).

Metrics, for input ``x`` and decoded ``x^`` (sums in float64):

- bits/elem: wire bits per element including per-block scales, ignoring the
  tail padding of the last block (negligible at these sizes).
- rel RMS: ``||x^ - x||_2 / ||x||_2``.
- max err: ``max_i |x^_i - x_i| / max_i |x_i|``, the worst element error
  relative to the largest magnitude in the whole tensor.
- cosine: ``<x, x^> / (||x||_2 ||x^||_2)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from squinchcomm.bench.common import versions
from squinchcomm.codec import baselines, oracle

__all__ = ["main", "metrics", "METRIC_DEFINITIONS"]

DEFAULT_PROG = "python -m squinchcomm.bench quality"
METRIC_DEFINITIONS = {
    "bits_per_element": "wire bits per element incl. per-block scales (tail padding ignored)",
    "rel_rms": "||x^ - x||_2 / ||x||_2",
    "max_err": "max_i |x^_i - x_i| / max_i |x_i| (whole tensor)",
    "cosine": "<x, x^> / (||x||_2 ||x^||_2)",
}


# ----------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------
def metrics(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Return rel RMS, max error and cosine of decoded ``y`` against ``x``.

    Args:
        x: the original values (1-D, finite).
        y: the decoded values, same shape.

    Returns:
        ``{"rel_rms", "max_err", "cosine"}`` as defined in :data:`METRIC_DEFINITIONS`.

    Example:
        >>> m = metrics(np.array([3.0, 4.0]), np.array([3.0, 4.5]))
        >>> round(m["rel_rms"], 3), round(m["max_err"], 3)
        (0.1, 0.125)
    """
    x = np.asarray(x, np.float64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    err = y - x
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    return {
        "rel_rms": float(np.linalg.norm(err) / nx) if nx else float("nan"),
        "max_err": float(np.abs(err).max() / np.abs(x).max()) if nx else float("nan"),
        "cosine": float(x @ y / (nx * ny)) if nx and ny else float("nan"),
    }


# ----------------------------------------------------------------------------
# Codecs: label -> (bits per element, roundtrip function).
# ----------------------------------------------------------------------------
def _squinch_backend() -> tuple[Callable, Callable, str]:
    """Return ``(encode, decode, name)``: the public API if it matches the oracle.

    The oracle defines the format; the public ``squinchcomm.codec.encode`` is
    preferred (faster) once it exists and produces the oracle's bytes on a probe.
    """
    import squinchcomm.codec as codec

    enc, dec = getattr(codec, "encode", None), getattr(codec, "decode", None)
    if not (callable(enc) and callable(dec)):
        return oracle.encode, oracle.decode, "squinchcomm.codec.oracle"
    probe = np.random.default_rng(0).standard_normal(1003).astype(np.float32)
    try:
        same = all(np.array_equal(np.asarray(enc(probe, rounding=r, seed=5)),
                                  oracle.encode(probe, rounding=r, seed=5))
                   for r in ("nearest", "stochastic"))
        p = oracle.encode(probe)
        same = same and np.array_equal(np.asarray(dec(p, probe.size)),
                                       oracle.decode(p, probe.size))
        why = "differs from the oracle on a probe"
    except Exception as exc:  # any failure of the probe means: measure the oracle
        same, why = False, f"probe failed: {type(exc).__name__}: {exc}"
    if same:
        return enc, dec, "squinchcomm.codec.encode/decode (matches the oracle)"
    # recorded in the results, so a broken public API is visible, not hidden
    return oracle.encode, oracle.decode, f"squinchcomm.codec.oracle (public API {why})"


def _methods(blocks: list[int], seed: int):
    """Return ``[(label, bits_per_element, roundtrip(x) -> x^)]`` in table order."""
    enc, dec, backend = _squinch_backend()
    squinch_bits = 8.0 * 6 / 8  # 6 bytes per 8 elements, scale included

    def squinch(rounding):
        return lambda x: np.asarray(dec(enc(x, rounding=rounding, seed=seed), x.size))

    out = [("squinch-nearest", squinch_bits, squinch("nearest")),
           ("squinch-stochastic", squinch_bits, squinch("stochastic")),
           ("fp16", baselines.bits_per_element("fp16"), lambda x: baselines.roundtrip(x, "fp16")),
           ("bf16", baselines.bits_per_element("bf16"), lambda x: baselines.roundtrip(x, "bf16"))]
    for method in ("int8", "int4"):
        for b in blocks:
            out.append((f"{method}/b{b}", baselines.bits_per_element(method, block=b),
                        lambda x, m=method, b=b: baselines.roundtrip(x, m, block=b)))
    return out, backend


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------
def _synthetic(n: int, seed: int) -> list[tuple[str, str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [("gaussian", f"N(0, 1), n={n}", rng.standard_normal(n).astype(np.float32)),
            ("student_t3", f"Student t, 3 dof, n={n}",
             rng.standard_t(3, n).astype(np.float32))]


def _gradients(args) -> tuple[list[tuple[str, str, np.ndarray]], dict, object]:
    """Train the tiny GPT; return datasets, a description and the TrainResult."""
    import torch  # only the gradient part needs torch

    from squinchcomm.bench.gradients import train_and_capture
    from squinchcomm.models import corpus, tinygpt

    torch.manual_seed(args.seed)  # nothing random should use it; belt and braces
    config = tinygpt.GPTConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                               block_size=args.seq, init_seed=args.seed)
    data = corpus.load_corpus(max_bytes=args.corpus_bytes)
    steps = sorted({1, args.steps})
    result = train_and_capture(config, steps=args.steps, capture_steps=tuple(steps),
                               batch=args.batch, lr=args.lr, seed=args.seed, data=data)
    datasets = []
    for snap in result.snapshots:
        rms = float(np.sqrt(np.mean(snap.flat.astype(np.float64) ** 2)))
        datasets.append((f"gpt_grad@step{snap.step}",
                         f"tiny GPT gradient, step {snap.step}, loss {snap.loss:.3f}, "
                         f"n={snap.flat.size}, rms {rms:.2e}, max|g| {np.abs(snap.flat).max():.2e}",
                         snap.flat))
    info = {
        "model": {"n_layer": args.layers, "n_head": args.heads, "n_embd": args.width,
                  "block_size": args.seq, "params": result.model.num_params()},
        "training": {"steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
                     "optimizer": "AdamW(0.9, 0.95), no weight decay",
                     "first_loss": result.losses[0], "last_loss": result.losses[-1],
                     "val_loss": result.val_loss, "seconds": round(result.seconds, 2)},
        "corpus": data.describe(),
    }
    return datasets, info, result


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------
def _evaluate(datasets, methods) -> tuple[list[dict], dict]:
    """Round-trip every dataset through every codec; keep the decoded final gradient."""
    rows, decoded_last = [], {}
    for name, _, x in datasets:
        for label, bits, fn in methods:
            y = fn(x)
            rows.append({"data": name, "method": label, "bits_per_element": bits,
                         **metrics(x, y)})
            if name == datasets[-1][0]:
                decoded_last[label] = y
    return rows, decoded_last


def _per_tensor(x: np.ndarray, decoded: dict, layout) -> list[dict]:
    """Per parameter tensor rel RMS (the vector was encoded whole, then sliced)."""
    rows = []
    for label, y in decoded.items():
        errs = []
        for s in layout:
            xs, ys = x[s.offset:s.offset + s.numel], y[s.offset:s.offset + s.numel]
            if np.any(xs):  # an all-zero gradient has no relative error
                errs.append((metrics(xs, ys)["rel_rms"], s.name))
        worst = max(errs)
        rows.append({"method": label, "tensors": len(errs),
                     "median_rel_rms": float(np.median([e for e, _ in errs])),
                     "worst_rel_rms": worst[0], "worst_tensor": worst[1]})
    return rows


# ----------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return (sha + ("+dirty" if dirty.strip() else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine() -> dict:
    """Platform, CPU, versions (from package metadata) and the git commit."""
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "git": _git_commit(), **versions()}


def _versions_line(m: dict) -> str:
    skip = {"platform", "cpu_count", "git", "cpu"}
    return " ".join(f"{k} {v}" for k, v in m.items() if k not in skip) + f" (git {m['git']})"


def _markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A markdown table; ``align`` has one ``l`` or ``r`` per column."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _main_table(rows: list[dict]) -> str:
    return _markdown_table(
        ["data", "method", "bits/elem", "rel RMS", "max err", "cosine"],
        [[r["data"], r["method"], f"{r['bits_per_element']:g}", f"{r['rel_rms']:.3e}",
          f"{r['max_err']:.3e}", f"{r['cosine']:.6f}"] for r in rows], "llrrrr")


def _tensor_table(rows: list[dict]) -> str:
    return _markdown_table(
        ["method", "tensors", "median rel RMS", "worst rel RMS", "worst tensor"],
        [[r["method"], str(r["tensors"]), f"{r['median_rel_rms']:.3e}",
          f"{r['worst_rel_rms']:.3e}", f"`{r['worst_tensor']}`"] for r in rows], "lrrrl")


def _markdown_report(doc: dict) -> str:
    m = doc["machine"]
    out = ["# Squinch quality vs baselines", "",
           f"Command: `{doc['command']}`  ",
           f"Machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs  ",
           f"Versions: {_versions_line(m)}  ",
           f"Squinch backend: `{doc['squinch_backend']}`; parameters: "
           + ", ".join(f"{k}={v}" for k, v in doc["parameters"].items()), "",
           "Data:", ""]
    out += [f"- `{name}`: {desc}" for name, desc in doc["datasets"].items()]
    if "gradients" in doc:
        g = doc["gradients"]
        md, tr = g["model"], g["training"]
        out += [f"- model: tiny GPT, {md['n_layer']} layers, {md['n_head']} heads, width "
                f"{md['n_embd']}, context {md['block_size']}, {md['params']:,} parameters",
                f"- training: {tr['steps']} steps of {tr['optimizer']}, lr {tr['lr']}, batch "
                f"{tr['batch']} x {tr['seq']} bytes, loss {tr['first_loss']:.3f} -> "
                f"{tr['last_loss']:.3f}, val loss {tr['val_loss']:.3f} ({tr['seconds']} s)",
                f"- {g['corpus']}"]
    out += ["", "## Whole-tensor error", "", _main_table(doc["rows"]), ""]
    if doc.get("per_tensor"):
        out += [f"## Per-tensor error, `{doc['per_tensor_data']}`", "",
                "The flattened gradient is encoded once (as a fused buffer); the "
                "error is then measured per parameter tensor.", "",
                _tensor_table(doc["per_tensor"]), ""]
    out += ["## Definitions", ""]
    out += [f"- {k}: {v}" for k, v in METRIC_DEFINITIONS.items()]
    out += ["- Squinch: 6 bytes per 8 elements = 6 bits/elem, scale included; "
            "int8/int4 `bN`: block absmax over N elements with a float32 scale "
            "(32/N bits/elem of the total; a float16 scale would halve that). "
            "`int4/b16` spends exactly Squinch's 6 bits/elem.",
            "- Stochastic rounding trades a larger per-call error for unbiasedness "
            "(E[x^] = x); its benefit shows when errors accumulate over steps, not here.",
            "- Blocks are cut from the flattened vector, so a large block can span two "
            "parameter tensors of very different scale (see the per-tensor table).", ""]
    return "\n".join(out)


def _parse(argv):
    p = argparse.ArgumentParser(prog=DEFAULT_PROG, description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1 << 20, help="elements of the synthetic data")
    p.add_argument("--seed", type=int, default=0, help="seed of data, init, batches, rounding")
    p.add_argument("--blocks", default="16,32,128",
                   help="int8/int4 block sizes, comma-separated (int4/b16 = Squinch's 6 bits)")
    p.add_argument("--steps", type=int, default=100, help="tiny GPT training steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128, help="context length = block_size")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--corpus-bytes", type=int, default=4 << 20)
    p.add_argument("--no-gradients", action="store_true", help="skip the GPT (no torch needed)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test; implies --no-write")
    p.add_argument("--out", default="bench/results", help="directory for quality.{json,md}")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--json", action="store_true", help="print the JSON document, not the table")
    args = p.parse_args(argv)
    try:
        args.block_list = [int(b) for b in args.blocks.split(",") if b.strip()]
    except ValueError:
        p.error(f"--blocks must be comma-separated ints, got {args.blocks!r}")
    if args.quick:
        args.n, args.steps, args.batch, args.seq = 1 << 14, 3, 4, 32
        args.layers, args.width, args.corpus_bytes, args.no_write = 1, 32, 1 << 18, True
    if args.n < 1 or args.steps < 1:
        p.error("--n and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> dict:
    """Run the quality benchmark; print the table; write bench/results/quality.*.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``); see ``--help``.
        prog: how the command was invoked, recorded in the results.

    Returns:
        The JSON document that was written (also printed with ``--json``).

    Example:
        >>> doc = main(["--quick", "--no-gradients"])  # doctest: +SKIP
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    t0 = time.perf_counter()
    # Step 1: the codecs and the data.
    methods, backend = _methods(args.block_list, args.seed)
    datasets = _synthetic(args.n, args.seed)
    grad_info, train = None, None
    if not args.no_gradients:
        grads, grad_info, train = _gradients(args)
        datasets += grads
    # Step 2: whole-tensor metrics, and per-tensor ones for the final gradient.
    rows, decoded_last = _evaluate(datasets, methods)
    per_tensor = (_per_tensor(datasets[-1][2], decoded_last, train.layout)
                  if train is not None else [])
    # Step 3: the document, printed and written.
    doc = {
        "benchmark": "quality",
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "machine": _machine(),
        "squinch_backend": backend,
        "parameters": {k: getattr(args, k) for k in
                       ("n", "seed", "blocks", "steps", "batch", "seq", "layers", "heads",
                        "width", "lr", "corpus_bytes")},
        "metrics": METRIC_DEFINITIONS,
        "datasets": {name: desc for name, desc, _ in datasets},
        "rows": rows,
        "per_tensor_data": datasets[-1][0] if per_tensor else None,
        "per_tensor": per_tensor,
        "seconds": None,
    }
    if grad_info:
        doc["gradients"] = grad_info
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    report = _markdown_report(doc)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_console(doc)
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "quality.md").write_text(report)
    return doc


def _print_console(doc: dict) -> None:
    """nccl-tests style: ``#`` header with every parameter, the table, a footer."""
    m = doc["machine"]
    print("# squinchcomm quality benchmark")
    print(f"# command: {doc['command']}")
    print(f"# machine: {m['platform']} | {m['cpu']} | {m['cpu_count']} CPUs")
    print(f"# versions: {_versions_line(m)}")
    print("# parameters: " + " ".join(f"{k}={v}" for k, v in doc["parameters"].items()))
    print(f"# squinch backend: {doc['squinch_backend']}")
    for name, desc in doc["datasets"].items():
        print(f"# data {name}: {desc}")
    print()
    print(_main_table(doc["rows"]))
    if doc["per_tensor"]:
        print(f"\n# per-tensor rel RMS, {doc['per_tensor_data']}\n")
        print(_tensor_table(doc["per_tensor"]))
    print()
    for k, v in METRIC_DEFINITIONS.items():
        print(f"# {k}: {v}")
    print(f"# done in {doc['seconds']} s")


if __name__ == "__main__":
    main(prog="python -m squinchcomm.bench.quality")
