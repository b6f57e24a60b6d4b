"""Attention Z-Reg: a virtual ``c * sum(Z^2)`` loss on logit rows, applied in backward.

For one row of logits ``s`` (one attention query over its visible keys, or one
LM-head / router position), ``Z = logsumexp(s)``. Large ``|Z|`` means the logits
drift as a whole, which softmax ignores but which makes gradients (and their
low-bit quantization) badly scaled. Z-Reg pulls ``Z`` towards 0 with the
virtual loss ``c * sum_rows Z^2``. It is never added to the loss: its gradient

    d(c * Z^2) / ds_j = 2c * Z * softmax(s)_j

is added to the logits' gradient during backward, so the forward output is
bit-identical with and without Z-Reg and the reported loss is unchanged.
Rows with no visible key (all masked, ``Z = -inf``) are skipped.

Reduction: ``"sum"`` (the default) is the definition above, so a useful ``c``
depends on how many rows one call has (batch * heads * queries for
attention). ``"mean"`` is the virtual loss ``c * mean_rows Z^2`` over the
call's valid rows, like PaLM's z-loss (``1e-4 * mean(log^2 Z)`` on the
output logits), so ``c`` carries over between batch sizes, sequence lengths
and head counts.

Two entry points:

- :func:`zreg_logits` for output/router logits: an identity in forward that
  injects the gradient in backward (last dimension = one row);
- :func:`zreg_attention` for attention: a materialized-logits reference
  attention (same arguments as ``torch.nn.functional.scaled_dot_product_attention``,
  with a boolean mask) whose attention logits go through :func:`zreg_logits`.

Both can record the mean ``|Z|`` of valid rows in a :class:`ZRegStats`.

Example:
    >>> import torch
    >>> from squinchcomm.nn.zreg import ZRegStats, zreg_attention
    >>> q, k, v = (torch.randn(2, 4, 8, 16, requires_grad=True) for _ in range(3))
    >>> stats = ZRegStats()
    >>> y = zreg_attention(q, k, v, coef=1e-3, causal=True, stats=stats)
    >>> y.sum().backward()  # q.grad, k.grad include the Z-Reg term
    >>> stats.rows
    64
"""

from __future__ import annotations

import math

import torch

__all__ = ["ZRegStats", "zreg_logits", "zreg_attention", "REDUCTIONS"]

REDUCTIONS = ("sum", "mean")  # virtual loss c * sum_rows Z^2, or c * mean_rows Z^2


class ZRegStats:
    """Accumulates mean ``|Z|`` over valid (not fully masked) logit rows.

    Sums stay on the logits' device, so recording costs no host sync;
    :attr:`mean` syncs once when read.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far (e.g. at the start of a step)."""
        self._abs_sum = None  # 0-d tensor: sum of |Z| over valid rows
        self._rows = None  # 0-d tensor: number of valid rows

    def add(self, z: torch.Tensor) -> None:
        """Record row values ``z`` (any shape); rows equal to -inf (empty) are skipped."""
        z = z.detach()
        valid = z != -math.inf
        abs_sum = z.abs().masked_fill(~valid, 0).sum(dtype=torch.float64)
        rows = valid.sum()
        if self._abs_sum is None:
            self._abs_sum, self._rows = abs_sum, rows
        else:
            self._abs_sum = self._abs_sum + abs_sum.to(self._abs_sum.device)
            self._rows = self._rows + rows.to(self._rows.device)

    @property
    def rows(self) -> int:
        """Number of valid rows recorded."""
        return 0 if self._rows is None else int(self._rows)

    @property
    def mean(self) -> float:
        """Mean ``|Z|`` over the valid rows recorded; NaN when there were none."""
        if self.rows == 0:
            return math.nan
        return float(self._abs_sum) / self.rows


def _check_coef(coef) -> float:
    try:
        coef = float(coef)
    except (TypeError, ValueError):
        raise ValueError(f"coef must be a real number >= 0, got {coef!r}.") from None
    if not (math.isfinite(coef) and coef >= 0):
        raise ValueError(f"coef must be a finite number >= 0, got {coef}; use 0 to disable Z-Reg.")
    return coef


def _check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} (c * sum or c * mean of Z^2 "
                         f"over the rows), got {reduction!r}.")
    return reduction


def _check_mask(mask: torch.Tensor | None, shape: torch.Size, what: str) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean tensor (True = visible), got dtype {mask.dtype}; "
                         f"convert an additive mask with `mask == 0`.")
    try:
        full = torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError:
        full = None
    if full != shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the {what} "
                         f"shape {tuple(shape)}.")


def _row_z(logits: torch.Tensor) -> torch.Tensor:
    """Z = logsumexp over the last dim, in at least float32; -inf for rows with no finite logit."""
    s = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(s, dim=-1)  # (...,)


class _ZRegLogits(torch.autograd.Function):
    """Identity in forward; backward adds 2c * Z * softmax(s) (divided by the number
    of valid rows for ``reduction="mean"``) to the gradient of s."""

    @staticmethod
    def forward(ctx, logits, coef, z, mask, reduction):
        # z: (...,) = logsumexp of the visible logits of each row, -inf for an empty row
        ctx.coef, ctx.reduction = coef, reduction
        ctx.save_for_backward(logits, z, mask)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_out):
        logits, z, mask = ctx.saved_tensors
        # Step 1: the weight 2c of d(c Z^2)/dZ; "mean" divides c by the valid rows
        # (kept as a tensor: no host sync; at least 1, so an all-empty call gives 0).
        weight = 2 * ctx.coef
        empty = z == -math.inf  # (...,)
        if ctx.reduction == "mean":
            weight = weight / (~empty).sum().clamp_min(1).to(z.dtype)
        # Step 2: skip empty rows: Z := 0 there, and all their logits are -inf,
        # so the injection 2c * 0 * exp(-inf) is 0 (no NaN).
        z = z.masked_fill(empty, 0).unsqueeze(-1)  # (..., 1)
        # Step 3: softmax(s) = exp(s - Z) over the visible entries (masked -> -inf -> 0).
        s = logits.to(z.dtype)  # (..., n)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        inject = weight * z * torch.exp(s - z)  # (..., n)
        return grad_out + inject.to(grad_out.dtype), None, None, None, None


def zreg_logits(logits: torch.Tensor, coef: float, mask: torch.Tensor | None = None,
                stats: ZRegStats | None = None, reduction: str = "sum") -> torch.Tensor:
    """Apply Z-Reg to logit rows: forward returns ``logits`` unchanged, backward adds
    ``2 * coef * Z * softmax(s)`` to their gradient, ``Z = logsumexp(s)`` per row.

    This is the gradient of the virtual loss ``coef * sum_rows Z^2`` (or
    ``coef * mean_rows Z^2``), which is never added to the loss. Masked entries
    take no part in ``Z`` or the softmax (and get no injected gradient); rows
    with no visible entry (or all logits ``-inf``) are skipped.

    Args:
        logits: (..., n) tensor; each slice along the last dim is one row
            (one LM-head position, one router decision, one attention query).
        coef: the coefficient ``c >= 0``; 0 leaves the gradient exactly as is.
        mask: optional boolean tensor broadcastable to ``logits``, True = visible.
        stats: optional :class:`ZRegStats` that records ``|Z|`` of the valid rows.
        reduction: ``"sum"`` (default): virtual loss ``coef * sum_rows Z^2``;
            ``"mean"``: ``coef * mean_rows Z^2`` over the valid rows of this call.

    Returns:
        A tensor equal to ``logits`` (a view of it) carrying the injection in its backward.

    Raises:
        ValueError: for a negative or non-finite ``coef``, a mask that is not
            boolean or does not broadcast to ``logits``, or an unknown ``reduction``.

    Example:
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> target = torch.tensor([1, 2, 3, 4])
        >>> loss = torch.nn.functional.cross_entropy(zreg_logits(logits, 1e-4), target)
        >>> loss.backward()  # loss value unchanged; logits.grad includes 2e-4 * Z * softmax
    """
    coef = _check_coef(coef)
    reduction = _check_reduction(reduction)
    _check_mask(mask, logits.shape, "logits")
    if coef == 0 and stats is None:
        return logits
    with torch.no_grad():
        visible = logits if mask is None else logits.masked_fill(~mask, -math.inf)
        z = _row_z(visible)  # (...,)
    if stats is not None:
        stats.add(z)
    if coef == 0:
        return logits
    return _ZRegLogits.apply(logits, coef, z, mask, reduction)


def zreg_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coef: float,
                   mask: torch.Tensor | None = None, causal: bool = False,
                   scale: float | None = None, stats: ZRegStats | None = None,
                   reduction: str = "sum") -> torch.Tensor:
    """Attention ``softmax(q k^T * scale) v`` whose backward injects Z-Reg into the logits.

    The materialized-logits reference path: the (..., Tq, Tk) logits go through
    :func:`zreg_logits` after masking, so each query row ``s`` gets
    ``2 * coef * Z * softmax(s)`` added to its gradient, ``Z = logsumexp`` over
    the row's visible keys. The forward is the same with any ``coef``.
    A query with no visible key outputs zeros, and its gradient is zero (no NaN).

    Args:
        q: (..., Tq, d) queries.
        k: (..., Tk, d) keys.
        v: (..., Tk, dv) values; leading dims of q, k, v broadcast together.
        coef: the coefficient ``c >= 0``; 0 disables the injection.
        mask: optional boolean tensor broadcastable to (..., Tq, Tk), True = visible.
        causal: also hide key j from query i when j > i (top-left aligned, as
            ``scaled_dot_product_attention(is_causal=True)``); combines with ``mask``.
        scale: logit scale; default ``1 / sqrt(d)``.
        stats: optional :class:`ZRegStats` that records ``|Z|`` of the valid query rows.
        reduction: ``"sum"`` (default) or ``"mean"`` over the valid query rows
            of this call (all batch entries and heads), as in :func:`zreg_logits`.

    Returns:
        (..., Tq, dv) tensor.

    Raises:
        ValueError: for a bad ``coef`` or ``reduction``, mismatched shapes or a bad mask.
    """
    coef = _check_coef(coef)
    reduction = _check_reduction(reduction)
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise ValueError(f"q, k, v must have shape (..., T, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}.")
    if k.size(-1) != q.size(-1) or k.size(-2) != v.size(-2):
        raise ValueError(f"expected q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(f"leading dims of q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not broadcast together.") from None
    tq, tk = q.size(-2), k.size(-2)
    _check_mask(mask, torch.Size((*batch, tq, tk)), "attention logits")
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    # Step 1: the visibility of each (query, key) pair.
    if causal:
        tril = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()  # (Tq, Tk)
        mask = tril if mask is None else mask & tril
    # Step 2: masked logits, with Z-Reg attached (hidden keys are -inf: no part in Z).
    s = (q @ k.transpose(-2, -1)) * scale  # (..., Tq, Tk)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    s = zreg_logits(s, coef, stats=stats, reduction=reduction)
    # Step 3: softmax; an empty row would be 0/0, so it gets zeros instead.
    if mask is None:
        p = s.softmax(dim=-1)
    else:
        empty = ~mask.any(dim=-1, keepdim=True)  # (..., Tq, 1)
        p = s.masked_fill(empty, 0).softmax(dim=-1).masked_fill(empty, 0)
    return p @ v  # (..., Tq, dv)
