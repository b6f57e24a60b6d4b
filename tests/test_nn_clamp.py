"""Dynamic Clamping: STE gradient, grid, error bound, and constant vs dynamic limits."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from squinchcomm.nn.clamp import DynamicClamp, dynamic_limit, fake_quant, sqnr_db


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------ STE gradient
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gradient_is_upstream_inside_and_zero_outside(bits):
    g = _gen(bits)
    limit = 1.5
    x = torch.randn(4000, generator=g, dtype=torch.float64) * 2.0
    x[:4] = torch.tensor([limit, -limit, limit + 1e-9, -limit - 1e-9], dtype=torch.float64)
    x.requires_grad_(True)
    upstream = torch.randn(4000, generator=g, dtype=torch.float64)
    fake_quant(x, limit, bits).backward(upstream)
    inside = x.detach().abs() <= limit
    assert 0.2 < inside.double().mean() < 0.8  # both branches exercised
    expected = torch.where(inside, upstream, torch.zeros_like(upstream))
    assert torch.equal(x.grad, expected)
    assert x.grad[:4].tolist() == [upstream[0].item(), upstream[1].item(), 0.0, 0.0]


@pytest.mark.parametrize("mode", ["std", "rms", "weight"])
def test_dynamic_limit_gets_no_gradient(mode):
    # The limit depends on x (or the weight), but is a stop-gradient: x's gradient
    # must be the masked upstream gradient exactly, and the weight gets none.
    g = _gen(1)
    w = torch.randn(16, 8, generator=g, requires_grad=True)
    x = (torch.randn(64, 16, generator=g) * 3).requires_grad_(True)
    clamp = DynamicClamp(bits=4, mode=mode, multiplier=1.0)
    upstream = torch.randn(64, 16, generator=g)
    clamp(x, weight=w).backward(upstream)
    inside = x.detach().abs() <= clamp.last_limit
    assert 0.05 < inside.float().mean() < 0.95
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    assert w.grad is None


# ------------------------------------------------------- grid and error bound
@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 12), limit=st.floats(1e-3, 1e3),
       spread=st.floats(0.1, 4.0), seed=st.integers(0, 2 ** 16))
def test_values_on_grid_within_limit_and_error_at_most_half_step(bits, limit, spread, seed):
    x = torch.randn(512, generator=_gen(seed), dtype=torch.float64) * limit * spread
    q = fake_quant(x, limit, bits)
    n = 2 ** (bits - 1) - 1
    step = limit / n
    k = q / step
    assert torch.allclose(k, k.round(), atol=1e-9)  # on the grid k * step
    assert k.round().abs().max() <= n  # within [-limit, limit]
    inside = x.abs() <= limit
    err = (q - x).abs()
    assert (err[inside] <= step / 2 * (1 + 1e-12)).all()
    outside = ~inside  # clamped to the nearest end
    assert torch.allclose(q[outside], torch.sign(x[outside]) * limit, rtol=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_level_count(bits):
    x = torch.linspace(-2.0, 2.0, 100_001, dtype=torch.float64)
    assert torch.unique(fake_quant(x, 1.0, bits)).numel() == 2 ** bits - 1


def test_float32_and_bfloat16_keep_dtype():
    x = torch.randn(1000, generator=_gen(3)).bfloat16()
    q32 = fake_quant(x.float(), 2.0, 8)
    qbf = fake_quant(x, 2.0, 8)
    assert q32.dtype == torch.float32 and qbf.dtype == torch.bfloat16
    # bf16 input is quantized in float32, then rounded to bf16 (8 significant bits).
    assert torch.equal(qbf, q32.bfloat16())


def test_all_zero_input_gives_zeros_and_passes_gradient():
    x = torch.zeros(10, requires_grad=True)
    for mode in ("std", "rms"):
        y = DynamicClamp(mode=mode)(x)
        assert torch.equal(y, torch.zeros(10))
    y.backward(torch.arange(10.0))
    assert torch.equal(x.grad, torch.arange(10.0))


# ----------------------------------------------------------- the limit modes
def test_dynamic_limit_formulas():
    g = _gen(4)
    x = torch.randn(37, 5, generator=g, dtype=torch.float64) + 0.5
    xn = x.numpy()
    assert dynamic_limit(x, "std", 3.0).item() == pytest.approx(3.0 * xn.std(), rel=1e-6)
    assert dynamic_limit(x, "rms", 3.0).item() == pytest.approx(
        3.0 * math.sqrt((xn ** 2).mean()), rel=1e-6)
    w = torch.randn(6, 4, 3, 3, generator=g)  # conv weight: fan_in = 4 * 3 * 3
    wn = w.numpy().astype(np.float64)
    pred = math.sqrt((wn ** 2).mean()) * math.sqrt(36)
    assert dynamic_limit(x, "weight", 2.0, weight=w).item() == pytest.approx(2.0 * pred, rel=1e-5)
    assert dynamic_limit(x, "weight", 2.0, weight=w, power=2).item() == pytest.approx(
        2.0 * pred ** 2, rel=1e-5)


def test_sqnr_db():
    x = torch.ones(4)
    assert sqnr_db(x, 0.9 * x) == pytest.approx(20.0, rel=1e-6)  # noise = signal / 100
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(torch.zeros(4), x) == -math.inf


# ----------------------------------------- the scenario: shrinking W
def _relu2_ffn(scale, tokens=512, d_in=128, d_ff=512, seed=5):
    """ReLU^2 FFN activations for unit-normal inputs and weights scaled by `scale`."""
    g = _gen(seed)
    h = torch.randn(tokens, d_in, generator=g)
    w = torch.randn(d_ff, d_in, generator=g) / math.sqrt(d_in) * scale
    return torch.relu(h @ w.T) ** 2, w


def _sqnr_lower_bound(y, limit, bits):
    """Noise bound: clipped values lose |y| - limit; nonzero values inside err <= step/2."""
    step = limit / (2 ** (bits - 1) - 1)
    y = y.double()
    clipped = y.abs() > limit
    noise = ((y.abs() - limit)[clipped] ** 2).sum() + ((~clipped) & (y != 0)).sum() * step ** 2 / 4
    return 10 * math.log10((y ** 2).sum() / noise)


def test_constant_limit_collapses_while_dynamic_keeps_sqnr():
    bits, mult = 8, 12.0
    y1, _ = _relu2_ffn(1.0)
    const_limit = mult * y1.pow(2).mean().sqrt().item()  # tuned at scale 1
    sqnr = {}
    for scale in (1.0, 0.1, 0.01):
        y, w = _relu2_ffn(scale)
        nonzero = y != 0
        q_const = fake_quant(y, const_limit, bits)
        zeroed = ((q_const == 0) & nonzero).sum().item() / nonzero.sum().item()
        if scale == 0.01:
            assert zeroed > 0.9
            assert sqnr_db(y, q_const) < 1.0  # nearly everything lost
        for mode, power in (("std", 1), ("rms", 1), ("weight", 2)):
            clamp = DynamicClamp(bits, mode, mult, power=power)
            q = clamp(y, weight=w)
            s = sqnr_db(y, q)
            assert s >= _sqnr_lower_bound(y, clamp.last_limit.item(), bits) - 1e-9
            assert s > 20.0
            sqnr.setdefault(mode, []).append(s)
    for mode, values in sqnr.items():  # scale invariance: same SQNR at every scale
        assert max(values) - min(values) < 0.5, (mode, values)


def test_weight_mode_tracks_the_activation_scale():
    # z = h @ W.T has variance rms(W)^2 * fan_in for unit-normal h, and
    # y = relu(z)^2 has E[y^2] = E[z^4] / 2 = 1.5 * var(z)^2, so the predicted
    # scale var(z) = rms(y) / sqrt(1.5).
    mult = 12.0
    y1, w1 = _relu2_ffn(1.0)
    lim1 = dynamic_limit(y1, "weight", mult, weight=w1, power=2).item()
    for scale in (1.0, 0.1, 0.01):
        y, w = _relu2_ffn(scale)
        lim = dynamic_limit(y, "weight", mult, weight=w, power=2).item()
        assert lim == pytest.approx(lim1 * scale ** 2, rel=1e-4)
        ratio = lim / (mult * y.pow(2).mean().sqrt().item())
        assert abs(ratio - 1 / math.sqrt(1.5)) < 0.1


# ------------------------------------------------------------------ bad args
@pytest.mark.parametrize("call, match", [
    (lambda: fake_quant(torch.ones(2), 1.0, bits=1), "bits"),
    (lambda: fake_quant(torch.ones(2), 1.0, bits=8.0), "bits"),
    (lambda: fake_quant(torch.ones(2), 0.0), "limit"),
    (lambda: fake_quant(torch.ones(2), -1.0), "limit"),
    (lambda: dynamic_limit(torch.ones(2), "max"), "mode"),
    (lambda: dynamic_limit(torch.ones(2), "constant"), "constant"),
    (lambda: dynamic_limit(torch.ones(2), "weight"), "weight"),
    (lambda: dynamic_limit(torch.ones(2), "rms", 0.0), "multiplier"),
    (lambda: dynamic_limit(torch.ones(2), "rms", -2.0), "multiplier"),
    (lambda: dynamic_limit(torch.ones(2), "rms", float("nan")), "multiplier"),
    (lambda: dynamic_limit(torch.ones(2), "weight", weight=torch.ones(4, 4), power=0), "power"),
    (lambda: DynamicClamp(bits=1), "bits"),
    (lambda: DynamicClamp(mode="absmax"), "mode"),
    (lambda: DynamicClamp(mode="constant"), "limit"),
    (lambda: DynamicClamp(mode="rms", limit=1.0), "limit"),
    (lambda: DynamicClamp(multiplier=-1.0), "multiplier"),
    (lambda: DynamicClamp(mode="weight")(torch.ones(2)), "weight"),
    (lambda: sqnr_db(torch.ones(2), torch.ones(3)), "shape"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
