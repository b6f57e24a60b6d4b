"""Z-Reg: the injected gradient equals autograd of the explicit c * sum(Z^2) term
(and of c * mean(Z^2) over the valid rows for reduction="mean")."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from squinchcomm.models.tinygpt import reference_attention
from squinchcomm.nn.zreg import REDUCTIONS, ZRegStats, zreg_attention, zreg_logits


def explicit_z(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Z per row by torch.logsumexp over visible entries; empty rows dropped (returns valid Z)."""
    if mask is None:
        return torch.logsumexp(s, dim=-1).flatten()
    mask = mask.expand_as(s)
    valid = mask.any(dim=-1)
    rows = s[valid]  # (rows, n)
    return torch.logsumexp(rows.masked_fill(~mask[valid], -math.inf), dim=-1)


def explicit_term(z: torch.Tensor, coef: float, reduction: str) -> torch.Tensor:
    """The virtual loss c * sum(Z^2) or c * mean(Z^2) over the valid rows ``z`` (0 if none)."""
    if reduction == "sum":
        return coef * (z ** 2).sum()
    return coef * (z ** 2).mean() if z.numel() else z.sum()


def dense_attention(q, k, v, mask):
    """Attention from the definition (empty row -> zeros); also returns the logits."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    mask = mask.expand_as(s)
    w = torch.where(mask, torch.exp(s - s.amax(dim=-1, keepdim=True)), torch.zeros_like(s))
    den = w.sum(dim=-1, keepdim=True)
    p = w / torch.where(den > 0, den, torch.ones_like(den))
    return p @ v, s


def random_mask(gen, shape, empty_rows=True):
    mask = torch.rand(shape, generator=gen) < 0.6
    if empty_rows:
        mask[..., 1, :] = False  # a query with no visible key
    return mask


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    fn(*xs).backward()
    return [x.grad for x in xs]


# ---- zreg_logits -------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), n=st.integers(1, 9),
       coef=st.floats(0.0, 2.0), use_mask=st.booleans(), reduction=st.sampled_from(REDUCTIONS))
def test_logits_gradient_matches_explicit_term(seed, rows, n, coef, use_mask, reduction):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, rows, n, generator=gen, dtype=torch.float64) * 3 + 2
    weight = torch.randn(2, rows, n, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, (2, rows, n), empty_rows=rows > 1) if use_mask else None
    keep = mask if mask is not None else torch.ones_like(logits, dtype=torch.bool)

    def loss(s):  # an arbitrary downstream loss that ignores masked entries
        return (torch.where(keep, s, torch.zeros_like(s)).tanh() * weight).sum()

    (got,) = grads(lambda s: loss(zreg_logits(s, coef, mask, reduction=reduction)), logits)
    (want,) = grads(lambda s: loss(s) + explicit_term(explicit_z(s, mask), coef, reduction),
                    logits)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_logits_cross_entropy_and_forward_unchanged():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=gen, dtype=torch.float64) + 4
    target = torch.randint(0, 11, (5, 7), generator=gen)
    ce = lambda s: F.cross_entropy(s.flatten(0, 1), target.flatten())  # noqa: E731
    out = zreg_logits(logits.clone().requires_grad_(True), 0.3)
    assert torch.equal(out, logits)
    (got,) = grads(lambda s: ce(zreg_logits(s, 0.3)), logits)
    (want,) = grads(lambda s: ce(s) + 0.3 * (torch.logsumexp(s, -1) ** 2).sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the injection changes the gradient: the test above can fail
    (plain,) = grads(ce, logits)
    assert (got - plain).abs().max() > 1e-3


def test_logits_empty_rows_skipped_and_coef_zero_exact():
    logits = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [False] * 4, [True] * 4])
    loss = lambda s: (s.sin() * torch.arange(4.0, dtype=s.dtype)).sum()  # noqa: E731
    (got,) = grads(lambda s: loss(zreg_logits(s, 0.5, mask)), logits)
    (plain,) = grads(loss, logits)
    assert torch.equal(got[1], plain[1])  # the empty row gets nothing
    assert torch.equal(got[0, 1], plain[0, 1])  # nor does a masked entry
    assert not torch.equal(got[0], plain[0])
    (zero,) = grads(lambda s: loss(zreg_logits(s, 0.0, mask)), logits)
    assert torch.equal(zero, plain)


def test_logits_low_precision_dtype():
    logits = (torch.randn(8, 16) * 4 + 8).to(torch.bfloat16)
    (got,) = grads(lambda s: zreg_logits(s, 0.1).float().sum(), logits)
    s = logits.double()
    (want,) = grads(lambda s: s.sum() + 0.1 * (torch.logsumexp(s, -1) ** 2).sum(), s)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_mean_reduction_divides_by_the_valid_rows_only():
    """With fully masked rows: mean over the 2 valid rows of 4, not over all 4."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 6, generator=gen, dtype=torch.float64) * 2 + 3
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    mask[3] = False
    z = torch.logsumexp(logits[[0, 2]], -1)  # (2,) the valid rows' Z
    softmax = logits[[0, 2]].softmax(-1)
    (got,) = grads(lambda s: zreg_logits(s, 0.7, mask, reduction="mean").sum(), logits)
    want = torch.ones_like(logits)  # d(sum)/ds, plus 2c/2 * Z * softmax on valid rows
    want[[0, 2]] += 0.7 * z[:, None] * softmax
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (total,) = grads(lambda s: zreg_logits(s, 0.7, mask, reduction="sum").sum(), logits)
    torch.testing.assert_close(total - 1, 2 * (got - 1), rtol=1e-12, atol=1e-12)
    empty = torch.zeros(2, 3, dtype=torch.bool)  # an all-empty call: nothing, no NaN
    (none,) = grads(lambda s: zreg_logits(s, 0.7, empty, reduction="mean").sum(), logits[:2, :3])
    assert torch.equal(none, torch.ones(2, 3, dtype=torch.float64))


# ---- zreg_attention ----------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tq=st.integers(2, 6), tk=st.integers(1, 6),
       coef=st.floats(0.0, 1.0), use_mask=st.booleans(), causal=st.booleans(),
       reduction=st.sampled_from(REDUCTIONS))
def test_attention_gradient_matches_explicit_term(seed, tq, tk, coef, use_mask, causal,
                                                  reduction):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, t, 4, generator=gen, dtype=torch.float64) * 2 for t in (tq, tk))
    v = torch.randn(2, 3, tk, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(2, 3, tq, 5, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, (3, tq, tk)) if use_mask else None  # broadcasts over batch
    full = torch.ones(tq, tk, dtype=torch.bool) if mask is None else mask
    if causal:
        full = full & torch.ones(tq, tk, dtype=torch.bool).tril()

    def explicit(q, k, v):
        y, s = dense_attention(q, k, v, full)
        return (y * weight).sum() + explicit_term(explicit_z(s, full), coef, reduction)

    got = grads(lambda q, k, v: (zreg_attention(q, k, v, coef, mask, causal,
                                                reduction=reduction) * weight).sum(), q, k, v)
    want = grads(explicit, q, k, v)
    for g, w in zip(got, want):
        assert not g.isnan().any()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_attention_forward_bit_identical_and_matches_sdpa():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen) for _ in range(3))
    mask = random_mask(gen, (9, 9))
    for kwargs in ({"causal": True}, {"mask": mask}):
        plain = zreg_attention(q, k, v, 0.0, **kwargs)
        for c in (1e-4, 1.0):
            assert torch.equal(zreg_attention(q, k, v, c, **kwargs), plain)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(zreg_attention(q, k, v, 0.5, causal=True), sdpa)
    torch.testing.assert_close(zreg_attention(q, k, v, 0.5, causal=True),
                               reference_attention(q, k, v))


def test_attention_empty_rows_zero_and_coef_zero_exact():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = random_mask(gen, (5, 5))
    y = zreg_attention(q, k, v, 1.0, mask=mask)
    assert torch.equal(y[..., 1, :], torch.zeros_like(y[..., 1, :]))
    def loss(c):
        return lambda q, k, v: zreg_attention(q, k, v, c, mask=mask).pow(2).sum()

    with_zreg = grads(loss(1.0), q, k, v)
    assert all(not g.isnan().any() for g in with_zreg)
    assert torch.equal(with_zreg[0][..., 1, :], torch.zeros(1, 2, 3, dtype=torch.float64))

    def plain(q, k, v):  # the same attention written without any Z-Reg call
        s = (q @ k.transpose(-2, -1) * (1 / math.sqrt(3))).masked_fill(~mask, -math.inf)
        empty = ~mask.any(-1, keepdim=True)
        p = s.masked_fill(empty, 0).softmax(-1).masked_fill(empty, 0)
        return (p @ v).pow(2).sum()

    for g, w in zip(grads(loss(0.0), q, k, v), grads(plain, q, k, v)):
        assert torch.equal(g, w)


def test_stats_mean_abs_z():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 4, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = random_mask(gen, (4, 4))
    stats = ZRegStats()
    assert math.isnan(stats.mean)
    zreg_attention(q, k, v, 0.0, mask=mask, stats=stats)
    zreg_logits(torch.full((3, 5), 2.0), 0.1, stats=stats)
    _, s = dense_attention(q, k, v, mask)
    z = torch.cat([explicit_z(s, mask), torch.full((3,), 2.0 + math.log(5), dtype=torch.float64)])
    assert stats.rows == z.numel() == 2 * 2 * 3 + 3
    assert stats.mean == pytest.approx(z.abs().mean().item(), rel=1e-6)
    stats.reset()
    assert stats.rows == 0


# ---- bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("coef", [-1e-3, math.nan, math.inf, "big"])
def test_bad_coef(coef):
    with pytest.raises(ValueError, match="coef"):
        zreg_logits(torch.randn(2, 3), coef)
    with pytest.raises(ValueError, match="coef"):
        zreg_attention(*(torch.randn(2, 3, 4) for _ in range(3)), coef)


@pytest.mark.parametrize("reduction", ["avg", None, "SUM"])
def test_bad_reduction_names_the_choices(reduction):
    with pytest.raises(ValueError, match=r"reduction must be one of \('sum', 'mean'\)"):
        zreg_logits(torch.randn(2, 3), 0.1, reduction=reduction)
    with pytest.raises(ValueError, match="reduction must be one of"):
        zreg_attention(*(torch.randn(2, 3, 4) for _ in range(3)), 0.1, reduction=reduction)


def test_bad_shapes_and_masks():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        zreg_logits(x, 0.1, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        zreg_logits(x, 0.1, mask=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="expected q"):
        zreg_attention(x, torch.randn(2, 3, 5), x, 0.1)  # d mismatch
    with pytest.raises(ValueError, match="expected q"):
        zreg_attention(x, x, torch.randn(2, 5, 4), 0.1)  # Tk mismatch
    with pytest.raises(ValueError, match="do not broadcast"):
        zreg_attention(torch.randn(3, 3, 4), x, x, 0.1)
    with pytest.raises(ValueError, match="does not broadcast"):
        zreg_attention(x, x, x, 0.1, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(\.\.\., T, d\)"):
        zreg_attention(torch.randn(4), x, x, 0.1)
