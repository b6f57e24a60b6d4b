"""A tiny GPT-style byte-level transformer, and real gradients from training it.

Used by the benchmarks (the quality table measures the codecs on these
gradients) and by the training examples. It imports torch, so only benchmark
and example code imports it; nothing in the library core does.

The model follows nanoGPT (Karpathy): token + learned position embeddings,
``n_layer`` pre-LayerNorm blocks of causal self-attention and a GELU MLP, a
final LayerNorm and a language-model head tied to the token embedding.
Attention is ``torch.nn.functional.scaled_dot_product_attention`` with
``is_causal=True``; :func:`reference_attention` is the same computation
written out, for tests.

Example:
    >>> import torch
    >>> from squinchcomm.bench.tinygpt import GPTConfig, TinyGPT
    >>> model = TinyGPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    >>> logits, loss = model(torch.zeros(3, 16, dtype=torch.long),
    ...                      torch.zeros(3, 16, dtype=torch.long))
    >>> tuple(logits.shape), loss.ndim
    ((3, 16, 256), 0)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from squinchcomm.bench import corpus as corpus_mod

__all__ = [
    "GPTConfig",
    "TinyGPT",
    "reference_attention",
    "ParamSlice",
    "GradientSnapshot",
    "TrainResult",
    "param_layout",
    "flat_gradients",
    "batch_tensors",
    "estimate_loss",
    "train_and_capture",
]


@dataclass(frozen=True)
class GPTConfig:
    """Model shape. The defaults give ~0.8M parameters, a few ms per token-batch on a CPU.

    Attributes:
        vocab_size: number of tokens; 256 for bytes.
        block_size: maximum context length (size of the position embedding).
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: model width.
        dropout: dropout probability (0 for gradient benchmarks: deterministic).
        bias: whether Linear and LayerNorm layers have biases.
        init_seed: seed of the weight initialisation (a private generator, so
            building a model never touches torch's global RNG).
    """

    vocab_size: int = corpus_mod.VOCAB_SIZE
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    init_seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head "
                             f"({self.n_head}); e.g. n_embd={self.n_head * 32}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention written out: softmax(q k^T / sqrt(d) + causal mask) v.

    The readable oracle of the fused ``scaled_dot_product_attention`` call.

    Args:
        q, k, v: (B, nh, T, hs) tensors.

    Returns:
        (B, nh, T, hs) tensor.
    """
    t = q.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T)
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(dim=-1) @ v  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = self.c_attn(x).split(c, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A GPT language model over bytes (nanoGPT's architecture, small).

    Args:
        config: the model shape; see :class:`GPTConfig`.
    """

    def __init__(self, config: GPTConfig = GPTConfig()):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the output projection is the token embedding (one
        # parameter, so it appears once in named_parameters and gradients).
        self.lm_head.weight = self.wte.weight
        self._init_weights(torch.Generator().manual_seed(config.init_seed))

    def _init_weights(self, gen: torch.Generator) -> None:
        """GPT-2 init: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 n_layer))."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # fixed order -> reproducible
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, resid_std, generator=gen)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02, generator=gen)
            elif "ln" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)  # biases

    def num_params(self) -> int:
        """Return the number of parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Return ``(logits, loss)``; ``loss`` is None without ``targets``.

        Args:
            idx: (B, T) int64 token ids, T <= block_size.
            targets: optional (B, T) int64 next-token ids.

        Returns:
            logits (B, T, vocab_size) and the mean cross-entropy (or None).
        """
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size "
                             f"{self.config.block_size}; raise GPTConfig.block_size.")
        pos = torch.arange(t, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t))
        return logits, loss


# ----------------------------------------------------------------------------
# Training and gradient capture.
# ----------------------------------------------------------------------------
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


def batch_tensors(windows: np.ndarray, device: str | torch.device = "cpu"):
    """Split (B, T + 1) uint8 windows into int64 inputs and targets, each (B, T)."""
    w = torch.from_numpy(windows.astype(np.int64)).to(device)
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def estimate_loss(model: TinyGPT, data: np.ndarray, batch: int, seq: int, seed: int,
                  iters: int = 4, device: str | torch.device = "cpu") -> float:
    """Return the mean loss over ``iters`` deterministic batches of ``data``."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(iters):
        x, y = batch_tensors(corpus_mod.sample_windows(data, batch, seq, seed, step=i), device)
        losses.append(model(x, y)[1].item())
    model.train(was_training)
    return float(np.mean(losses))


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
        data: a loaded :class:`~squinchcomm.bench.corpus.Corpus`; default
            :func:`~squinchcomm.bench.corpus.load_corpus`.
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
