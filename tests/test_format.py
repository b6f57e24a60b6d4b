"""The format against FORMAT.md, by an independent reading of the spec."""

import math
import struct

import numpy as np
import pytest

from squinchcomm import codec
from squinchcomm.codec import format as fmt


def spec_decode(payload: bytes, n: int) -> list:
    """A decoder written from FORMAT.md alone, in float64 Python arithmetic."""
    out = []
    for b in range(len(payload) // 6):
        q, signs = payload[6 * b], payload[6 * b + 1]
        (word,) = struct.unpack("<I", payload[6 * b + 2: 6 * b + 6])
        for j in range(8):
            if q == 255:
                out.append(math.nan)
                continue
            c = (word >> (4 * j)) & 15
            mag = math.exp((q - 128) / 6) * (c / 15) ** 2
            out.append(-mag if (signs >> j) & 1 else mag)
    return out[:n]


def test_worked_example_from_format_md():
    x = np.array([1, -0.5, 0.25, 0, -0.0, 0, 0, 0.003], np.float32)
    assert codec.encode(x).tobytes().hex(" ") == "81 02 ae 07 00 10"


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_independent_decoder_agrees_to_float32_rounding(rounding):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(4001) * np.exp(rng.uniform(-25, 25, 4001))).astype(np.float32)
    x[100] = np.nan
    payload = codec.encode(x, rounding=rounding, seed=5)
    ref = np.array(spec_decode(payload.tobytes(), x.size))
    got = codec.decode(payload, x.size).astype(np.float64)
    assert np.array_equal(np.isnan(ref), np.isnan(got))
    ok = ~np.isnan(ref)
    # float32 table entries and one float32 product: within 2 ulp of float32.
    assert np.allclose(got[ok], ref[ok], rtol=2.5e-7, atol=0)


def test_tables_match_their_definitions():
    q = np.arange(255)
    assert np.allclose(fmt.SCALE[:255], np.exp((q - 128) / 6), rtol=6e-8, atol=0)
    assert np.allclose(fmt.INV_SCALE[:255], np.exp(-(q - 128) / 6), rtol=6e-8, atol=0)
    assert fmt.THRESHOLD[0] == 0 and np.isinf(fmt.THRESHOLD[255])
    assert np.allclose(fmt.THRESHOLD[1:255], np.exp((q[1:] - 129) / 6), rtol=6e-8, atol=0)
    c = np.arange(16)
    assert np.allclose(fmt.LEVEL_FRACTION, c ** 2 / 225, rtol=6e-8, atol=0)
    assert np.all(np.diff(fmt.MIDPOINT[:15]) > 0) and np.all(fmt.LEVEL_STEP[:15] > 0)


def test_hash_matches_the_pseudocode():
    def mix32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    seed, idx = 0x0123456789ABCDEF, [0, 1, 7, 2 ** 32 + 5, 2 ** 63 + 11]
    key = mix32((seed & 0xFFFFFFFF) ^ mix32((seed >> 32) ^ 0x9E3779B9))
    assert fmt.stream_key(seed) == key
    expected = [mix32((i & 0xFFFFFFFF) ^ mix32((i >> 32) ^ key)) >> 8 for i in idx]
    assert fmt.uniform24(key, np.array(idx, np.uint64)).tolist() == expected


def test_payload_size():
    assert [codec.encoded_nbytes(n) for n in (0, 1, 8, 9, 16, 1000)] == [0, 6, 6, 12, 12, 750]
    with pytest.raises(ValueError):
        codec.encoded_nbytes(-1)
