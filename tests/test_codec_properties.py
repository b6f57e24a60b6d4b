"""Properties of the format, checked against bounds derived from its
definition (FORMAT.md), not from the code under test."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from squinchcomm import codec

F32_MAX = float(np.finfo(np.float32).max)


def f32(v):
    """The float32 nearest to v, as the float hypothesis' width=32 bounds need."""
    return float(np.float32(v))
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def scale_of(q):
    """A(q) = exp((q - 128) / 6), from the definition, in float64."""
    return math.exp((q - 128) / 6)


def expected_q(m):
    """q_max = clip(floor(6 ln m + 129), 0, 254); 0 for m == 0 (float64)."""
    if m == 0:
        return 0
    return int(min(max(math.floor(6 * math.log(m) + 129), 0), 254))


# Blocks of structured content: zero, -0.0, subnormal, huge, normal, NaN/Inf mixes.
_block = st.one_of(
    hnp.arrays(np.float32, 8, elements=st.floats(f32(-1e3), f32(1e3), width=32)),
    hnp.arrays(np.float32, 8, elements=st.floats(width=32)),  # anything, NaN/Inf included
    hnp.arrays(np.float32, 8, elements=st.sampled_from([0.0, -0.0])),
    hnp.arrays(np.float32, 8, elements=st.floats(f32(-1e-38), f32(1e-38), width=32, allow_subnormal=True)),
    hnp.arrays(np.float32, 8, elements=st.floats(-F32_MAX, F32_MAX, width=32)),
    hnp.arrays(np.float32, 8, elements=st.floats(f32(-1e-8), f32(1e-8), width=32)),
)


@st.composite
def tensors(draw, max_blocks=1250):
    """Float32 tensors of 0..10k elements, mostly not a multiple of 8."""
    blocks = draw(st.lists(_block, min_size=0, max_size=max_blocks))
    x = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    cut = draw(st.integers(0, min(7, x.size)))
    return x[: x.size - cut]


def _blocks(x):
    pad = np.zeros(-x.size % 8, np.float32)
    return np.concatenate([x, pad]).reshape(-1, 8)


@SETTINGS
@given(tensors(), st.sampled_from(["nearest", "stochastic"]), st.integers(0, 2 ** 64 - 1))
def test_layout_and_error_bound(x, rounding, seed):
    """Payload size, q_max, NaN blocks, signs and the per-element error bound.

    Nearest: |x - x^| <= half the gap between the two levels around |x|.
    Stochastic: |x - x^| <= the whole gap. Saturated values decode to A(254).
    """
    n = x.size
    p = codec.encode(x, rounding=rounding, seed=seed)
    assert p.size == 6 * math.ceil(n / 8)
    y = codec.decode(p, n)
    blocks, dec = _blocks(x), _blocks(y)
    for b, (xb, yb) in enumerate(zip(blocks, dec)):
        q = int(p[6 * b])
        if not np.isfinite(xb).all():
            assert q == 255 and p[6 * b + 1: 6 * b + 6].tolist() == [0] * 5
            assert np.isnan(yb[: max(0, min(8, n - 8 * b))]).all()
            continue
        m = float(np.abs(xb).max())
        assert q == expected_q(m) or (  # tables are float32: allow the boundary itself
            abs(6 * math.log(m) + 129 - round(6 * math.log(m) + 129)) < 1e-5)
        assert p[6 * b + 1] == sum(1 << j for j in range(8) if xb[j] < 0)
        a = scale_of(q)
        for xv, yv in zip(xb.astype(np.float64), yb.astype(np.float64)):
            r = abs(xv) / a
            if r >= 1:  # saturation (q = 254 only): decodes to the largest level
                assert q == 254 and abs(yv) == pytest.approx(a, rel=1e-6)
                continue
            k = math.floor(15 * math.sqrt(r))
            gap = a * ((k + 1) ** 2 - k ** 2) / 225
            bound = (0.5 if rounding == "nearest" else 1.0) * gap
            assert abs(xv - yv) <= bound * (1 + 1e-5) + 1e-45
            assert yv == 0 or np.sign(yv) == np.sign(xv)


@SETTINGS
@given(tensors())
def test_encode_decode_is_a_fixed_point_when_the_block_max_is_not_code_15(x):
    """encode(decode(p)) == p for nearest rounding, on every block whose
    largest code is below 15 (and on saturated q=254 blocks).

    A block whose largest code is 15 decodes to a maximum of exactly
    A(q) = T[q+1], which the format re-encodes with q+1: decode is not a
    fixed point there (FORMAT.md, "Re-encoding"). Zero codes of negative
    values keep their sign bit but decode to -0.0, which is not < 0.
    """
    n = x.size
    p = codec.encode(x).reshape(-1, 6)
    p2 = codec.encode(codec.decode(p.reshape(-1), n)).reshape(-1, 6)
    codes = np.stack([p[:, 2:] & 15, p[:, 2:] >> 4], axis=2).reshape(-1, 8)
    stable = (codes.max(axis=1) < 15) | (p[:, 0] == 254) | (p[:, 0] == 255)
    assert np.array_equal(p[stable, 0], p2[stable, 0])
    assert np.array_equal(p[stable, 2:], p2[stable, 2:])
    nonzero_sign = np.zeros_like(p[:, 1])
    for j in range(8):
        nonzero_sign |= ((codes[:, j] > 0).astype(np.uint8) << j)
    assert np.array_equal(p[stable, 1] & nonzero_sign[stable], p2[stable, 1])
    # Where the max code is 15 the scale moves up exactly one step.
    moved = (codes.max(axis=1) == 15) & (p[:, 0] < 254)
    assert np.array_equal(p2[moved, 0], p[moved, 0] + 1)


def test_zero_blocks_are_exact_and_padding_is_zero():
    x = np.zeros(13, np.float32)
    x[8:] = [1, -2, 3, 0, 0]
    p = codec.encode(x)
    assert p[:6].tolist() == [0, 0, 0, 0, 0, 0]
    codes2 = [(p[6 + 2 + j // 2] >> (4 * (j % 2))) & 15 for j in range(8)]
    assert codes2[5:] == [0, 0, 0]  # elements 13..15 are padding
    assert codec.decode(p, 13)[:8].tolist() == [0.0] * 8


def test_saturation_and_flush_to_zero():
    x = np.array([3e38, -1e30, 1.0, 0, 0, 0, 0, 0], np.float32)
    y = codec.decode(codec.encode(x), 8)
    top = math.exp(126 / 6)
    assert y[0] == pytest.approx(top, rel=1e-6) and y[1] == pytest.approx(-top, rel=1e-6)
    assert y[2] == 0.0  # far below A(254)/450: flushed
    a = scale_of(expected_q(1.0))  # the block scale of a block whose max is 1
    tiny = np.array([1.0, 0.99 * a / 450, 1.01 * a / 450, 0, 0, 0, 0, 0], np.float32)
    y = codec.decode(codec.encode(tiny), 8)
    assert y[1] == 0.0 and y[2] == pytest.approx(a / 225, rel=1e-6)  # threshold A/450


def test_negative_zero_and_tiny_negatives():
    x = np.array([-0.0, -1e-30, 1.0, 0, 0, 0, 0, 0], np.float32)
    p = codec.encode(x)
    assert p[1] == 0b10  # -0.0 is not < 0; -1e-30 is
    y = codec.decode(p, 8)
    assert y[1] == 0 and np.signbit(y[1])  # code 0 with the sign set decodes to -0.0


@pytest.mark.parametrize("magnitude", [1e-9, 1e-3, 1.0, 1e6])
def test_stochastic_rounding_is_unbiased(magnitude):
    """Mean over many seeds converges to x, within 6 standard errors computed
    from each element's own two-level variance."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(2048) * magnitude).astype(np.float32)
    draws = 1500
    total = np.zeros(x.size)
    for s in range(draws):
        total += codec.decode(codec.encode(x, rounding="stochastic", seed=s), x.size)
    mean = total / draws
    # Variance of a two-point distribution on the levels around |x|.
    p = codec.encode(x).reshape(-1, 6)
    a = np.repeat(np.exp((p[:, 0].astype(np.float64) - 128) / 6), 8)[: x.size]
    r = np.abs(x.astype(np.float64)) / a
    k = np.floor(15 * np.sqrt(np.minimum(r, 1)))
    lo, hi = a * k ** 2 / 225, a * (k + 1) ** 2 / 225
    prob = np.clip((np.abs(x) - lo) / (hi - lo), 0, 1)
    se = (hi - lo) * np.sqrt(prob * (1 - prob) / draws) + 1e-7 * np.abs(x)
    z = (mean - x) / se
    assert np.abs(z).max() < 6.5
    assert abs(z.mean()) < 6 / math.sqrt(x.size)  # no systematic bias either way
    # Nearest rounding is biased on the same data: the test can tell.
    near = codec.decode(codec.encode(x), x.size)
    assert np.abs((near - x) / se).max() > 6.5
