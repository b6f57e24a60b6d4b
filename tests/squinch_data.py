"""Test data shared by the CUDA tests (GPU and host build): values on the
format's boundaries, exact ties, special values, and a bit-exact comparison;
and the format's worst-case rounding error, shared by the tests that bound a
compressed allreduce."""

from __future__ import annotations

import math

import numpy as np

from squinchcomm.codec import format as fmt
from squinchcomm.codec import oracle

__all__ = ["SQUINCH_C", "FP32_SLACK", "special_values", "boundary_block", "exact_r_block",
           "stochastic_tie_values", "scribble_tail", "random_values", "to_kind", "from_kind",
           "bf16_reference", "f16_reference", "random_payloads", "every_level_payload",
           "assert_bits_equal"]

#: Squinch nearest rounding: the worst error of one quantization as a fraction
#: of its block's max m. The block's scale A satisfies m < A <= m e^(1/6); the
#: widest gap between the levels A (c/15)^2 is the top one, A (1 - (14/15)^2),
#: and nearest rounding errs by at most half of it.
SQUINCH_C = (1 - (14 / 15) ** 2) / 2 * math.exp(1 / 6)
#: Relative slack for fp32 arithmetic in a reference average (DDP divides,
#: then sums) and in the decode.
FP32_SLACK = 1e-5


def special_values() -> np.ndarray:
    """float32 values that stress the format: zeros, denormals, extremes, NaN/Inf."""
    f32 = np.float32
    vals = [0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 1.17e-38, 1e-12, 5.4e-10, 1.0, -1.0,
            1.3e9, -1.3e9, 1e20, 3.4028235e38, -3.4028235e38, np.inf, -np.inf, np.nan]
    return np.array(vals, dtype=f32)


def boundary_block(rng: np.random.Generator, stochastic: bool) -> np.ndarray:
    """One block whose values sit on (or one ulp beside) the table boundaries:
    the maximum just below A(q), the others at A(q) * MIDPOINT[c] (nearest) or
    A(q) * F[c] (stochastic) give or take an ulp."""
    q = int(rng.integers(0, 254))
    top = np.nextafter(fmt.THRESHOLD[q + 1], np.float32(0))  # largest m with q_max = q
    levels = fmt.LEVEL_FRACTION[1:15] if stochastic else fmt.MIDPOINT[:15]
    c = rng.integers(0, levels.size, 7)
    vals = (levels[c] * fmt.SCALE[q]).astype(np.float32)
    ulps = rng.integers(-1, 2, 7)
    vals = np.where(ulps > 0, np.nextafter(vals, np.float32(np.inf)),
                    np.where(ulps < 0, np.nextafter(vals, np.float32(0)), vals))
    block = np.concatenate([[top], vals]).astype(np.float32)
    block *= np.where(rng.random(8) < 0.5, -1, 1).astype(np.float32)
    return rng.permutation(block)


def exact_r_block(rng: np.random.Generator) -> np.ndarray:
    """One block whose normalised magnitudes r = fl(|x| * INV_SCALE[q]) land exactly
    on a level F[k] or midpoint M[k], or one ulp beside it (where such an x exists)."""
    q = int(rng.integers(1, 254))
    top = np.nextafter(fmt.THRESHOLD[q + 1], np.float32(0))  # q_max of the block is q
    targets = np.concatenate([fmt.LEVEL_FRACTION[1:15], fmt.MIDPOINT[:15]])
    r = targets[rng.integers(0, targets.size, 7)]
    step = rng.integers(-1, 2, 7)
    r = np.where(step > 0, np.nextafter(r, np.float32(np.inf)),
                 np.where(step < 0, np.nextafter(r, np.float32(0)), r)).astype(np.float32)
    x0 = (r.astype(np.float64) * float(fmt.SCALE[q])).astype(np.float32)  # (7,)
    cand = x0.view(np.int32)[:, None] + np.arange(-4, 5, dtype=np.int32)  # (7, 9) ulps
    cand = cand.view(np.float32)
    hit = (cand * fmt.INV_SCALE[q]) == r[:, None]  # float32 product, as the kernels
    pick = np.where(hit.any(axis=1), hit.argmax(axis=1), 4)
    vals = cand[np.arange(7), pick]
    block = np.concatenate([[top], vals]).astype(np.float32)
    block *= np.where(rng.random(8) < 0.5, -1, 1).astype(np.float32)
    return rng.permutation(block)


def stochastic_tie_values(key_seed: int, offset: int, nb: int, rng) -> np.ndarray:
    """nb blocks in which every element is an exact stochastic-rounding tie,
    fl(u * STEP[k]) == fl(r - F[k]), for the hash of its global index."""
    q = rng.integers(1, 254, nb)  # (nb,)
    top_idx = rng.integers(0, 8, nb)
    index = offset + np.arange(nb * 8, dtype=np.uint64)
    u = fmt.uniform24(fmt.stream_key(key_seed), index).astype(np.float32) * np.float32(2.0**-24)
    u = u.reshape(nb, 8)
    k = rng.integers(1, 14, (nb, 8))
    d = u * fmt.LEVEL_STEP[k]  # float32
    r = fmt.LEVEL_FRACTION[k] + d  # float32; a tie when r - F[k] == d exactly
    inv = fmt.INV_SCALE[q][:, None]
    x0 = (r.astype(np.float64) * fmt.SCALE[q][:, None].astype(np.float64)).astype(np.float32)
    cand = (x0.view(np.int32)[..., None] + np.arange(-4, 5, dtype=np.int32)).view(np.float32)
    hit = (cand * inv[..., None]) == r[..., None]  # (nb, 8, 9)
    pick = np.where(hit.any(axis=2), hit.argmax(axis=2), 4)
    x = np.take_along_axis(cand, pick[..., None], axis=2)[..., 0]  # (nb, 8)
    x[np.arange(nb), top_idx] = np.nextafter(fmt.THRESHOLD[q + 1], np.float32(0))
    return x.reshape(-1)


def scribble_tail(payloads: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random signs and codes for the padding elements (>= n) of the last block,
    which every consumer must ignore."""
    payloads = payloads.copy()
    if n % 8 and payloads.size:
        last = payloads.reshape(payloads.shape[0], -1, 6)[:, -1]  # (k, 6) view
        pad = np.uint32(((1 << 32) - 1) ^ ((1 << (4 * (n % 8))) - 1))  # nibbles >= n % 8
        word = last[:, 2:].copy().view(np.uint32)[:, 0]
        word = (word & ~pad) | (rng.integers(0, 2**32, word.size, dtype=np.uint64)
                                .astype(np.uint32) & pad)
        last[:, 2:] = word.view(np.uint8).reshape(-1, 4)
        last[:, 1] |= np.uint8((0xFF << (n % 8)) & 0xFF)
    return payloads


def random_values(rng: np.random.Generator, n: int, stochastic: bool = False,
                  specials: bool = True) -> np.ndarray:
    """n float32 values: blocks of random scale across (and beyond) the format's
    range, boundary blocks, threshold maxima and sprinkled special values."""
    nb = fmt.num_blocks(n)
    scale = np.exp(rng.uniform(-55.0, 55.0, nb)).astype(np.float32)  # (nb,)
    x = (rng.standard_normal((nb, 8)) * scale[:, None]).astype(np.float32)  # (nb, 8)
    x[rng.random((nb, 8)) < 0.05] = 0.0
    for b in np.flatnonzero(rng.random(nb) < 0.2):
        x[b] = boundary_block(rng, stochastic)
    for b in np.flatnonzero(rng.random(nb) < 0.2):
        x[b] = exact_r_block(rng)
    for b in np.flatnonzero(rng.random(nb) < 0.1):  # maxima on T[q] or one ulp off
        t = fmt.THRESHOLD[int(rng.integers(1, 255))]
        x[b] = np.minimum(np.abs(x[b]), t) * np.sign(x[b])
        x[b, rng.integers(0, 8)] = [np.nextafter(t, np.float32(0)), t,
                                    np.nextafter(t, np.float32(np.inf))][rng.integers(0, 3)]
    x = x.reshape(-1)[:n].copy()
    if specials and n:
        sp = special_values()
        where = rng.random(n) < 0.01
        x[where] = sp[rng.integers(0, sp.size, int(where.sum()))]
    return x


def to_kind(x: np.ndarray, kind: str) -> np.ndarray:
    """float32 values as the kernel input of ``kind`` (float16/bfloat16: uint16 bits)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if kind == "float16":
            return x.astype(np.float16).view(np.uint16)
        if kind == "bfloat16":
            return (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)  # truncation
    return x


def from_kind(bits: np.ndarray, kind: str) -> np.ndarray:
    """The exact float32 values of a kernel input (what the oracle encodes)."""
    return oracle.to_float32(bits, kind)


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits: nearest even, NaN -> 0x7FC0 | sign."""
    return oracle.from_float32(x, "bfloat16")


def f16_reference(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 bits as NumPy's cast."""
    return oracle.from_float32(x, "float16")


def random_payloads(rng: np.random.Generator, k: int, n: int, nan_blocks: bool = True):
    """k encoded payloads (k, 6 * ceil(n / 8)) of random data."""
    rows = [oracle.encode(random_values(rng, n, specials=nan_blocks)) for _ in range(k)]
    return np.stack(rows) if rows else np.zeros((0, fmt.encoded_nbytes(n)), np.uint8)


def every_level_payload():
    """A payload holding every (q, code, sign) triple, q = 255 included; returns
    (payload, n)."""
    q, c, s = np.meshgrid(np.arange(256), np.arange(16), np.arange(2), indexing="ij")
    q, c, s = q.reshape(-1, 8), c.reshape(-1, 8), s.reshape(-1, 8)  # one q per block
    payload = np.zeros((q.shape[0], 6), np.uint8)
    payload[:, 0] = q[:, 0]
    payload[:, 1] = (s << np.arange(8)).sum(axis=1)
    payload[:, 2:] = c[:, 0::2] | (c[:, 1::2] << 4)
    return payload.reshape(-1), q.size


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str):
    """Compare two arrays bit for bit (floats through their bit patterns)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if got.dtype == np.float32:
        got, want = got.view(np.uint32), want.view(np.uint32)
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    if bad.size:
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.size} mismatches, first at {i}: "
                             f"got {got.reshape(-1)[i]:#x} want {want.reshape(-1)[i]:#x}")
