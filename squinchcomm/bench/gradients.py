"""Real gradients for the codec benchmarks: train the tiny GPT and capture them.

:func:`train_and_capture` trains a :class:`~squinchcomm.models.tinygpt.TinyGPT`
on the stdlib byte corpus and keeps the raw gradient of chosen steps, flattened
as a data-parallel rank would send it (the ``quality`` command measures the
codecs on them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from squinchcomm.models import corpus as corpus_mod
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT, batch_tensors, estimate_loss

__all__ = [
    "ParamSlice",
    "GradientSnapshot",
    "TrainResult",
    "param_layout",
    "flat_gradients",
    "train_and_capture",
]


@dataclass(frozen=True)
class ParamSlice:
    """Where one parameter's gradient lives in the flattened vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass
class GradientSnapshot:
    """The gradient of one training step, as a data-parallel rank would send it.

    Attributes:
        step: 1-based step whose backward pass produced it.
        loss: the training loss of that step.
        flat: float32 (num_params,) all gradients concatenated in
            ``named_parameters`` order (see :func:`param_layout`).
    """

    step: int
    loss: float
    flat: np.ndarray = field(repr=False)


@dataclass
class TrainResult:
    """What :func:`train_and_capture` returns."""

    model: TinyGPT = field(repr=False)
    layout: list[ParamSlice] = field(repr=False)
    snapshots: list[GradientSnapshot]
    losses: list[float] = field(repr=False)
    val_loss: float
    seconds: float


def param_layout(model: nn.Module) -> list[ParamSlice]:
    """Return the offset of each parameter in the flattened gradient vector."""
    out, offset = [], 0
    for name, p in model.named_parameters():
        out.append(ParamSlice(name, tuple(p.shape), offset, p.numel()))
        offset += p.numel()
    return out


def flat_gradients(model: nn.Module) -> np.ndarray:
    """Return all ``.grad`` tensors as one float32 NumPy vector (zeros where None)."""
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
             for _, p in model.named_parameters()]
    return torch.cat(parts).to(torch.float32).cpu().numpy()


def train_and_capture(config: GPTConfig = GPTConfig(), steps: int = 30,
                      capture_steps: tuple[int, ...] = (1, 30), batch: int = 16,
                      seq: int | None = None, lr: float = 3e-3, seed: int = 0,
                      data: corpus_mod.Corpus | None = None,
                      device: str | torch.device = "cpu") -> TrainResult:
    """Train a :class:`TinyGPT` on the stdlib corpus and capture real gradients.

    Steps:
        1. Build the model (seeded init) and an AdamW optimizer.
        2. For each step, draw a deterministic batch (``seed``, step), run
           forward and backward.
        3. At each step in ``capture_steps``, copy the raw gradient (before the
           optimizer update; this is what data-parallel ranks would average).
        4. Update, and at the end measure the validation loss.

    Args:
        config: model shape.
        steps: optimizer steps to run.
        capture_steps: 1-based steps whose gradients to return.
        batch: sequences per step.
        seq: context length; default ``config.block_size``.
        lr: AdamW learning rate (constant; betas 0.9 / 0.95 as in GPT training).
        seed: seeds the data order (the init seed is ``config.init_seed``).
        data: a loaded :class:`~squinchcomm.models.corpus.Corpus`; default
            :func:`~squinchcomm.models.corpus.load_corpus`.
        device: torch device.

    Returns:
        A :class:`TrainResult` with the snapshots, losses and parameter layout.

    Example:
        >>> r = train_and_capture(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=32),
        ...                       steps=2, capture_steps=(2,), batch=2)
        >>> r.snapshots[0].flat.shape == (r.model.num_params(),)
        True
    """
    seq = config.block_size if seq is None else seq
    if steps < 1 or batch < 1 or not 1 <= seq <= config.block_size:
        raise ValueError(f"need steps >= 1, batch >= 1 and 1 <= seq <= block_size "
                         f"({config.block_size}); got steps={steps}, batch={batch}, seq={seq}.")
    bad = [s for s in capture_steps if not 1 <= s <= steps]
    if bad:
        raise ValueError(f"capture_steps {bad} are outside 1..steps={steps}; "
                         "pick steps within the run or raise steps.")
    data = corpus_mod.load_corpus() if data is None else data
    t0 = time.perf_counter()
    # Step 1: model and optimizer.
    model = TinyGPT(config).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    snapshots, losses = [], []
    for step in range(1, steps + 1):
        # Step 2: forward and backward on this step's batch.
        x, y = batch_tensors(corpus_mod.sample_windows(data.train, batch, seq, seed, step),
                             device)
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        # Step 3: capture before the update changes anything.
        if step in capture_steps:
            snapshots.append(GradientSnapshot(step, loss.item(), flat_gradients(model)))
        # Step 4: update.
        opt.step()
    val_loss = estimate_loss(model, data.val, batch, seq, seed + 1, device=device)
    return TrainResult(model, param_layout(model), snapshots, losses, val_loss,
                       time.perf_counter() - t0)
