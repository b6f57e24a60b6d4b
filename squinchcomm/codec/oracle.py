"""The Squinch format as readable NumPy: the specification in code.

Slow and simple on purpose. The Numba and CUDA backends must produce the
same bytes and floats as these functions; the tests compare them. Inputs here
are already float32 (callers convert fp16/bf16 exactly first).
"""

from __future__ import annotations

import numpy as np

from squinchcomm.codec import format as fmt

__all__ = ["encode", "decode", "decode_accumulate", "reduce_encode", "to_float32", "from_float32"]


def _blocks(x: np.ndarray) -> np.ndarray:
    """Zero-pad a 1-D float32 array to whole blocks; shape (nblocks, 8)."""
    n = x.size
    padded = np.zeros(fmt.num_blocks(n) * fmt.BLOCK, dtype=np.float32)
    padded[:n] = x
    return padded.reshape(-1, fmt.BLOCK)


def _quantize(v: np.ndarray, rounding: str, seed: int, offset: int):
    """Quantize blocks ``v`` (nb, 8) float32; return (q, signs, codes)."""
    nb = v.shape[0]
    finite = np.isfinite(v).all(axis=1)  # (nb,)
    mag = np.abs(np.where(finite[:, None], v, np.float32(0)))  # (nb, 8)
    # Step 1: the block scale, q = largest q in 0..254 with m >= T[q].
    m = mag.max(axis=1) if nb else np.zeros(0, np.float32)  # (nb,)
    q = np.searchsorted(fmt.THRESHOLD[:255], m, side="right") - 1  # (nb,)
    # Step 2: the normalised magnitude r = |x| * (1 / A(q)), one float32 product.
    r = mag * fmt.INV_SCALE[q][:, None]  # (nb, 8) float32
    # Step 3: the code.
    if rounding == "nearest":
        # c = number of midpoints <= r: the nearest level, ties upward.
        codes = np.searchsorted(fmt.MIDPOINT[:15], r, side="right")
    else:
        # k = the level at or below r; round up with probability (r - F[k]) / STEP[k].
        k = np.searchsorted(fmt.LEVEL_FRACTION, r, side="right") - 1
        index = offset + np.arange(nb * fmt.BLOCK, dtype=np.uint64).reshape(nb, 8)
        u = fmt.uniform24(fmt.stream_key(seed), index).astype(np.float32)
        u = u * np.float32(2.0 ** -24)
        kc = np.minimum(k, 14)
        up = (u * fmt.LEVEL_STEP[kc]) < (r - fmt.LEVEL_FRACTION[kc])
        codes = np.where(k >= 15, 15, k + up)
    signs = v < 0  # (nb, 8); -0.0 is not < 0
    # Step 4: non-finite blocks are canonical: q = 255, signs and codes 0.
    q = np.where(finite, q, fmt.Q_NONFINITE)
    signs &= finite[:, None]
    codes = np.where(finite[:, None], codes, 0)
    return q.astype(np.uint8), signs, codes.astype(np.uint8)


def _pack(q, signs, codes) -> np.ndarray:
    nb = q.shape[0]
    out = np.empty((nb, fmt.BLOCK_BYTES), dtype=np.uint8)
    out[:, 0] = q
    out[:, 1] = (signs.astype(np.uint8) << np.arange(8, dtype=np.uint8)).sum(axis=1)
    out[:, 2:] = codes[:, 0::2] | (codes[:, 1::2] << 4)  # element 2k low nibble
    return out.reshape(-1)


def _unpack(payload: np.ndarray):
    p = payload.reshape(-1, fmt.BLOCK_BYTES)
    q = p[:, 0]
    signs = ((p[:, 1:2] >> np.arange(8, dtype=np.uint8)) & 1).astype(bool)
    codes = np.empty((p.shape[0], 8), dtype=np.uint8)
    codes[:, 0::2] = p[:, 2:] & 0x0F
    codes[:, 1::2] = p[:, 2:] >> 4
    return q, signs, codes


def _decode_blocks(payload: np.ndarray) -> np.ndarray:
    """Decode to float32 blocks (nb, 8): sign * A(q) * F[c]; NaN for q = 255."""
    q, signs, codes = _unpack(payload)
    mag = fmt.SCALE[q][:, None] * fmt.LEVEL_FRACTION[codes]  # float32 product
    bits = mag.view(np.uint32) | (signs.astype(np.uint32) << np.uint32(31))
    bits[q == fmt.Q_NONFINITE] = fmt.CANONICAL_NAN_BITS
    return bits.view(np.float32)


def encode(x: np.ndarray, rounding: str = "nearest", seed: int = 0, offset: int = 0,
           residual: np.ndarray | None = None) -> np.ndarray:
    """Encode float32 ``x`` (1-D); with ``residual``, encode ``x + residual`` and
    store the new residual ``(x + residual) - decoded`` in place (blocks with a
    NaN/Inf keep their old residual)."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    v = _blocks(x)
    if residual is not None:
        v = v + _blocks(residual)
    q, signs, codes = _quantize(v, rounding, seed, offset)
    payload = _pack(q, signs, codes)
    if residual is not None:
        _update_residual(residual, v, payload, q)
    return payload


def _update_residual(residual, v, payload, q):
    n = residual.size
    new = (v - _decode_blocks(payload))  # float32
    keep = q == fmt.Q_NONFINITE
    new[keep] = _blocks(residual)[keep]
    residual[:] = new.reshape(-1)[:n]


def decode(payload: np.ndarray, n: int) -> np.ndarray:
    """Decode ``payload`` to ``n`` float32 values."""
    return _decode_blocks(payload).reshape(-1)[:n].copy()


def _reduce(payloads: np.ndarray, n: int, scale: float) -> np.ndarray:
    """Sum the decoded payloads in order, then scale: fl(fl(sum) * scale)."""
    total = np.zeros(fmt.num_blocks(n) * fmt.BLOCK, dtype=np.float32)
    for p in payloads:
        total = total + _decode_blocks(p).reshape(-1)
    return total * np.float32(scale)


def decode_accumulate(payloads: np.ndarray, n: int, out: np.ndarray,
                      scale: float = 1.0) -> np.ndarray:
    """``out += scale * sum_k decode(payloads[k])`` in float32, in payload order;
    NaN results are written as the canonical NaN."""
    with np.errstate(invalid="ignore", over="ignore"):
        result = out + _reduce(payloads, n, scale)[:n]
    result.view(np.uint32)[np.isnan(result)] = fmt.CANONICAL_NAN_BITS
    out[:] = result
    return out


def reduce_encode(payloads: np.ndarray, n: int, scale: float = 1.0,
                  rounding: str = "nearest", seed: int = 0, offset: int = 0,
                  residual: np.ndarray | None = None) -> np.ndarray:
    """Encode ``scale * sum_k decode(payloads[k])`` (the reduced shard), with an
    optional error-feedback residual as in :func:`encode`."""
    reduced = _reduce(payloads, n, scale)[:n]
    return encode(reduced, rounding, seed, offset, residual)


# ----------------------------------------------------------------------------
# Input and output types: fp16/bf16 travel as uint16 bits.
# ----------------------------------------------------------------------------
def to_float32(x: np.ndarray, kind: str) -> np.ndarray:
    """Exact conversion of float32 / float16 bits / bfloat16 bits to float32."""
    if kind == "float32":
        return x
    if kind == "float16":
        return x.view(np.float16).astype(np.float32)
    return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)


def from_float32(y: np.ndarray, kind: str) -> np.ndarray:
    """Round float32 to the output kind, to nearest even; returns float32,
    or uint16 bits for float16 / bfloat16. bfloat16 NaN is 0x7FC0 (| sign)."""
    if kind == "float32":
        return y
    if kind == "float16":
        with np.errstate(over="ignore"):  # levels above 65504 become inf
            return y.astype(np.float16).view(np.uint16)
    bits = y.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded).astype(np.uint16)
