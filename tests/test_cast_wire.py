"""The fp16/bf16 cast wire on the CPU: the Numba kernels (codec.cpu.cast_*)
against NumPy, bit for bit.

References: NumPy's own ``astype(np.float16)`` / ``astype(np.float32)`` for the
half conversions, :mod:`squinchcomm.codec.baselines` for bfloat16, and the
array-module code of ``codec.cast.CastWire`` (what host arrays run under
``SQUINCHCOMM_CODEC_BACKEND=oracle``, and CuPy arrays always) for the wire
operations, called exactly as the Communicator calls them.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mixed_values

pytest.importorskip("numba")
# The NumPy reference warns where sums overflow or meet NaN; the kernels do not.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

from squinchcomm.codec import _arrays, cpu  # noqa: E402
from squinchcomm.codec import baselines as bl  # noqa: E402
from squinchcomm.codec.cast import CastWire as _CastWire  # noqa: E402

WIRES = ("float16", "bfloat16")
KINDS = ("float32", "float16", "bfloat16")
SIZES = (0, 1, 7, 1001, 2 ** 15, 3 * 2 ** 15 + 5)  # the last two: whole and partial parallel chunks


def assert_bits_equal(got, want, what):
    """Same dtype, same shape, same bits (NaN payloads and -0.0 included)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    g, w = got.view(np.uint8), want.view(np.uint8)
    if not np.array_equal(g, w):
        bad = np.nonzero(got.view(f"u{got.itemsize}") != want.view(f"u{want.itemsize}"))[0]
        raise AssertionError(f"{what}: {bad.size} of {got.size} differ, first at {bad[:5]}: "
                             f"got {got[bad[:5]]}, want {want[bad[:5]]}")


# ----------------------------------------------------------------------------
# The conversions.
# ----------------------------------------------------------------------------
ALL_HALF = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)

F32_EDGES = np.array([
    0x00000000, 0x00000001, 0x007FFFFF, 0x00800000,  # zero, float32 subnormals
    0x33000000, 0x33000001, 0x33800000, 0x33C00000,  # 2^-25 (tie -> 0), above, 2^-24, 1.5 * 2^-24
    0x34200000, 0x34400000,  # 2.5 and 3 * 2^-24: subnormal ties to even (2, 4... of 2^-24)
    0x387FC000, 0x387FE000, 0x387FF000, 0x387FFFFF,  # largest subnormal, tie to the smallest normal
    0x38800000, 0x38801000, 0x38803000,  # smallest normal and normal ties (even down, odd up)
    0x3F800000, 0x3F801000, 0x3F803000, 0x3F801001,  # 1, 1 + 2^-11 tie, odd tie, above the tie
    0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001,  # 65504, below / at / above the overflow tie
    0x47800000, 0x7F7FFFFF, 0x7F800000,  # 65536, float32 max, Inf
    0x7F800001, 0x7F801FFF, 0x7F802000, 0x7FA00000,  # signalling NaNs (payload low, high)
    0x7FC00000, 0x7FC00001, 0x7FFFFFFF,  # quiet NaNs
    0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7F8000, 0x7F7F7FFF,  # bfloat16 ties and overflow
], np.uint32)


def _f32_patterns(rng) -> np.ndarray:
    """float32 bit patterns: uniform over all 2^32, dense over the half range
    (with the 13 dropped bits often a tie), the edges, and all of them negated."""
    uniform = rng.integers(0, 2 ** 32, 1 << 21, dtype=np.uint64).astype(np.uint32)
    half = rng.integers(0x32800000, 0x47900000, 1 << 20, dtype=np.uint64).astype(np.uint32)
    ties = (half & ~np.uint32(0x1FFF)) | np.uint32(0x1000)
    bf_ties = (uniform[: 1 << 18] & ~np.uint32(0xFFFF)) | np.uint32(0x8000)
    bits = np.concatenate([uniform, half, ties, bf_ties, F32_EDGES])
    return np.concatenate([bits, bits ^ np.uint32(0x80000000)])


def _encode(x, kind, wire):
    out = np.empty(x.size, np.uint16)
    return cpu.cast_encode(x, kind, wire, out, None)


def _decode(p, kind, wire):
    out = np.empty(p.size, np.float32 if kind == "float32" else np.uint16)
    return cpu.cast_decode(p, out, kind, wire)


def test_half_to_float32_all_65536():
    want = ALL_HALF.view(np.float16).astype(np.float32)
    assert_bits_equal(_decode(ALL_HALF, "float32", "float16"), want, "f16 -> f32")


def test_bfloat16_to_float32_all_65536():
    want = bl.decode_bf16(ALL_HALF)
    assert_bits_equal(_decode(ALL_HALF, "float32", "bfloat16"), want, "bf16 -> f32")
    # and the independent definition: the top half of a float32
    assert np.array_equal(want.view(np.uint32) >> 16, ALL_HALF.astype(np.uint32))


def test_float32_to_half_matches_numpy(rng):
    bits = _f32_patterns(rng)
    x = bits.view(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert_bits_equal(_encode(x, "float32", "float16"), want, "f32 -> f16")


def test_float32_to_half_edge_values():
    # Written out from IEEE 754, independent of NumPy.
    cases = {0x33000000: 0x0000, 0x33000001: 0x0001, 0x33800000: 0x0001,
             0x33C00000: 0x0002, 0x34200000: 0x0002, 0x387FF000: 0x0400,
             0x38801000: 0x0400, 0x38803000: 0x0402, 0x477FE000: 0x7BFF,
             0x477FEFFF: 0x7BFF, 0x477FF000: 0x7C00, 0x7F800000: 0x7C00,
             0x80000000: 0x8000, 0xC77FF000: 0xFC00, 0x7FC00000: 0x7E00}
    x = np.array(list(cases), np.uint32).view(np.float32)
    got = _encode(x, "float32", "float16")
    assert [hex(v) for v in got] == [hex(v) for v in cases.values()]
    # NaN stays NaN even when its payload lies only in the dropped bits
    nan = np.array([0x7F800001, 0xFF800001], np.uint32).view(np.float32)
    assert np.isnan(_encode(nan, "float32", "float16").view(np.float16)).all()


def test_float32_to_bfloat16_matches_reference(rng):
    x = _f32_patterns(rng).view(np.float32)
    assert_bits_equal(_encode(x, "float32", "bfloat16"), bl.encode_bf16(x), "f32 -> bf16")


@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
@pytest.mark.parametrize("wire", WIRES)
def test_two_byte_inputs_and_outputs_match_numpy(kind, wire):
    # every 2-byte pattern of one kind, through float32, to the other (or same) kind
    via = (bl.decode_fp16(ALL_HALF.view(np.float16)) if kind == "float16"
           else bl.decode_bf16(ALL_HALF))
    want = (bl.encode_fp16(via).view(np.uint16) if wire == "float16" else bl.encode_bf16(via))
    assert_bits_equal(_encode(ALL_HALF, kind, wire), want, f"encode {kind} -> {wire}")
    # decoding a payload of ``kind`` bits to an output of kind ``wire``
    assert_bits_equal(_decode(ALL_HALF, kind=wire, wire=kind), want, f"decode {kind} -> {wire}")


# ----------------------------------------------------------------------------
# The wire operations, as the Communicator calls them: kernels vs reference.
# ----------------------------------------------------------------------------
@pytest.fixture
def backend(monkeypatch):
    """``backend("numba")`` / ``backend("oracle")`` selects _CastWire's host path."""
    def use(name):
        monkeypatch.setenv("SQUINCHCOMM_CODEC_BACKEND", name)
        assert (_CastWire._kernels(np) is cpu) == (name == "numba")

    return use


def _data(rng, n, kind):
    """Flat input of ``kind`` (fp16/bf16 as uint16 bits) with special values."""
    x = mixed_values(rng, n)
    if n >= 100:
        x[60:64] = [7e4, -65520.0, 65519.0, 3e-8]  # fp16 overflow, tie, subnormal
    if kind == "float32":
        return x
    if kind == "float16":
        return bl.encode_fp16(x).view(np.uint16)
    return bl.encode_bf16(x)


def _flat(data, kind):
    return _arrays.Flat(data, kind, "numpy", None, None)


def _both(backend, call):
    """Run ``call()`` under the kernels and under the reference; return both results."""
    backend("numba")
    got = call()
    backend("oracle")
    return got, call()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_encode_bit_exact(backend, rng, n, kind, wire, with_residual):
    x = _data(rng, n, kind)
    res0 = (rng.standard_normal(n) * 1e-3).astype(np.float32)

    def call():
        out = np.full(2 * n, 0xAB, np.uint8)  # 2-byte payload as the Communicator allocates it
        res = res0.copy() if with_residual else None
        _CastWire(wire).encode(_flat(x, kind), out, res, seed=0)
        return out, res

    (p1, r1), (p2, r2) = _both(backend, call)
    assert_bits_equal(p1, p2, "payload")
    if with_residual:
        assert_bits_equal(r1, r2, "residual")


def _stack(rng, k, n, wire):
    """(k, 2n) uint8 rows of wire values: rounded data, plus raw random bits
    (every pattern: subnormals, Inf, NaN) in the first row's tail."""
    rows = np.stack([_data(rng, n, "float32") for _ in range(k)]) if n else np.zeros((k, 0))
    bits = _encode(rows.astype(np.float32).reshape(-1), "float32", wire).reshape(k, n)
    if n >= 1000:
        bits[0, -500:] = rng.integers(0, 2 ** 16, 500).astype(np.uint16)
    return bits.view(np.uint8)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("scale,with_residual", [(1.0, False), (0.25, True), (1 / 3, False),
                                                 (1 / 3, True)])
def test_reduce_encode_bit_exact(backend, rng, n, k, wire, scale, with_residual):
    stack = _stack(rng, k, n, wire)
    res0 = (rng.standard_normal(n) * 1e-2).astype(np.float32)

    def call():
        out = np.empty(2 * n, np.uint8)
        res = res0.copy() if with_residual else None
        _CastWire(wire).reduce_encode(stack, n, scale, out, res, seed=0, offset=0)
        return out, res

    (p1, r1), (p2, r2) = _both(backend, call)
    assert_bits_equal(p1, p2, "payload")
    if with_residual:
        assert_bits_equal(r1, r2, "residual")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("scale", [1.0, 1 / 3])
def test_decode_accumulate_bit_exact(backend, rng, n, k, wire, scale):
    stack = _stack(rng, k, n, wire)
    out0 = mixed_values(rng, n)

    def call():
        out = out0.copy()
        _CastWire(wire).decode_accumulate(stack, n, out, scale)
        return out

    got, want = _both(backend, call)
    assert_bits_equal(got, want, "accumulated")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wire", WIRES)
def test_decode_bit_exact(backend, rng, n, kind, wire):
    payload = _stack(rng, 1, n, wire)[0]

    def call():
        out = _arrays.new_buffer(_flat(payload, "uint8"), kind, n)
        _CastWire(wire).decode(payload, n, out)
        return out.data

    got, want = _both(backend, call)
    assert_bits_equal(got, want, f"decoded {kind}")


def test_slices_of_a_larger_payload(backend, rng):
    # The Communicator decodes shards in place: payload and output are views.
    n = 3001
    payload = _stack(rng, 1, 2 * n, "bfloat16")[0]

    def call():
        out = np.zeros(2 * n + 3, np.uint16)
        part = _flat(out[3:3 + n], "float16")
        _CastWire("bfloat16").decode(payload[2 * n:], n, part)
        return out

    got, want = _both(backend, call)
    assert_bits_equal(got, want, "decoded slice")
    assert not got[:3].any()
