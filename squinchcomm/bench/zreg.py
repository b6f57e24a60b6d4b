"""Attention Z-Reg: mean |Z| of the attention rows over training, with and without it.

Run from the repository root::

    python -m squinchcomm.bench zreg           # writes bench/results/zreg.{json,md,png}
    python -m squinchcomm.bench zreg --quick   # seconds-long smoke run

Four runs of the same :class:`~squinchcomm.bench.tinygpt.TinyGPT` (same init,
same batches): Z-Reg off / on (``zreg_coef`` on the attention logits and
``zreg_head_coef`` on the LM-head logits), each with a float32 forward and
with a bfloat16 autocast forward (``torch.autocast("cpu", torch.bfloat16)``;
the weights and the optimizer stay float32). Every ``--every`` steps the mean
``|Z|`` (logsumexp) of all attention rows is measured by
:func:`~squinchcomm.bench.tinygpt.attention_z` on one fixed held-out batch, in
float32. At the end: the mean training loss of the last steps and the held-out
loss (:func:`~squinchcomm.bench.tinygpt.estimate_loss`, float32).

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

from squinchcomm.bench import corpus as corpus_mod
from squinchcomm.bench.common import versions, write_results
from squinchcomm.bench.tinygpt import (GPTConfig, TinyGPT, attention_z, batch_tensors,
                                       estimate_loss)

__all__ = ["main", "train_run", "add_training_args", "machine_info", "RUNS"]

DEFAULT_PROG = "python -m squinchcomm.bench zreg"
# (name, Z-Reg on, bfloat16 autocast forward)
RUNS = (("fp32", False, False), ("fp32+zreg", True, False),
        ("bf16", False, True), ("bf16+zreg", True, True))
QUICK_CORPUS_BYTES = 1 << 20  # --quick reads less of the stdlib
TAIL = 10  # training loss reported as the mean over the last TAIL steps


def machine_info() -> dict:
    """Platform, CPU, CPU count, torch threads and package versions, for the result files."""
    v = versions()
    return {"platform": platform.platform(), "cpu": v["cpu"], "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "versions": v}


def train_run(config: GPTConfig, data: corpus_mod.Corpus, steps: int, batch: int, seq: int,
              lr: float, seed: int, bf16: bool = False, every: int = 0,
              probe: Callable[[TinyGPT], dict] | None = None) -> dict:
    """Train a TinyGPT with AdamW on deterministic batches; return losses and probes.

    The model's init depends only on ``config.init_seed`` and step ``s`` trains
    on ``sample_windows(data.train, batch, seq, seed, step=s)``, so runs that
    differ only in a technique see the same init and the same data.

    Args:
        config: the model (and technique) configuration.
        data: the corpus.
        steps, batch, seq: optimizer steps, sequences per step, tokens per sequence.
        lr: AdamW learning rate (constant, betas 0.9 / 0.95, no weight decay).
        seed: data order seed; the held-out loss uses ``seed + 1``.
        bf16: run forward and loss under ``torch.autocast("cpu", torch.bfloat16)``.
        every: call ``probe`` at step 0 and every ``every`` steps (0: never).
        probe: ``probe(model) -> dict`` measurement, e.g. attention ``|Z|``.

    Returns:
        ``{"train_loss": mean of the last TAIL steps, "val_loss", "losses",
        "probes": [{"step", **probe(model)}, ...], "seconds", "model"}``.
    """
    model = TinyGPT(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
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


def add_training_args(p: argparse.ArgumentParser, steps: int) -> None:
    """The model and training options :func:`train_run` takes (shared with qat)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="a tiny model for 4 steps: a smoke run")


def _parse(argv):
    p = argparse.ArgumentParser(prog=DEFAULT_PROG, description=__doc__.split("\n")[0])
    p.add_argument("--coef", type=float, default=1e-4, help="Z-Reg coefficient of attention")
    p.add_argument("--head-coef", type=float, default=1e-4,
                   help="Z-Reg coefficient of the LM-head logits")
    p.add_argument("--every", type=int, default=20, help="measure |Z| every this many steps")
    add_training_args(p, steps=160)
    p.add_argument("--out", default="bench/results", help="directory for zreg.{json,md,png}")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.batch, args.seq = 4, 2, 4, 32
        args.n_layer, args.n_embd, args.n_head = 1, 32, 2
    for name in ("steps", "every", "batch", "seq", "n_layer", "n_embd", "n_head", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.coef > 0 or not args.head_coef >= 0:
        p.error(f"--coef must be > 0 and --head-coef >= 0, got {args.coef}, {args.head_coef}")
    return args


def _markdown(doc: dict) -> str:
    m, p = doc["machine"], doc["parameters"]
    runs = doc["runs"]
    lines = [
        "# Attention Z-Reg: mean |Z| of attention rows over training",
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
        f"every run). Z-Reg: coef {p['coef']:g} on attention rows, {p['head_coef']:g} on the "
        "LM-head rows. bf16: forward under `torch.autocast('cpu', torch.bfloat16)`, float32 "
        "weights. |Z|: mean |logsumexp| over all attention rows (layers, heads, queries) of "
        "one fixed held-out batch, measured in float32. Train loss: mean of the last "
        f"{TAIL} steps; held-out loss: 4 held-out batches, float32.",
        "",
        "| run | mean \\|Z\\| at step 0 | final mean \\|Z\\| | train loss | held-out loss "
        "| seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['z'][0]:.3f} | {r['z'][-1]:.3f} | {r['train_loss']:.4f} "
                     f"| {r['val_loss']:.4f} | {r['seconds']} |")
    steps = runs[next(iter(runs))]["z_steps"]
    lines += ["", "Mean \\|Z\\| over training:", "",
              "| step | " + " | ".join(runs) + " |", "|---:|" + "---:|" * len(runs)]
    for i, step in enumerate(steps):
        lines.append(f"| {step} | " + " | ".join(f"{r['z'][i]:.3f}" for r in runs.values())
                     + " |")
    lines += ["", "Summary (computed from the numbers above):", ""]
    lines += [f"- {s}" for s in doc["summary"]]
    if doc.get("plot"):
        lines += ["", f"Plot: `{doc['plot']}`."]
    lines += ["", f"Done in {doc['seconds_total']} s.", ""]
    return "\n".join(lines)


def _summary(runs: dict) -> list[str]:
    """One factual sentence per precision: |Z| and loss with Z-Reg against without."""
    out = []
    for prec in ("fp32", "bf16"):
        off, on = runs[prec], runs[prec + "+zreg"]
        out.append(f"{prec}: Z-Reg changes the final mean |Z| from {off['z'][-1]:.3f} to "
                   f"{on['z'][-1]:.3f} ({on['z'][-1] / off['z'][-1]:.2f}x) and the held-out "
                   f"loss from {off['val_loss']:.4f} to {on['val_loss']:.4f} "
                   f"({on['val_loss'] - off['val_loss']:+.4f}).")
    for zr in ("", "+zreg"):
        a, b = runs["fp32" + zr], runs["bf16" + zr]
        out.append(f"bf16 vs fp32{' with Z-Reg' if zr else ' without Z-Reg'}: held-out loss "
                   f"{b['val_loss'] - a['val_loss']:+.4f}, final |Z| "
                   f"{b['z'][-1] - a['z'][-1]:+.3f}.")
    return out


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in doc["runs"].items():
        ax.plot(r["z_steps"], r["z"], marker="o", label=name,
                linestyle="--" if name.startswith("bf16") else "-")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean |Z| of attention rows (held-out batch)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("TinyGPT attention |Z| with and without Z-Reg")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> dict:
    """Run the Z-Reg measurement; write ``zreg.{json,md}`` (and the ``.png``) to --out.

    Returns:
        The JSON document; ``runs[name]`` has ``z_steps``, ``z`` (mean ``|Z|``
        at those steps), ``train_loss``, ``val_loss``, ``losses``, ``seconds``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = corpus_mod.load_corpus(max_bytes=QUICK_CORPUS_BYTES if args.quick
                                  else corpus_mod.DEFAULT_MAX_BYTES)
    x_val, _ = batch_tensors(corpus_mod.sample_windows(data.val, args.batch, args.seq,
                                                       args.seed + 2, step=0))

    def probe(model: TinyGPT) -> dict:
        return {"z": attention_z(model, x_val)}

    base = dict(block_size=args.seq, n_layer=args.n_layer, n_embd=args.n_embd,
                n_head=args.n_head)
    runs = {}
    for name, zreg_on, bf16 in RUNS:
        config = GPTConfig(**base, zreg_coef=args.coef if zreg_on else 0.0,
                           zreg_head_coef=args.head_coef if zreg_on else None)
        r = train_run(config, data, args.steps, args.batch, args.seq, args.lr, args.seed,
                      bf16=bf16, every=args.every, probe=probe)
        runs[name] = {"zreg_coef": config.zreg_coef, "zreg_head_coef": config.head_coef,
                      "bf16": bf16, "z_steps": [q["step"] for q in r["probes"]],
                      "z": [q["z"] for q in r["probes"]], "train_loss": r["train_loss"],
                      "val_loss": r["val_loss"], "losses": r["losses"],
                      "seconds": r["seconds"]}
        num_params = r["model"].num_params()
    doc = {
        "benchmark": "zreg",
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "machine": machine_info(),
        "parameters": {"coef": args.coef, "head_coef": args.head_coef, "steps": args.steps,
                       "every": args.every, "batch": args.batch, "seq": args.seq,
                       "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                       "lr": args.lr, "seed": args.seed, "num_params": num_params,
                       "corpus_sha256": data.sha256, "train_loss_tail": TAIL},
        "runs": runs,
        "summary": _summary(runs),
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
