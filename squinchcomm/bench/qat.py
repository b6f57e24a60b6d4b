"""Dynamic Clamping: quantization-aware training (QAT) of the GPT FFN.

Run from the repository root::

    python -m squinchcomm.bench qat           # writes bench/results/qat.{json,md}
    python -m squinchcomm.bench qat --quick   # seconds-long smoke run

The same :class:`~squinchcomm.models.tinygpt.TinyGPT` with a ReLU^2 FFN
(``mlp_act="relu2"``; same init, same batches) is trained

- without fake quantization (the float32 baseline), and, at each bit width,
- with a constant clamp limit, calibrated as a user would on the initial
  model: ``multiplier x rms`` of the FFN activations (all layers pooled) on
  the first training batch, so at step 0 it equals the ``rms`` limit;
- with the dynamic limits ``rms`` (``multiplier x rms`` of the current
  activations) and ``weight`` (``multiplier x (rms(W) sqrt(fan_in))^2``),

once per ``--weight-decay`` value (AdamW decoupled weight decay on the
weight matrices and embeddings: it shrinks the FFN weights, and with them the
activations, which is the drift a constant limit cannot follow).

Reported per run: the held-out loss, the training loss of the last steps,
and at the end, on one held-out batch, the SQNR of the fake-quantized FFN
activations (all layers pooled), the fraction of nonzero activations
quantized to 0, and the activation RMS (against its value at calibration),
also every ``--every`` steps.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from squinchcomm.bench.common import option, write_results
from squinchcomm.bench.zreg import (TAIL, add_training_args, machine_info, train_run,
                                    training_corpus)
from squinchcomm.models import corpus as corpus_mod
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT, batch_tensors
from squinchcomm.nn.clamp import DEFAULT_MULTIPLIER, sqnr_db

__all__ = ["main", "ffn_activations", "LIMIT_MODES"]

DEFAULT_PROG = "python -m squinchcomm.bench qat"
LIMIT_MODES = ("constant", "rms", "weight")


@torch.no_grad()
def ffn_activations(model: TinyGPT, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the FFN hidden activations of every layer, flattened, before and after the clamp.

    One eval-mode forward of ``idx``; the first tensor is the activation
    (``act(c_fc(x))``), the second what the next layer receives (the
    fake-quantized values, or the same values without a clamp).
    """
    before, after = [], []
    handles = []
    for block in model.h:
        handles.append(block.mlp.act.register_forward_hook(
            lambda module, inputs, output: before.append(output.reshape(-1).float())))
        if block.mlp.clamp is not None:
            handles.append(block.mlp.clamp.register_forward_hook(
                lambda module, inputs, output: after.append(output.reshape(-1).float())))
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not after:  # no clamp: the next layer receives the activations themselves
        after = before
    return torch.cat(before), torch.cat(after)


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def _parse(argv):
    p = argparse.ArgumentParser(prog=DEFAULT_PROG, description=__doc__.split("\n")[0])
    p.add_argument("--bits", default="8,4", help="bit widths, comma-separated")
    p.add_argument("--multiplier", type=float, default=DEFAULT_MULTIPLIER,
                   help="limit in units of the measured scale (and of the calibration rms)")
    p.add_argument("--weight-decay", default="0",
                   help="AdamW weight decay(s) of the weight matrices, comma-separated; "
                        "every run is repeated per value (e.g. 0,1)")
    p.add_argument("--every", type=int, default=100,
                   help="record the FFN activation RMS every this many steps")
    add_training_args(p, steps=800)
    p.add_argument("--out", default="bench/results", help="directory for qat.{json,md}")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.batch, args.seq = 4, 2, 4, 32
        args.n_layer, args.n_embd, args.n_head = 1, 32, 2
    try:
        args.wd_list = [float(w) for w in args.weight_decay.split(",") if w.strip()]
    except ValueError:
        p.error(f"--weight-decay must be comma-separated numbers, got {args.weight_decay!r}")
    if not args.wd_list or min(args.wd_list) < 0 or len(set(args.wd_list)) < len(args.wd_list):
        p.error(f"--weight-decay must list distinct values >= 0, got {args.weight_decay!r}")
    try:
        args.bit_list = [int(b) for b in args.bits.split(",") if b.strip()]
    except ValueError:
        p.error(f"--bits must be comma-separated integers, got {args.bits!r}")
    if not args.bit_list or min(args.bit_list) < 2:
        p.error(f"--bits must list bit widths >= 2, got {args.bits!r}")
    if not args.multiplier > 0:
        p.error(f"--multiplier must be > 0, got {args.multiplier}")
    for name in ("steps", "every", "batch", "seq", "n_layer", "n_embd", "n_head", "threads"):
        if getattr(args, name) < 1:
            p.error(f"{option(name)} must be >= 1, got {getattr(args, name)}")
    return args


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _markdown(doc: dict) -> str:
    m, p = doc["machine"], doc["parameters"]
    wds = ", ".join(f"{w:g}" for w in p["weight_decay"])
    lines = [
        "# Dynamic Clamping: QAT of the GPT FFN",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
        f"torch {m['versions'].get('torch')}, {m['platform']}. Times are noisy (shared "
        "machine); the losses are deterministic.",
        "",
        f"Model: TinyGPT with a ReLU^2 FFN, {p['n_layer']} layers, width {p['n_embd']}, "
        f"{p['n_head']} heads, {p['num_params']} parameters; AdamW lr {p['lr']:g}, betas "
        f"0.9/0.95, weight decay {wds} on the weight matrices and the embedding (wd=... in "
        f"the run name when several), {p['steps']} steps of {p['batch']} x {p['seq']} bytes "
        "(same init and batches in every run). The FFN hidden activation is fake-quantized "
        f"(STE) with limit: constant = {p['multiplier']:g} x rms of the initial model's FFN "
        f"activations on the first training batch ({p['calibrated_limit']:.4g}); rms = "
        f"{p['multiplier']:g} x rms of the current activations; weight = "
        f"{p['multiplier']:g} x (rms(W_fc) sqrt(fan_in))^2. Train loss: mean of the last "
        f"{p['train_loss_tail']} steps; held-out loss: 4 held-out batches; vs fp32: against "
        "the unquantized run with the same weight decay. End-of-training columns: FFN "
        "activations of one held-out batch, all layers pooled (SQNR of the fake "
        "quantization; fraction of nonzero activations quantized to 0; activation RMS / its "
        f"value at calibration, {p['calibration_rms']:.4g}).",
        "",
        "| run | held-out loss | vs fp32 | train loss | SQNR dB | zeroed | act RMS ratio "
        "| seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = doc["runs"]
    for name, r in runs.items():
        base = runs[r["baseline"]]["val_loss"]
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_loss'] - base:+.4f} "
                     f"| {r['train_loss']:.4f} | {_fmt(r['sqnr_db'], '.1f')} "
                     f"| {_fmt(r['zeroed'], '.3f')} | {r['act_rms_ratio']:.2f} "
                     f"| {r['seconds']} |")
    steps = next(iter(runs.values()))["probe_steps"]
    lines += ["", "FFN activation RMS / calibration RMS on the held-out batch during training "
              "(does it drift up or down, i.e. what a constant limit would have to follow):", "",
              "| run | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|---|" + "---:|" * len(steps)]
    for name, r in runs.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r["act_rms_curve"]) + " |")
    lines += ["", f"Done in {doc['seconds_total']} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> dict:
    """Run the QAT measurement; write ``qat.{json,md}`` to --out.

    Returns:
        The JSON document; ``runs[name]`` (``"fp32"``, then
        ``"int{bits} {mode}"``, each followed by ``" wd={value}"`` when several
        weight decays are compared) has ``weight_decay``, ``baseline`` (the
        name of the fp32 run with the same weight decay), ``val_loss``,
        ``train_loss``, ``losses``, ``sqnr_db`` and ``zeroed`` (None without a
        clamp), ``act_rms_ratio``, ``probe_steps`` and ``act_rms_curve`` (the
        activation RMS ratio at those steps), ``limit`` (the last limit of the
        first layer's clamp), ``seconds``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    t0 = time.perf_counter()
    data = training_corpus(args)
    base = dict(block_size=args.seq, n_layer=args.n_layer, n_embd=args.n_embd,
                n_head=args.n_head, mlp_act="relu2")
    # Calibrate the constant limit on the initial model and the first batch.
    x_first, _ = batch_tensors(corpus_mod.sample_windows(data.train, args.batch, args.seq,
                                                         args.seed, step=1))
    calibration_rms = _rms(ffn_activations(TinyGPT(GPTConfig(**base)), x_first)[0])
    limit = args.multiplier * calibration_rms
    x_val, _ = batch_tensors(corpus_mod.sample_windows(data.val, args.batch, args.seq,
                                                       args.seed + 2, step=0))
    configs = {"fp32": GPTConfig(**base)}
    for bits in args.bit_list:
        for mode in LIMIT_MODES:
            configs[f"int{bits} {mode}"] = GPTConfig(
                **base, clamp=mode, clamp_bits=bits, clamp_multiplier=args.multiplier,
                clamp_limit=limit if mode == "constant" else None)

    def probe(model: TinyGPT) -> dict:
        return {"rms": _rms(ffn_activations(model, x_val)[0]) / calibration_rms}

    runs = {}
    for wd in args.wd_list:
        suffix = f" wd={wd:g}" if len(args.wd_list) > 1 else ""
        for name, config in configs.items():
            r = train_run(config, data, args.steps, args.batch, args.seq, args.lr, args.seed,
                          every=args.every, probe=probe, weight_decay=wd)
            model = r["model"]
            act, quant = ffn_activations(model, x_val)
            clamped = config.clamp is not None
            zeroed = ((act != 0) & (quant == 0)).sum().item() / max(1, (act != 0).sum().item())
            runs[name + suffix] = {
                "clamp": config.clamp, "bits": config.clamp_bits if clamped else None,
                "weight_decay": wd, "baseline": "fp32" + suffix,
                "val_loss": r["val_loss"], "train_loss": r["train_loss"], "losses": r["losses"],
                "sqnr_db": sqnr_db(act, quant) if clamped else None,
                "zeroed": zeroed if clamped else None,
                "act_rms_ratio": _rms(act) / calibration_rms,
                "probe_steps": [q["step"] for q in r["probes"]],
                "act_rms_curve": [q["rms"] for q in r["probes"]],
                "limit": float(model.h[0].mlp.clamp.last_limit) if clamped else None,
                "seconds": r["seconds"],
            }
            num_params = model.num_params()
            print(f"# qat: {name + suffix}: held-out {r['val_loss']:.4f} ({r['seconds']} s)",
                  file=sys.stderr, flush=True)
    doc = {
        "benchmark": "qat",
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "machine": machine_info(),
        "parameters": {"bits": args.bit_list, "multiplier": args.multiplier,
                       "weight_decay": args.wd_list, "every": args.every,
                       "steps": args.steps, "batch": args.batch, "seq": args.seq,
                       "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                       "lr": args.lr, "seed": args.seed, "num_params": num_params,
                       "calibration_rms": calibration_rms, "calibrated_limit": limit,
                       "corpus_sha256": data.sha256, "train_loss_tail": TAIL},
        "runs": runs,
        "seconds_total": round(time.perf_counter() - t0, 1),
    }
    write_results(args.out, "qat", doc, _markdown(doc))
    return doc


if __name__ == "__main__":
    main(prog="python -m squinchcomm.bench.qat")
