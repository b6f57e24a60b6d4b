"""Tests of the comparison codecs (squinchcomm.codec.baselines).

The error bounds are derived from each method's definition, not fitted to its
output: a bug in rounding, scaling, packing or padding breaks one of them.
"""

from __future__ import annotations


import numpy as np
import pytest
from conftest import no_gpu
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from squinchcomm.codec import baselines as bl

SETTINGS = settings(max_examples=60, deadline=None)
F32_EPS = 2.0 ** -23


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------
def _blocks_absmax(x: np.ndarray, block: int) -> np.ndarray:
    """Per-element absmax of the element's block, shape (n,)."""
    n = x.size
    nb = -(-n // block)
    padded = np.zeros(nb * block, np.float32)
    padded[:n] = np.abs(x)
    return np.repeat(padded.reshape(nb, block).max(axis=1), block)[:n]


def _random_bits(rng, n: int) -> np.ndarray:
    """float32 values from uniformly random bit patterns (all classes)."""
    return rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)


float_arrays = hnp.arrays(
    np.float32, st.integers(0, 700),
    elements=st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False))


# ----------------------------------------------------------------------------
# fp16 / bf16 casts.
# ----------------------------------------------------------------------------
def test_fp16_relative_error_normal_range():
    rng = np.random.default_rng(1)
    # log-uniform magnitudes over the whole fp16 normal range, both signs
    mag = np.exp(rng.uniform(np.log(6.2e-5), np.log(65000.0), 200_000)).astype(np.float32)
    x = mag * rng.choice([-1, 1], mag.size).astype(np.float32)
    y = bl.decode_fp16(bl.encode_fp16(x))
    assert y.dtype == np.float32
    assert np.all(np.abs(y - x) <= 2.0 ** -11 * np.abs(x))
    assert np.all(np.sign(y) == np.sign(x))


@SETTINGS
@given(st.floats(2.0 ** -14, 65504.0, width=32))
def test_fp16_relative_error_property(v):
    x = np.array([v, -v], np.float32)
    y = bl.decode_fp16(bl.encode_fp16(x))
    assert np.all(np.abs(y - x) <= 2.0 ** -11 * abs(v))


def test_fp16_nonfinite_and_overflow():
    x = np.array([np.nan, np.inf, -np.inf, 65519.0, 65520.0, -1e9, 1e-9], np.float32)
    y = bl.decode_fp16(bl.encode_fp16(x))
    assert np.isnan(y[0])
    assert y[1] == np.inf and y[2] == -np.inf
    assert y[3] == 65504.0  # rounds down to the max
    assert y[4] == np.inf and y[5] == -np.inf  # past the rounding boundary
    assert y[6] == 0.0  # below half the smallest subnormal


def test_bf16_relative_error_normal_range():
    rng = np.random.default_rng(2)
    mag = np.exp(rng.uniform(np.log(1.2e-38), np.log(3.3e38), 200_000)).astype(np.float32)
    x = mag * rng.choice([-1, 1], mag.size).astype(np.float32)
    y = bl.decode_bf16(bl.encode_bf16(x))
    assert np.all(np.isfinite(y))
    assert np.all(np.abs(y.astype(np.float64) - x) <= 2.0 ** -8 * np.abs(x.astype(np.float64)))


def test_bf16_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = _random_bits(rng, 1 << 20)  # every class: normal, subnormal, Inf, NaN
    u = x.view(np.uint32)
    # exact ties (low half 0x8000) with even and odd kept bits, and the
    # patterns around the overflow to Inf and the subnormal boundary
    u[:4096] = (u[:4096] & 0xFFFF0000) | 0x8000
    u[4096:4104] = [0x7F7F8000, 0x7F7F7FFF, 0x7F7FFFFF, 0xFF7F8000,
                    0x007F8000, 0x00008000, 0x80018000, 0x3F808000]
    mine = bl.encode_bf16(x)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(mine[~nan], ref[~nan])
    assert np.all(np.isnan(bl.decode_bf16(mine)[nan]))
    # decode is the exact widening torch does
    ref_f = torch.from_numpy(x[~nan].copy()).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bl.decode_bf16(mine)[~nan].view(np.uint32),
                                  ref_f.view(np.uint32))


def test_bf16_ties_go_to_even():
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even (1.0) wins;
    # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], np.float32)
    y = bl.decode_bf16(bl.encode_bf16(x))
    np.testing.assert_array_equal(y, np.array([1.0, 1 + 2 ** -6, -1.0], np.float32))


def test_bf16_nan_stays_nan_and_inf_stays_inf():
    # 0x7F800001: a NaN whose payload is only in the low bits (truncation -> Inf)
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FA5A5A5, 0x7F800000, 0xFF800000,
                     0x7F7FFFFF], np.uint32)
    y = bl.decode_bf16(bl.encode_bf16(bits.view(np.float32)))
    assert np.all(np.isnan(y[:4]))
    assert y[4] == np.inf and y[5] == -np.inf
    assert y[6] == np.inf  # float32 max rounds past the bf16 max
    # NaN: sign and top payload bits kept, quiet bit (0x0040) set
    np.testing.assert_array_equal(bl.encode_bf16(bits.view(np.float32))[:4],
                                  [0x7FC0, 0xFFC0, 0x7FC0, 0x7FE5])


# ----------------------------------------------------------------------------
# int8 / int4 block absmax.
# ----------------------------------------------------------------------------
@SETTINGS
@given(float_arrays, st.sampled_from([1, 3, 8, 32, 128]), st.sampled_from(["int8", "int4"]))
def test_block_absmax_error_bound(x, block, method):
    qmax = 127 if method == "int8" else 7
    y = bl.roundtrip(x, method, block=block)
    amax = _blocks_absmax(x, block)
    # quantisation: half a step; float32 slack: a few ulps of the block absmax,
    # and for float32-subnormal scales qmax times half a subnormal ulp (2^-150)
    bound = amax / (2 * qmax) + 4 * F32_EPS * amax + qmax * 2.0 ** -149
    assert np.all(np.abs(y - x) <= bound)
    assert y.shape == x.shape and y.dtype == np.float32


@SETTINGS
@given(hnp.arrays(np.float32, st.integers(0, 700),
                  # |x| / 7 stays below the fp16 max, so no scale saturates
                  elements=st.floats(-4e5, 4e5, width=32)),
       st.sampled_from([2, 32, 128]), st.sampled_from(["int8", "int4"]))
def test_block_absmax_fp16_scale_bound(x, block, method):
    # fp16 scales are rounded up, so the bound is half the stored scale.
    enc = bl.BASELINES[method].encode
    p = enc(x, block=block, scale_dtype="float16")
    assert p.scales.dtype == np.float16
    s = np.repeat(p.scales.astype(np.float32), block)[:x.size]
    y = bl.BASELINES[method].decode(p)
    assert np.all(np.abs(y - x) <= s / 2 + 4 * F32_EPS * np.abs(x).max(initial=0))
    qmax = 127 if method == "int8" else 7
    exact = _blocks_absmax(x, block) / np.float32(qmax)
    assert np.all(s >= exact)  # rounded up: no code clips
    normal = exact >= 6.2e-5
    assert np.all(s[normal] <= exact[normal] * (1 + 2.0 ** -10) * (1 + 2 * F32_EPS))


def test_fp16_scale_saturates():
    x = np.array([1e9, -1.0], np.float32)
    p = bl.encode_int8(x, block=2, scale_dtype="float16")
    assert p.scales[0] == np.float16(65504)
    assert bl.decode_int8(p)[0] == np.float32(127 * 65504.0)  # clipped, documented


def test_int8_exact_on_grid_and_scale_value():
    x = np.array([127, -64, 0, 1, -127, 5], np.float32) * np.float32(0.5)
    p = bl.encode_int8(x, block=6)
    np.testing.assert_array_equal(p.codes, [127, -64, 0, 1, -127, 5])
    assert p.scales[0] == np.float32(0.5)
    np.testing.assert_array_equal(bl.decode_int8(p), x)


def test_int4_packing_nibble_order_and_roundtrip():
    # one block holding every code -7..7 (scale 1), plus a 0
    codes = np.array([-7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 0], np.int8)
    x = codes.astype(np.float32)
    p = bl.encode_int4(x, block=16)
    assert p.scales[0] == 1.0
    assert p.codes.dtype == np.uint8 and p.codes.size == 8
    # element 2k in the low nibble, 2k+1 in the high one, two's complement
    nib = codes.astype(np.uint8) & 0xF
    np.testing.assert_array_equal(p.codes, nib[0::2] | (nib[1::2] << 4))
    assert p.codes[0] == 0xA9  # -7 -> 0x9 low, -6 -> 0xA high
    np.testing.assert_array_equal(bl.decode_int4(p), x)


def test_int4_unpack_is_inverse_of_pack_for_all_bytes():
    packed = np.arange(256, dtype=np.uint8)
    codes = bl._unpack_int4(packed, 512, np)
    assert codes.min() == -8 and codes.max() == 7
    np.testing.assert_array_equal(bl._pack_int4(codes, np), packed)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_zero_blocks_exact(method, scale_dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(5 * 32).astype(np.float32)
    x[32:64] = 0.0
    x[128:] = -0.0
    spec = bl.BASELINES[method]
    p = spec.encode(x, block=32, scale_dtype=scale_dtype)
    assert p.scales[1] == 0 and p.scales[4] == 0
    y = spec.decode(p)
    assert np.all(y[32:64] == 0) and np.all(y[128:] == 0)
    assert np.all(np.isfinite(y))
    assert np.all(spec.decode(spec.encode(np.zeros(100, np.float32), block=32)) == 0)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("n,block", [(1, 128), (129, 128), (1000, 32), (7, 3), (5, 5), (0, 16)])
def test_tail_block_padding(method, n, block):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32) * 10
    spec = bl.BASELINES[method]
    p = spec.encode(x, block=block)
    nb = -(-n // block)
    assert p.n == n and p.block == block and p.scales.size == nb
    assert p.nbytes == bl.payload_nbytes(method, n, block=block)
    y = spec.decode(p)
    assert y.shape == (n,)
    if n:
        # the tail block's scale comes from its real elements only
        tail = x[(nb - 1) * block:]
        qmax = 127 if method == "int8" else 7
        assert p.scales[-1] == np.float32(np.abs(tail).max()) / np.float32(qmax)
    if method == "int8":
        assert p.codes.size == nb * block and np.all(p.codes[n:] == 0)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_nonfinite_block_decodes_to_nan_others_unaffected(method):
    x = np.ones(64, np.float32)
    x[3] = np.nan
    x[40] = -np.inf
    spec = bl.BASELINES[method]
    y = spec.decode(spec.encode(x, block=16))
    assert np.all(np.isnan(y[0:16])) and np.all(np.isnan(y[32:48]))
    np.testing.assert_array_equal(y[16:32], 1.0)
    np.testing.assert_array_equal(y[48:64], 1.0)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_symmetric(method):
    x = np.random.default_rng(5).standard_normal(999).astype(np.float32)
    np.testing.assert_array_equal(bl.roundtrip(-x, method, block=32),
                                  -bl.roundtrip(x, method, block=32))


# ----------------------------------------------------------------------------
# Sizes, registry, helpers.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("method,block,scale_dtype,bits", [
    ("fp16", 128, "float32", 16.0), ("bf16", 32, "float16", 16.0),
    ("int8", 32, "float32", 9.0), ("int8", 128, "float32", 8.25),
    ("int8", 128, "float16", 8.125), ("int4", 32, "float32", 5.0),
    ("int4", 128, "float32", 4.25), ("int4", 128, "fp16", 4.125),
])
def test_bits_per_element(method, block, scale_dtype, bits):
    assert bl.bits_per_element(method, block=block, scale_dtype=scale_dtype) == bits
    # the asymptote matches the real payload of a whole number of blocks
    n = 1024 * block
    enc = bl.BASELINES[method].encode
    p = enc(np.ones(n, np.float32), block=block, scale_dtype=scale_dtype) \
        if bl.BASELINES[method].blockwise else enc(np.ones(n, np.float32))
    assert p.nbytes * 8 / n == bits
    assert bl.payload_nbytes(method, n, block=block, scale_dtype=scale_dtype) == p.nbytes


@pytest.mark.parametrize("method", sorted(bl.BASELINES))
def test_registry_roundtrip_shapes_and_dtypes(method):
    x = np.random.default_rng(6).standard_normal((3, 5, 7)).astype(np.float64)
    y = bl.roundtrip(x, method, block=16, scale_dtype="float16")
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.allclose(y, x, rtol=0.2, atol=0.3)
    assert bl.BASELINES[method].name == method
    # empty input
    assert bl.roundtrip(np.zeros(0, np.float32), method).shape == (0,)


@pytest.mark.parametrize("call", [
    lambda: bl.encode_int8(np.ones(4), block=0),
    lambda: bl.encode_int8(np.ones(4), block=-8),
    lambda: bl.encode_int4(np.ones(4), block=2.5),
    lambda: bl.encode_int4(np.ones(4), block=True),
    lambda: bl.encode_int8(np.ones(4), scale_dtype="int8"),
    lambda: bl.encode_int8(np.ones(4), scale_dtype=np.float64),
    lambda: bl.encode_fp16(np.ones(4, np.complex64)),
    lambda: bl.encode_bf16(np.array(["a"])),
    lambda: bl.decode_int8(bl.encode_int4(np.ones(4), block=4)),
    lambda: bl.decode_int4(np.ones(4, np.uint8)),
    lambda: bl.decode_fp16(np.ones(4, np.float32)),
    lambda: bl.decode_bf16(np.ones(4, np.float32)),
    lambda: bl.roundtrip(np.ones(4), "int3"),
    lambda: bl.roundtrip(np.ones(4), "int8", blocks=32),
    lambda: bl.roundtrip(np.ones(4), "fp16", block=0),
    lambda: bl.bits_per_element("squinch"),
    lambda: bl.bits_per_element("int8", block=0),
    lambda: bl.payload_nbytes("int8", -1),
    lambda: bl.payload_nbytes("int8", 2.0),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_error_message_names_the_fix():
    with pytest.raises(ValueError, match="block=32"):
        bl.encode_int8(np.ones(4), block=0)
    with pytest.raises(ValueError, match="choose one of"):
        bl.roundtrip(np.ones(4), "int3")


# ----------------------------------------------------------------------------
# CuPy: the same bytes as NumPy (skips without a GPU).
# ----------------------------------------------------------------------------
def _cupy_or_skip():
    try:
        import cupy

        ok = cupy.is_available()
    except Exception:  # not installed, or no driver
        ok = False
    if not ok:
        no_gpu("needs CuPy and a CUDA GPU")
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("method", sorted(bl.BASELINES))
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_cupy_matches_numpy(method, scale_dtype):
    cp = _cupy_or_skip()
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(10_001) * np.exp(rng.uniform(-20, 5, 10_001))).astype(np.float32)
    x[17] = np.nan
    spec = bl.BASELINES[method]
    opts = {"block": 64, "scale_dtype": scale_dtype} if spec.blockwise else {}
    p_np = spec.encode(x, **opts)
    p_cp = spec.encode(cp.asarray(x), **opts)
    if spec.blockwise:
        np.testing.assert_array_equal(cp.asnumpy(p_cp.codes), p_np.codes)
        np.testing.assert_array_equal(cp.asnumpy(p_cp.scales), p_np.scales)
    else:
        np.testing.assert_array_equal(cp.asnumpy(p_cp), p_np)
    y = spec.decode(p_cp)
    assert type(y).__module__.startswith("cupy")
    np.testing.assert_array_equal(cp.asnumpy(y), spec.decode(p_np))
