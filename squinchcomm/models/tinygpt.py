"""A tiny GPT-style byte-level transformer.

Used by the training examples and the benchmarks (the gradients of
:mod:`squinchcomm.bench.gradients`). It imports torch, so only example and
benchmark code imports it; nothing in the library core does.

The model follows nanoGPT (Karpathy): token + learned position embeddings,
``n_layer`` pre-LayerNorm blocks of causal self-attention and a GELU MLP, a
final LayerNorm and a language-model head tied to the token embedding.
Attention is ``torch.nn.functional.scaled_dot_product_attention`` with
``is_causal=True``; :func:`reference_attention` is the same computation
written out, for tests.

The companion techniques of :mod:`squinchcomm.nn` can be switched on, each
off by default (and then the model computes exactly what it did without
them, bit for bit):

- Attention Z-Reg (``GPTConfig.zreg_coef``, ``zreg_head_coef``,
  ``zreg_reduction``): attention through
  :func:`~squinchcomm.nn.zreg.zreg_attention`, the LM-head logits through
  :func:`~squinchcomm.nn.zreg.zreg_logits`; ``model.zreg_stats`` records the
  mean ``|Z|`` of the attention rows, :func:`attention_z` (and
  :func:`z_means`, with the LM-head rows) measures it with or without Z-Reg.
- Dynamic Clamping (``GPTConfig.mlp_act="relu2"``, ``clamp=...``): QAT fake
  quantization of the FFN hidden activation by
  :class:`~squinchcomm.nn.clamp.DynamicClamp`.
- Visibility masks (``TinyGPT.forward(..., visibility=(start, limit))``):
  packed documents through the blockwise
  :func:`~squinchcomm.nn.visibility.visibility_attention`;
  :func:`separator_doc_ids` and :func:`document_visibility` build the mask of
  corpus windows that cross file boundaries.
- Gumbel top-k distillation: the teacher's logits of the windows a student
  run draws go to :func:`squinchcomm.nn.distill.dump_teacher`, the student
  reads them with :func:`~squinchcomm.nn.distill.open_teacher` (see
  ``examples/gpt_train.py``).

Example:
    >>> import torch
    >>> from squinchcomm.models.tinygpt import GPTConfig, TinyGPT
    >>> model = TinyGPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    >>> logits, loss = model(torch.zeros(3, 16, dtype=torch.long),
    ...                      torch.zeros(3, 16, dtype=torch.long))
    >>> tuple(logits.shape), loss.ndim
    ((3, 16, 256), 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from squinchcomm.models import corpus as corpus_mod
from squinchcomm.nn import visibility as visibility_mod
from squinchcomm.nn.clamp import DEFAULT_MULTIPLIER, MODES as CLAMP_MODES, DynamicClamp
from squinchcomm.nn.zreg import REDUCTIONS, ZRegStats, zreg_attention, zreg_logits

__all__ = [
    "GPTConfig",
    "TinyGPT",
    "MLP_ACTIVATIONS",
    "reference_attention",
    "attention_z",
    "z_means",
    "separator_doc_ids",
    "document_visibility",
    "batch_tensors",
    "estimate_loss",
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
        zreg_coef: Attention Z-Reg coefficient; > 0 runs attention through
            :func:`~squinchcomm.nn.zreg.zreg_attention` (materialized logits,
            forward unchanged up to rounding, backward adds
            ``2c * Z * softmax``) and records the rows' ``|Z|`` in
            ``TinyGPT.zreg_stats``. 0 (default): the fused attention, untouched.
        zreg_head_coef: Z-Reg coefficient of the LM-head logits (the forward
            is bit-identical); None (default) means ``zreg_coef``.
        zreg_reduction: ``"sum"`` (default; the virtual loss ``c * sum Z^2``
            over the rows of each call) or ``"mean"`` (``c * mean Z^2``, PaLM's
            z-loss form, whose ``c`` does not depend on batch, heads or
            sequence length), for attention and LM head alike.
        mlp_act: FFN activation, ``"gelu"`` (default) or ``"relu2"``
            (``relu(x) ** 2``).
        clamp: None (default), or a :class:`~squinchcomm.nn.clamp.DynamicClamp`
            mode (``"rms"``, ``"std"``, ``"weight"``, ``"constant"``) that
            fake-quantizes the FFN hidden activation (QAT). ``"weight"``
            predicts the limit from ``c_fc``'s weight, with ``power=2`` after
            ``relu2``.
        clamp_bits: bits of the fake quantization.
        clamp_multiplier: limit in units of the measured scale (not used by
            ``"constant"``).
        clamp_limit: the fixed limit, for (and only for) ``clamp="constant"``.
    """

    vocab_size: int = corpus_mod.VOCAB_SIZE
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    init_seed: int = 0
    zreg_coef: float = 0.0
    zreg_head_coef: float | None = None
    zreg_reduction: str = "sum"
    mlp_act: str = "gelu"
    clamp: str | None = None
    clamp_bits: int = 8
    clamp_multiplier: float = DEFAULT_MULTIPLIER
    clamp_limit: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head "
                             f"({self.n_head}); e.g. n_embd={self.n_head * 32}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        for name in ("zreg_coef", "zreg_head_coef"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"GPTConfig.{name} must be a finite number >= 0 "
                                 f"(0 = off), got {value}.")
        if self.zreg_reduction not in REDUCTIONS:
            raise ValueError(f"GPTConfig.zreg_reduction must be one of {REDUCTIONS}, "
                             f"got {self.zreg_reduction!r}.")
        if self.zreg_coef > 0 and self.dropout > 0:
            raise ValueError("the Z-Reg attention has no attention dropout: use dropout=0 "
                             f"with zreg_coef > 0 (got dropout={self.dropout}).")
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_act must be one of {sorted(MLP_ACTIVATIONS)}, "
                             f"got {self.mlp_act!r}.")
        if self.clamp is None and self.clamp_limit is not None:
            raise ValueError("clamp_limit is the limit of clamp='constant'; set clamp='constant' "
                             "or drop clamp_limit.")
        if self.clamp is not None and self.clamp not in CLAMP_MODES:
            raise ValueError(f"clamp must be None or one of {CLAMP_MODES}, got {self.clamp!r}.")
        _make_clamp(self)  # DynamicClamp checks bits, multiplier and limit

    @property
    def head_coef(self) -> float:
        """The Z-Reg coefficient of the LM-head logits."""
        return self.zreg_coef if self.zreg_head_coef is None else self.zreg_head_coef


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


Visibility = tuple[torch.Tensor, torch.Tensor]  # (start, limit), each (B, T)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection.

    Three paths, the first that applies:

    1. Z-Reg (``zreg_coef > 0``, or ``z_stats`` given to measure ``|Z|``):
       :func:`~squinchcomm.nn.zreg.zreg_attention` over materialized logits;
       with a visibility mask it materializes the (B, 1, T, T) mask too.
    2. Visibility mask: the blockwise
       :func:`~squinchcomm.nn.visibility.visibility_attention`, one mask per
       sequence shared by the heads.
    3. Otherwise the fused causal ``scaled_dot_product_attention``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.zreg_coef = config.zreg_coef
        self.zreg_reduction = config.zreg_reduction
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, visibility: Visibility | None = None,
                z_stats: ZRegStats | None = None) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = self.c_attn(x).split(c, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in (q, k, v))
        if visibility is not None:
            start, limit = (z[:, None] for z in visibility)  # (B, 1, T): shared by the heads
        if self.zreg_coef > 0 or z_stats is not None:
            mask = None if visibility is None else visibility_mod.dense_mask(start, limit, t)
            y = zreg_attention(q, k, v, self.zreg_coef, mask=mask, causal=visibility is None,
                               stats=z_stats, reduction=self.zreg_reduction)
        elif visibility is not None:
            y = visibility_mod.visibility_attention(q, k, v, start, limit)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ReLU2(nn.Module):
    """ReLU squared, ``relu(x) ** 2`` (Primer; So et al. 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


MLP_ACTIVATIONS = {"gelu": nn.GELU, "relu2": ReLU2}


def _make_clamp(config: GPTConfig) -> DynamicClamp | None:
    """Return the FFN's DynamicClamp for ``config`` (None when clamping is off)."""
    if config.clamp is None:
        return None
    # ReLU^2 squares its input's scale, so the weight-predicted limit does too.
    power = 2.0 if config.mlp_act == "relu2" else 1.0
    return DynamicClamp(config.clamp_bits, config.clamp, config.clamp_multiplier,
                        limit=config.clamp_limit, power=power)


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> activation (-> fake quantization) -> C."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = MLP_ACTIVATIONS[config.mlp_act]()
        self.clamp = _make_clamp(config)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.c_fc(x))  # (B, T, 4C)
        if self.clamp is not None:
            h = self.clamp(h, weight=self.c_fc.weight if self.clamp.mode == "weight" else None)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, visibility: Visibility | None = None,
                z_stats: ZRegStats | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), visibility, z_stats)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A GPT language model over bytes (nanoGPT's architecture, small).

    Args:
        config: the model shape; see :class:`GPTConfig`.

    Attributes:
        zreg_stats: a :class:`~squinchcomm.nn.zreg.ZRegStats` that every
            forward with ``zreg_coef > 0`` adds its attention rows' ``|Z|`` to
            (all layers and heads); read ``.mean``, ``.reset()`` it as you like.
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
        self.zreg_stats = ZRegStats()
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                visibility: Visibility | None = None):
        """Return ``(logits, loss)``; ``loss`` is None without ``targets``.

        Args:
            idx: (B, T) int64 token ids, T <= block_size.
            targets: optional (B, T) int64 next-token ids.
            visibility: optional ``(start, limit)`` int tensors, each (B, T):
                key j of sequence b is visible to query i iff
                ``start[b, j] <= i < limit[b, j]`` (see
                :mod:`squinchcomm.nn.visibility`; e.g. :func:`document_visibility`
                for packed documents). It replaces the causal mask, so it
                should be causal itself for a language model. Positions keep
                their absolute index in the window (position embedding).
                Default: causal.

        Returns:
            logits (B, T, vocab_size) and the mean cross-entropy (or None).
        """
        b, t = idx.shape
        logits = self._logits(idx, visibility,
                              self.zreg_stats if self.config.zreg_coef > 0 else None)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t))
        return logits, loss

    def _logits(self, idx: torch.Tensor, visibility: Visibility | None,
                z_stats: ZRegStats | None) -> torch.Tensor:
        """Return the (B, T, V) logits; attention records ``|Z|`` in ``z_stats`` if given."""
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size "
                             f"{self.config.block_size}; raise GPTConfig.block_size.")
        if visibility is not None:
            _check_visibility_arg(visibility, (b, t))
            if self.training and self.config.dropout > 0:
                raise ValueError("masked attention has no attention dropout: use dropout=0 "
                                 "with visibility=, or call model.eval().")
        pos = torch.arange(t, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x, visibility, z_stats)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if self.config.head_coef > 0:
            logits = zreg_logits(logits, self.config.head_coef,  # identity in forward
                                 reduction=self.config.zreg_reduction)
        return logits


def _check_visibility_arg(visibility, shape: tuple[int, int]) -> None:
    """Raise ValueError unless ``visibility`` is a (start, limit) pair of ``shape`` tensors."""
    if (not isinstance(visibility, (tuple, list)) or len(visibility) != 2
            or not all(isinstance(z, torch.Tensor) for z in visibility)):
        raise ValueError("visibility must be a (start, limit) pair of (B, T) integer tensors; "
                         "build one with document_visibility(doc_ids).")
    for name, z in zip(("start", "limit"), visibility):
        if tuple(z.shape) != shape:
            raise ValueError(f"visibility {name} must have the shape of idx {shape} (one entry "
                             f"per key of each sequence), got {tuple(z.shape)}.")


@torch.no_grad()
def z_means(model: TinyGPT, idx: torch.Tensor,
            visibility: Visibility | None = None) -> dict[str, float]:
    """Return the mean ``|Z|`` (logsumexp) of the attention rows and of the LM-head rows
    of one forward pass: ``{"attention": ..., "head": ...}``.

    Measured through the Z-Reg attention path in eval mode whatever the
    model's ``zreg_coef`` (0 included), attention over all layers, heads and
    queries, the head over all positions, in at least float32, so runs with
    and without Z-Reg compare on the same batch. Leaves ``model.zreg_stats``
    alone.

    Args:
        model: the model.
        idx: (B, T) token ids.
        visibility: optional (start, limit) mask, as in :meth:`TinyGPT.forward`.
    """
    attention, head = ZRegStats(), ZRegStats()
    was_training = model.training
    model.eval()
    try:
        logits = model._logits(idx, visibility, attention)  # (B, T, V)
    finally:
        model.train(was_training)
    head.add(torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1))
    return {"attention": attention.mean, "head": head.mean}


def attention_z(model: TinyGPT, idx: torch.Tensor,
                visibility: Visibility | None = None) -> float:
    """Return the mean ``|Z|`` of the attention rows of one forward pass (see :func:`z_means`)."""
    return z_means(model, idx, visibility)["attention"]


def separator_doc_ids(idx: torch.Tensor,
                      separator: int = corpus_mod.SEPARATOR) -> torch.Tensor:
    """Return (B, T) int64 document ids of corpus windows, split at ``separator`` bytes.

    The corpus joins files with one ``SEPARATOR`` byte after each file, so
    the separator is the last token of its document and the next token starts
    a new one: ``doc_ids[b, t]`` = number of separators in ``idx[b, :t]``.

    Example:
        >>> separator_doc_ids(torch.tensor([[5, 0, 7, 8, 0, 9]])).tolist()
        [[0, 0, 1, 1, 1, 2]]
    """
    is_sep = (idx == separator).to(torch.int64)  # (B, T)
    return torch.cumsum(is_sep, dim=1) - is_sep  # exclusive prefix count


def document_visibility(doc_ids: torch.Tensor) -> Visibility:
    """Return the (start, limit) mask of packed documents, causal inside each.

    Args:
        doc_ids: (B, T) integer document id per token; each document one
            contiguous run in its row (negative ids: padding, seen by nobody).

    Returns:
        ``(start, limit)``, int64 (B, T) each, on ``doc_ids``' device
        (:func:`squinchcomm.nn.visibility.documents` per row).
    """
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 2:
        raise ValueError("doc_ids must be a (B, T) integer tensor (one id per token); "
                         "e.g. separator_doc_ids(idx).")
    rows = [visibility_mod.documents(row) for row in doc_ids.cpu()]
    start = torch.stack([r[0] for r in rows]).to(doc_ids.device)  # (B, T)
    limit = torch.stack([r[1] for r in rows]).to(doc_ids.device)
    return start, limit


# ----------------------------------------------------------------------------
# Batches and evaluation.
# ----------------------------------------------------------------------------
def batch_tensors(windows: np.ndarray, device: str | torch.device = "cpu"):
    """Split (B, T + 1) uint8 windows into int64 inputs and targets, each (B, T)."""
    w = torch.from_numpy(windows.astype(np.int64)).to(device)
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def estimate_loss(model: TinyGPT, data: np.ndarray, batch: int, seq: int, seed: int,
                  iters: int = 4, device: str | torch.device = "cpu",
                  packed_docs: bool = False) -> float:
    """Return the mean loss over ``iters`` deterministic batches of ``data``.

    With ``packed_docs`` each window is masked into its documents
    (:func:`separator_doc_ids`), as in training with packed documents.
    """
    was_training = model.training
    model.eval()
    losses = []
    for i in range(iters):
        x, y = batch_tensors(corpus_mod.sample_windows(data, batch, seq, seed, step=i), device)
        vis = document_visibility(separator_doc_ids(x)) if packed_docs else None
        losses.append(model(x, y, visibility=vis)[1].item())
    model.train(was_training)
    return float(np.mean(losses))
