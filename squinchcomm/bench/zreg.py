"""Attention Z-Reg coefficient study: |Z| and held-out loss over a sweep of coefficients.

Run from the repository root::

    python -m squinchcomm.bench zreg --threads 1   # writes bench/results/zreg.{json,md,png}
    python -m squinchcomm.bench zreg --quick       # seconds-long smoke run

For each coefficient of ``--coefs`` (0 = Z-Reg off), two runs of the same
:class:`~squinchcomm.models.tinygpt.TinyGPT` (same init, same batches): a
float32 forward and a bfloat16 autocast forward
(``torch.autocast("cpu", torch.bfloat16)``; the weights and the optimizer
stay float32). The coefficient applies to the attention logits and to the
LM-head logits alike, with ``--reduction`` (default ``mean``: the virtual
loss ``c * mean_rows Z^2`` of each call, PaLM's z-loss form, whose ``c``
does not depend on the number of rows). Every ``--every`` steps the mean
``|Z|`` (logsumexp) of the attention rows and of the LM-head rows, and the
held-out loss, are measured on fixed held-out batches, in float32
(:func:`~squinchcomm.models.tinygpt.z_means`,
:func:`~squinchcomm.models.tinygpt.estimate_loss`). At the end: the mean
training loss of the last steps and the held-out loss, per run, and the
bf16 - fp32 held-out loss gap per coefficient.

:func:`train_run` is the shared training loop (also used by
:mod:`squinchcomm.bench.qat`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from squinchcomm.bench.common import add_model_args, option, versions, write_results
from squinchcomm.models import corpus as corpus_mod
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT, batch_tensors, estimate_loss, z_means
from squinchcomm.nn.zreg import REDUCTIONS

__all__ = ["main", "train_run", "add_training_args", "training_corpus", "machine_info", "PRECISIONS",
           "DEFAULT_COEFS"]

DEFAULT_PROG = "python -m squinchcomm.bench zreg"
PRECISIONS = (("fp32", False), ("bf16", True))  # (name, bfloat16 autocast forward)
DEFAULT_COEFS = "0,1e-4,1e-3,1e-2,1e-1"  # for reduction="mean"
# The held-out loss of a constant-learning-rate run wobbles from eval to eval;
# the mean of the last TAIL_EVALS evaluations is the steadier figure.
TAIL_EVALS = 4
QUICK_CORPUS_BYTES = 1 << 20  # --quick reads less of the stdlib
TAIL = 10  # training loss reported as the mean over the last TAIL steps


def machine_info() -> dict:
    """Platform, CPU, CPU count, torch threads and package versions, for the result files."""
    v = versions()
    return {"platform": platform.platform(), "cpu": v["cpu"], "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "versions": v}


def train_run(config: GPTConfig, data: corpus_mod.Corpus, steps: int, batch: int, seq: int,
              lr: float, seed: int, bf16: bool = False, every: int = 0,
              probe: Callable[[TinyGPT], dict] | None = None,
              weight_decay: float = 0.0) -> dict:
    """Train a TinyGPT with AdamW on deterministic batches; return losses and probes.

    The model's init depends only on ``config.init_seed`` and step ``s`` trains
    on ``sample_windows(data.train, batch, seq, seed, step=s)``, so runs that
    differ only in a technique see the same init and the same data.

    Args:
        config: the model (and technique) configuration.
        data: the corpus.
        steps, batch, seq: optimizer steps, sequences per step, tokens per sequence.
        lr: AdamW learning rate (constant, betas 0.9 / 0.95).
        seed: data order seed; the held-out loss uses ``seed + 1``.
        bf16: run forward and loss under ``torch.autocast("cpu", torch.bfloat16)``.
        every: call ``probe`` at step 0 and every ``every`` steps (0: never).
        probe: ``probe(model) -> dict`` measurement, e.g. attention ``|Z|``.
        weight_decay: AdamW weight decay of the parameters with 2 or more
            dimensions (linear weights, the tied embedding); biases and
            LayerNorm are not decayed, as in GPT training.

    Returns:
        ``{"train_loss": mean of the last TAIL steps, "val_loss", "losses",
        "probes": [{"step", **probe(model)}, ...], "seconds", "model"}``.
    """
    model = TinyGPT(config)
    model.train()
    params = list(model.parameters())
    groups = [{"params": [q for q in params if q.dim() >= 2], "weight_decay": weight_decay},
              {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    probes, losses = [], []
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if probe is not None and every and (step % every == 0 or step == steps):
            probes.append({"step": step, **probe(model)})
        if step == steps:
            break
        x, y = batch_tensors(corpus_mod.sample_windows(data.train, batch, seq, seed, step + 1))
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext())
        with autocast:
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    val_loss = estimate_loss(model, data.val, batch, seq, seed + 1)
    return {"train_loss": float(np.mean(losses[-TAIL:])), "val_loss": val_loss,
            "losses": losses, "probes": probes,
            "seconds": round(time.perf_counter() - t0, 1), "model": model}


def training_corpus(args) -> corpus_mod.Corpus:
    """Apply ``--threads`` and load the corpus (less of it under ``--quick``), for the
    commands built on :func:`add_training_args`."""
    torch.set_num_threads(args.threads)
    return corpus_mod.load_corpus(max_bytes=QUICK_CORPUS_BYTES if args.quick
                                  else corpus_mod.DEFAULT_MAX_BYTES)


def add_training_args(p: argparse.ArgumentParser, steps: int) -> None:
    """The model and training options :func:`train_run` takes (shared with qat)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    add_model_args(p, layers=2, width=128, heads=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="a tiny model for 4 steps: a smoke run")


def _coefs(text: str) -> list[float]:
    """Parse ``--coefs``: a comma list of distinct finite numbers >= 0, e.g. ``0,1e-3,1e-2``."""
    try:
        coefs = [float(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--coefs takes a comma list of numbers, e.g. {DEFAULT_COEFS}; got {text!r}") from None
    if not all(np.isfinite(c) and c >= 0 for c in coefs) or len(set(coefs)) != len(coefs):
        raise argparse.ArgumentTypeError(
            f"--coefs must be distinct finite numbers >= 0 (0 = Z-Reg off), got {text!r}")
    return coefs


def _parse(argv):
    p = argparse.ArgumentParser(prog=DEFAULT_PROG, description=__doc__.split("\n")[0])
    p.add_argument("--coefs", type=_coefs, default=_coefs(DEFAULT_COEFS),
                   help="Z-Reg coefficients of attention and LM-head logits, comma separated "
                   f"(0 = off; default {DEFAULT_COEFS})")
    p.add_argument("--reduction", choices=REDUCTIONS, default="mean",
                   help="virtual loss c * mean (default) or c * sum of Z^2 over the rows")
    p.add_argument("--every", type=int, default=50,
                   help="measure |Z| and held-out loss every this many steps")
    add_training_args(p, steps=800)
    p.add_argument("--out", default="bench/results", help="directory for zreg.{json,md,png}")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.batch, args.seq = 4, 2, 4, 32
        args.n_layer, args.n_embd, args.n_head = 1, 32, 2
    for name in ("steps", "every", "batch", "seq", "n_layer", "n_embd", "n_head", "threads"):
        if getattr(args, name) < 1:
            p.error(f"{option(name)} must be >= 1, got {getattr(args, name)}")
    return args


def _run_name(precision: str, coef: float) -> str:
    return f"{precision} c={coef:g}"


def _val_tail(run: dict) -> float:
    """Mean held-out loss of the run's last TAIL_EVALS evaluations."""
    return float(np.mean(run["val_curve"][-TAIL_EVALS:]))


def _markdown(doc: dict) -> str:
    m, p = doc["machine"], doc["parameters"]
    runs = doc["runs"]
    lines = [
        "# Attention Z-Reg: coefficient study (|Z| and held-out loss)",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
        f"torch {m['versions'].get('torch')}, {m['platform']}. Times are noisy (shared "
        "machine); the losses and |Z| are deterministic.",
        "",
        f"Model: TinyGPT, {p['n_layer']} layers, width {p['n_embd']}, {p['n_head']} heads, "
        f"{p['num_params']} parameters; AdamW lr {p['lr']:g}, {p['steps']} steps of "
        f"{p['batch']} x {p['seq']} bytes of the stdlib corpus (same init and batches in "
        f"every run). Z-Reg: coefficient c on the attention rows and on the LM-head rows, "
        f"reduction `{p['reduction']}` (virtual loss c * {p['reduction']} of Z^2 over the "
        "rows of each call; c = 0: off). bf16: forward under "
        "`torch.autocast('cpu', torch.bfloat16)`, float32 weights. |Z|: mean |logsumexp| "
        "over all attention rows (layers, heads, queries), and over all LM-head rows, of "
        "one fixed held-out batch, in float32. Train loss: mean of the last "
        f"{TAIL} steps; held-out loss: 4 held-out batches, float32, at the end and as the "
        f"mean of the last {TAIL_EVALS} evaluations (every {p['every']} steps; steadier).",
        "",
        "| c | forward | attn \\|Z\\| start | attn \\|Z\\| end | head \\|Z\\| start "
        f"| head \\|Z\\| end | train loss | held-out loss | last {TAIL_EVALS} evals "
        "| vs c=0 (last evals) | seconds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs.values():
        delta = ""
        if 0.0 in p["coefs"]:
            delta = f"{_val_tail(r) - _val_tail(runs[_run_name(r['precision'], 0.0)]):+.4f}"
        lines.append(f"| {r['coef']:g} | {r['precision']} | {r['z'][0]:.3f} | {r['z'][-1]:.3f} "
                     f"| {r['head_z'][0]:.3f} | {r['head_z'][-1]:.3f} | {r['train_loss']:.4f} "
                     f"| {r['val_loss']:.4f} | {_val_tail(r):.4f} | {delta} | {r['seconds']} |")
    lines += ["", "bf16 - fp32 gap per coefficient:", "",
              "| c | fp32 held-out | bf16 held-out | gap held-out | gap, last "
              f"{TAIL_EVALS} evals | gap train |", "|---:|---:|---:|---:|---:|---:|"]
    for g in doc["gaps"]:
        lines.append(f"| {g['coef']:g} | {g['fp32_val']:.4f} | {g['bf16_val']:.4f} "
                     f"| {g['val_gap']:+.4f} | {g['val_tail_gap']:+.4f} "
                     f"| {g['train_gap']:+.4f} |")
    first = runs[next(iter(runs))]
    lines += ["", "Mean attention \\|Z\\| / held-out loss over training:", "",
              "| step | " + " | ".join(runs) + " |", "|---:|" + "---:|" * len(runs)]
    for i, step in enumerate(first["z_steps"]):
        lines.append(f"| {step} | " + " | ".join(f"{r['z'][i]:.2f} / {r['val_curve'][i]:.3f}"
                                                for r in runs.values()) + " |")
    lines += ["", "Summary (computed from the numbers above):", ""]
    lines += [f"- {s}" for s in doc["summary"]]
    if doc.get("plot"):
        lines += ["", f"Plot: `{doc['plot']}`."]
    lines += ["", f"Done in {doc['seconds_total']} s.", ""]
    return "\n".join(lines)


def _gaps(runs: dict, coefs: list[float]) -> list[dict]:
    """The bf16 - fp32 held-out and train loss differences at each coefficient."""
    out = []
    for c in coefs:
        a, b = runs[_run_name("fp32", c)], runs[_run_name("bf16", c)]
        out.append({"coef": c, "fp32_val": a["val_loss"], "bf16_val": b["val_loss"],
                    "val_gap": b["val_loss"] - a["val_loss"],
                    "val_tail_gap": _val_tail(b) - _val_tail(a),
                    "train_gap": b["train_loss"] - a["train_loss"]})
    return out


def _summary(runs: dict, coefs: list[float], gaps: list[dict]) -> list[str]:
    """Factual sentences: |Z| and held-out loss against c = 0, and the bf16 - fp32 gaps."""
    out = []
    if 0.0 in coefs:
        for c in (c for c in coefs if c > 0):
            parts = []
            for prec, _ in PRECISIONS:
                off, on = runs[_run_name(prec, 0.0)], runs[_run_name(prec, c)]
                parts.append(f"{prec} attention |Z| {off['z'][-1]:.2f} -> {on['z'][-1]:.2f}, "
                             f"head |Z| {off['head_z'][-1]:.2f} -> {on['head_z'][-1]:.2f}, "
                             f"held-out loss {on['val_loss'] - off['val_loss']:+.4f} (last "
                             f"{TAIL_EVALS} evals {_val_tail(on) - _val_tail(off):+.4f})")
            out.append(f"c={c:g} against c=0: " + "; ".join(parts) + ".")
    out.append("bf16 - fp32 held-out loss gap: " + ", ".join(
        f"{g['val_gap']:+.4f} at c={g['coef']:g}" for g in gaps) + f"; last {TAIL_EVALS} "
        "evals: " + ", ".join(f"{g['val_tail_gap']:+.4f}" for g in gaps) + ".")
    return out


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coefs = doc["parameters"]["coefs"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in doc["runs"].values():
        color = colors[coefs.index(r["coef"]) % len(colors)]
        style = "--" if r["precision"] == "bf16" else "-"
        for ax, key in zip(axes[:2], ("z", "head_z")):
            ax.plot(r["z_steps"], r[key], linestyle=style, color=color, label=r["name"])
    for ax, what in zip(axes[:2], ("attention rows", "LM-head rows")):
        ax.set_xlabel("training step")
        ax.set_ylabel(f"mean |Z| of {what} (held-out batch)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    x = np.arange(len(coefs))
    for prec, marker in (("fp32", "o"), ("bf16", "s")):
        runs = [doc["runs"][_run_name(prec, c)] for c in coefs]
        line, = axes[2].plot(x, [r["val_loss"] for r in runs], marker=marker,
                             label=f"{prec}, final")
        axes[2].plot(x, [_val_tail(r) for r in runs], marker=marker, linestyle=":",
                     color=line.get_color(), label=f"{prec}, mean of last {TAIL_EVALS} evals")
    axes[2].set_xticks(x, [f"{c:g}" for c in coefs])
    axes[2].set_xlabel(f"Z-Reg coefficient c (reduction {doc['parameters']['reduction']})")
    axes[2].set_ylabel("held-out loss")
    axes[2].grid(True, alpha=0.3)
    axes[2].legend()
    fig.suptitle("TinyGPT Z-Reg coefficient sweep: |Z| over training and held-out loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> dict:
    """Run the Z-Reg coefficient sweep; write ``zreg.{json,md}`` (and the ``.png``) to --out.

    Returns:
        The JSON document; ``runs[name]`` (name ``"<fp32|bf16> c=<coef>"``) has
        ``coef``, ``precision``, ``z_steps``, ``z`` and ``head_z`` (mean
        ``|Z|`` of attention and LM-head rows at those steps), ``val_curve``
        (held-out loss at those steps), ``train_loss``, ``val_loss``,
        ``losses``, ``seconds``; ``gaps`` has the bf16 - fp32 differences.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    t0 = time.perf_counter()
    data = training_corpus(args)
    x_val, _ = batch_tensors(corpus_mod.sample_windows(data.val, args.batch, args.seq,
                                                       args.seed + 2, step=0))

    def probe(model: TinyGPT) -> dict:
        z = z_means(model, x_val)
        return {"z": z["attention"], "head_z": z["head"],
                "val_loss": estimate_loss(model, data.val, args.batch, args.seq, args.seed + 1)}

    base = dict(block_size=args.seq, n_layer=args.n_layer, n_embd=args.n_embd,
                n_head=args.n_head, zreg_reduction=args.reduction)
    runs = {}
    for coef in args.coefs:
        for prec, bf16 in PRECISIONS:
            config = GPTConfig(**base, zreg_coef=coef)
            r = train_run(config, data, args.steps, args.batch, args.seq, args.lr, args.seed,
                          bf16=bf16, every=args.every, probe=probe)
            name = _run_name(prec, coef)
            runs[name] = {"name": name, "coef": coef, "precision": prec,
                          "z_steps": [q["step"] for q in r["probes"]],
                          "z": [q["z"] for q in r["probes"]],
                          "head_z": [q["head_z"] for q in r["probes"]],
                          "val_curve": [q["val_loss"] for q in r["probes"]],
                          "train_loss": r["train_loss"], "val_loss": r["val_loss"],
                          "losses": r["losses"], "seconds": r["seconds"]}
            num_params = r["model"].num_params()
            print(f"{name}: held-out loss {r['val_loss']:.4f}, attention |Z| "
                  f"{runs[name]['z'][-1]:.3f}, {r['seconds']} s", file=sys.stderr, flush=True)
    gaps = _gaps(runs, args.coefs)
    doc = {
        "benchmark": "zreg",
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "machine": machine_info(),
        "parameters": {"coefs": args.coefs, "reduction": args.reduction, "steps": args.steps,
                       "every": args.every, "batch": args.batch, "seq": args.seq,
                       "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                       "lr": args.lr, "seed": args.seed, "num_params": num_params,
                       "corpus_sha256": data.sha256, "train_loss_tail": TAIL},
        "runs": runs,
        "gaps": gaps,
        "summary": _summary(runs, args.coefs, gaps),
        "plot": None,
        "seconds_total": None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        _plot(doc, out / "zreg_z_curve.png")
        doc["plot"] = str(out / "zreg_z_curve.png")
    doc["seconds_total"] = round(time.perf_counter() - t0, 1)
    write_results(out, "zreg", doc, _markdown(doc))
    return doc


if __name__ == "__main__":
    main(prog="python -m squinchcomm.bench.zreg")
