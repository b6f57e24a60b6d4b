"""Comparison codecs for Squinch: fp16 / bf16 casts and int8 / int4 block absmax.

These are the formats Squinch is measured against in the benchmarks (the
quality table, the bandwidth runs). They are deliberately plain and readable,
written once over NumPy *or* CuPy: the array module is picked from the input,
and CuPy is imported only when a CuPy array arrives.

The fp16 / bf16 casts here are also the reference of the collectives'
``compression="fp16"|"bf16"`` wire: CuPy arrays use them directly, host arrays
use the fused Numba kernels ``codec.cpu.cast_*``, which are tested against
them (and NumPy's ``astype``) bit for bit in tests/test_cast_wire.py.

Methods (bits per element include the per-block scales):

==========  ==================================================  =====================
name        what                                                bits / element
==========  ==================================================  =====================
``fp16``    IEEE half cast, round to nearest even               16
``bf16``    bfloat16 cast, round to nearest even on the bits    16
``int8``    symmetric block absmax, codes -127..127             8 + scale_bits / block
``int4``    symmetric block absmax, codes -7..7, 2 per byte     4 + scale_bits / block
==========  ==================================================  =====================

Block absmax (the ZeRO++ qgZ / Bagua style), for each block of ``block``
consecutive elements (the tail block is zero-padded; padding cannot change a
block's absmax):

1. ``scale = absmax / qmax`` with ``qmax = 127`` (int8) or ``7`` (int4), stored
   as float32 by default (``scale_dtype="float32"``, 32 bits per block) or as
   float16 (``scale_dtype="float16"``, 16 bits per block; see below).
2. ``code = clip(rint(x / scale), -qmax, qmax)`` (round to nearest, ties to
   even); an all-zero block has scale 0 and codes 0 and decodes exactly to 0.
3. Decode: ``x^ = code * scale`` in float32. Hence
   ``|x - x^| <= scale / 2 = absmax / (2 * qmax)`` up to float32 rounding.
   (Blocks so tiny that ``absmax / qmax`` is a float32 subnormal, absmax
   below ~1e-36, lose relative precision; the absolute error stays below
   ``absmax / (2 * qmax) + qmax * 2^-149``.)

int4 codes are 4-bit two's complement, packed two per byte: element ``2k`` in
the low nibble of byte ``k``, element ``2k + 1`` in the high nibble (the same
nibble order as the Squinch wire format).

float16 scales are rounded *up* to the next float16, so ``|x| / scale <= qmax``
still holds and nothing clips; the bound becomes ``scale16 / 2``, at most
``absmax / (2 * qmax) * (1 + 2^-10)`` while ``absmax / qmax`` is a normal
float16 (>= 6.1e-5). Below that the scale is a float16 subnormal and loses
relative precision (the error is still ``<= scale16 / 2``, but
``scale16 - absmax/qmax`` can reach 6e-8); above 65504 the scale saturates at
65504 and large values clip. Gradients are often tiny, which is why float32 is
the default.

Non-finite input (documented behaviour, tested):

- ``fp16``: element-wise IEEE cast: NaN stays NaN, +-Inf stays +-Inf, finite
  values of magnitude >= 65520 overflow to +-Inf.
- ``bf16``: NaN keeps its sign and top 7 payload bits and is made quiet,
  ``(bits >> 16) | 0x0040`` (so the common NaN ``0x7FC00000`` gives
  ``0x7FC0``), as the x86 ``vcvtneps2bf16`` instruction and the Squinch
  decoders (``codec.oracle``, ``codec.cpu``, ``native/squinch.cuh``) do;
  PyTorch writes ``0x7FC0`` (scalar) or ``0xFFFF`` (vectorised), also NaNs.
  +-Inf stays +-Inf, finite values that round past the bfloat16 maximum
  become +-Inf (IEEE round to nearest even). Every non-NaN input gives the
  same bits as ``torch.Tensor.to(torch.bfloat16)``.
- ``int8`` / ``int4``: a block holding any NaN or +-Inf gets a NaN scale and
  zero codes, so the whole block decodes to NaN (the same policy as Squinch's
  ``q_max = 255`` blocks); other blocks are unaffected.

Inputs of any real dtype are first converted to float32 and flattened
(so float64 input is rounded twice on the way to fp16/bf16).

Example:
    >>> import numpy as np
    >>> from squinchcomm.codec import baselines
    >>> x = np.linspace(-1, 1, 1000, dtype=np.float32)
    >>> p = baselines.encode_int8(x, block=128)
    >>> p.nbytes, baselines.payload_nbytes("int8", x.size, block=128)
    (1056, 1056)
    >>> err = np.abs(baselines.decode_int8(p) - x).max()
    >>> bool(err <= 1 / 254 + 1e-7)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

__all__ = [
    "BlockQuantized",
    "Baseline",
    "BASELINES",
    "DEFAULT_BLOCK",
    "encode_fp16",
    "decode_fp16",
    "encode_bf16",
    "decode_bf16",
    "encode_int8",
    "decode_int8",
    "encode_int4",
    "decode_int4",
    "bits_per_element",
    "payload_nbytes",
    "roundtrip",
]

DEFAULT_BLOCK = 128  # elements per block for int8 / int4 when none is given
_QMAX = {8: 127, 4: 7}  # symmetric code range per bit width
_BF16_QUIET = 0x0040  # the quiet bit of a bfloat16 NaN
_FP16_MAX = 65504.0
_SCALE_DTYPES = {"float32": 32, "fp32": 32, "float16": 16, "fp16": 16}


# ----------------------------------------------------------------------------
# Array-module plumbing and argument checks.
# ----------------------------------------------------------------------------
def _xp(x: Any):
    """Return the array module of ``x``: CuPy for CuPy arrays, else NumPy.

    CuPy is imported only here and only for CuPy input, so importing this
    module never needs CuPy (or a GPU).
    """
    if type(x).__module__.startswith("cupy"):
        import cupy  # lazy: only CuPy callers pay for it

        return cupy
    return np


def _as_f32(x: Any):
    """Return ``(xp, x)`` with ``x`` as a flat contiguous float32 array."""
    xp = _xp(x)
    arr = xp.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise ValueError(
            f"baselines encode real numbers; got dtype {arr.dtype}. Pass a float "
            "array (e.g. x.real or x.astype(np.float32)).")
    # reshape(-1) of a non-contiguous array copies, so the result is contiguous
    # and may be viewed as uint32 below.
    return xp, xp.ascontiguousarray(arr.astype(xp.float32, copy=False).reshape(-1))


def _check_block(block: Any) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(
            f"block must be a positive int (elements per scale), got {block!r}; "
            f"use e.g. block=32 or block={DEFAULT_BLOCK}.")
    return int(block)


def _check_scale_dtype(scale_dtype: Any) -> str:
    """Normalise ``scale_dtype`` (a name or a NumPy dtype) to ``"float32"`` or ``"float16"``."""
    name = scale_dtype
    if not isinstance(name, str):
        try:
            name = np.dtype(scale_dtype).name
        except TypeError:
            name = None
    if name not in _SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype must be 'float32' or 'float16', got {scale_dtype!r}; use "
            "scale_dtype='float32' (default, exact) or 'float16' (half the scale bytes).")
    return "float32" if _SCALE_DTYPES[name] == 32 else "float16"


# ----------------------------------------------------------------------------
# fp16 and bf16 casts.
# ----------------------------------------------------------------------------
def encode_fp16(x: Any):
    """Cast ``x`` to IEEE float16 (round to nearest even).

    Args:
        x: NumPy or CuPy array (any real dtype, any shape; flattened).

    Returns:
        A flat float16 array of ``x.size`` elements (2 bytes per element).

    Example:
        >>> encode_fp16(np.array([1.0, 1e-8, 7e4], np.float32))
        array([ 1.,  0., inf], dtype=float16)
    """
    xp, x = _as_f32(x)
    with np.errstate(over="ignore"):  # overflow to +-Inf is the documented cast
        return x.astype(xp.float16)


def decode_fp16(payload: Any):
    """Widen a float16 payload to float32 (exact).

    Args:
        payload: the array returned by :func:`encode_fp16`.

    Returns:
        A flat float32 array.

    Example:
        >>> decode_fp16(encode_fp16(np.array([0.1], np.float32)))
        array([0.09997559], dtype=float32)
    """
    xp = _xp(payload)
    if payload.dtype != xp.float16:
        raise ValueError(f"decode_fp16 expects the float16 array from encode_fp16, "
                         f"got dtype {payload.dtype}.")
    return payload.reshape(-1).astype(xp.float32)


def encode_bf16(x: Any):
    """Round ``x`` to bfloat16 (nearest, ties to even) and return the bit patterns.

    The top 16 bits of a float32 are a bfloat16; rounding adds ``0x7FFF`` plus
    the lowest kept bit, so exact halves go to the even neighbour. A carry out
    of the mantissa bumps the exponent, which is the correct next binade (and
    Inf past the maximum). NaN is special-cased: truncating a NaN whose
    payload sits in the low 16 bits would give Inf, so the quiet bit is set.

    Args:
        x: NumPy or CuPy array (any real dtype, any shape; flattened).

    Returns:
        A flat uint16 array of bfloat16 bit patterns (2 bytes per element).

    Example:
        >>> encode_bf16(np.array([1.0, 1.00390625, -2.0], np.float32))
        array([16256, 16256, 49152], dtype=uint16)
    """
    xp, x = _as_f32(x)
    u = x.view(xp.uint32)  # (n,)
    # Step 1: round to nearest even on the bit pattern (no overflow: the
    # largest non-NaN pattern 0xFF800000 + 0x8000 fits in 32 bits).
    lsb = (u >> xp.uint32(16)) & xp.uint32(1)
    rounded = (u + (xp.uint32(0x7FFF) + lsb)) >> xp.uint32(16)
    # Step 2: a NaN keeps its sign and top payload bits, made quiet.
    rounded = xp.where(xp.isnan(x), (u >> xp.uint32(16)) | xp.uint32(_BF16_QUIET), rounded)
    return rounded.astype(xp.uint16)


def decode_bf16(payload: Any):
    """Widen bfloat16 bit patterns (uint16) to float32 (exact).

    Args:
        payload: the uint16 array returned by :func:`encode_bf16`.

    Returns:
        A flat float32 array.

    Example:
        >>> decode_bf16(np.array([16256, 49152], np.uint16))
        array([ 1., -2.], dtype=float32)
    """
    xp = _xp(payload)
    if payload.dtype != xp.uint16:
        raise ValueError(f"decode_bf16 expects the uint16 array from encode_bf16, "
                         f"got dtype {payload.dtype}.")
    return (payload.reshape(-1).astype(xp.uint32) << xp.uint32(16)).view(xp.float32)


# ----------------------------------------------------------------------------
# int8 / int4 block absmax.
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockQuantized:
    """The payload of a block-absmax codec.

    Attributes:
        codes: int8 codes, shape (nblocks * block,), for ``bits == 8``; for
            ``bits == 4`` uint8 bytes, shape (ceil(nblocks * block / 2),), two
            4-bit two's-complement codes per byte (element 2k in the low nibble).
        scales: per-block scales, shape (nblocks,), float32 or float16; NaN
            marks a block that held NaN or Inf.
        n: the number of real elements (the rest of the last block is padding).
        block: elements per block.
        bits: 8 or 4.
    """

    codes: Any
    scales: Any
    n: int
    block: int
    bits: int

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: codes plus scales."""
        return int(self.codes.nbytes) + int(self.scales.nbytes)


def _round_up_fp16(s, absmax, xp):
    """Round non-negative float32 ``s = absmax / qmax`` up to float16, saturating at 65504.

    Rounding up keeps ``|x| / scale <= qmax``, so no code needs clipping. On
    a non-negative float16 the next larger value is the bit pattern + 1.
    ``absmax`` catches blocks whose float32 ``s`` underflowed to 0: they get
    the smallest float16 subnormal, so only all-zero blocks have scale 0.
    """
    with np.errstate(over="ignore"):  # s > 65504 -> Inf, saturated below
        h = s.astype(xp.float16)
    low = (h.astype(xp.float32) < s) | ((h == 0) & (absmax > 0))  # rounded down
    h = xp.where(low, (h.view(xp.uint16) + xp.uint16(1)).view(xp.float16), h)
    return xp.minimum(h, xp.float16(_FP16_MAX))  # Inf (s > 65504) saturates


def _encode_blocks(x: Any, bits: int, block: Any, scale_dtype: Any) -> BlockQuantized:
    """Block-absmax quantize ``x``; the shared body of int8 and int4."""
    block = _check_block(block)
    scale_dtype = _check_scale_dtype(scale_dtype)
    xp, x = _as_f32(x)
    qmax = _QMAX[bits]
    n = x.size
    nb = -(-n // block)
    # Step 1: zero-pad to whole blocks; padding never raises a block's absmax.
    v = xp.zeros(nb * block, dtype=xp.float32)
    v[:n] = x
    v = v.reshape(nb, block)  # (nb, block)
    # Step 2: non-finite blocks are quantized as zeros and flagged below.
    finite = xp.isfinite(v).all(axis=1)  # (nb,)
    v = xp.where(finite[:, None], v, xp.float32(0))
    # Step 3: the scale, absmax / qmax, as stored (float32 or rounded-up float16).
    absmax = xp.abs(v).max(axis=1)  # (nb,)
    scale = absmax / xp.float32(qmax)  # (nb,) float32
    if scale_dtype == "float16":
        scale = _round_up_fp16(scale, absmax, xp)
    s32 = scale.astype(xp.float32)
    # Step 4: codes = nearest integer of x / scale; zero blocks divide by 1
    # (their values are all 0) so they stay exact instead of 0/0 = NaN.
    safe = xp.where(s32 > 0, s32, xp.float32(1))
    codes = xp.clip(xp.rint(v / safe[:, None]), -qmax, qmax).astype(xp.int8)  # (nb, block)
    # Step 5: NaN scales mark the non-finite blocks; every code there is 0,
    # so decoding gives 0 * NaN = NaN for the whole block.
    scale = xp.where(finite, scale, xp.asarray(np.nan, dtype=scale.dtype))
    codes = codes.reshape(-1)
    if bits == 4:
        codes = _pack_int4(codes, xp)
    return BlockQuantized(codes=codes, scales=scale, n=n, block=block, bits=bits)


def _pack_int4(codes, xp):
    """Pack int8 codes in -8..7 into bytes, two per byte (element 2k low nibble)."""
    nib = codes.astype(xp.uint8) & xp.uint8(0x0F)  # two's complement nibble
    if nib.size % 2:  # an odd total (odd block size): pad one zero nibble
        nib = xp.concatenate([nib, xp.zeros(1, dtype=xp.uint8)])
    return nib[0::2] | (nib[1::2] << xp.uint8(4))


def _unpack_int4(packed, count: int, xp):
    """Inverse of :func:`_pack_int4`: the first ``count`` int8 codes."""
    nib = xp.empty(packed.size * 2, dtype=xp.uint8)
    nib[0::2] = packed & xp.uint8(0x0F)
    nib[1::2] = packed >> xp.uint8(4)
    # Sign-extend 4 bits: flipping bit 3 maps -8..7 to 0..15, then subtract 8.
    return ((nib[:count] ^ xp.uint8(8)).astype(xp.int8) - xp.int8(8)).astype(xp.int8)


def _decode_blocks(payload: BlockQuantized, bits: int, who: str):
    """Decode a :class:`BlockQuantized` of the given width to float32 (n,)."""
    if not isinstance(payload, BlockQuantized):
        raise ValueError(f"{who} expects the BlockQuantized payload of encode_int{bits}, "
                         f"got {type(payload).__name__}.")
    if payload.bits != bits:
        raise ValueError(f"{who} got an int{payload.bits} payload; decode it with "
                         f"decode_int{payload.bits}.")
    xp = _xp(payload.codes)
    nb = payload.scales.size
    count = nb * payload.block
    codes = payload.codes if bits == 8 else _unpack_int4(payload.codes, count, xp)
    s32 = payload.scales.astype(xp.float32)
    out = codes.reshape(nb, payload.block).astype(xp.float32) * s32[:, None]  # (nb, block)
    return out.reshape(-1)[:payload.n]


def encode_int8(x: Any, block: int = DEFAULT_BLOCK, scale_dtype: Any = "float32") -> BlockQuantized:
    """Quantize ``x`` to int8 codes with one absmax scale per ``block`` elements.

    Args:
        x: NumPy or CuPy array (any real dtype, any shape; flattened).
        block: elements per scale (the tail block is zero-padded).
        scale_dtype: ``"float32"`` (default, 32 bits per block) or
            ``"float16"`` (16 bits, rounded up; see the module docstring).

    Returns:
        A :class:`BlockQuantized` with int8 codes in -127..127 and the scales.

    Example:
        >>> p = encode_int8(np.array([1.0, -0.5, 0.25], np.float32), block=4)
        >>> p.codes, p.scales
        (array([127, -64,  32,   0], dtype=int8), array([0.00787402], dtype=float32))
    """
    return _encode_blocks(x, 8, block, scale_dtype)


def decode_int8(payload: BlockQuantized):
    """Decode an :func:`encode_int8` payload: ``code * scale`` in float32.

    Args:
        payload: the :class:`BlockQuantized` returned by :func:`encode_int8`.

    Returns:
        A flat float32 array of ``payload.n`` elements.

    Example:
        >>> decode_int8(encode_int8(np.array([1.0, -0.5], np.float32), block=2))
        array([ 1.      , -0.503937], dtype=float32)
    """
    return _decode_blocks(payload, 8, "decode_int8")


def encode_int4(x: Any, block: int = DEFAULT_BLOCK, scale_dtype: Any = "float32") -> BlockQuantized:
    """Quantize ``x`` to 4-bit codes in -7..7, two per byte, one scale per block.

    Args:
        x: NumPy or CuPy array (any real dtype, any shape; flattened).
        block: elements per scale (the tail block is zero-padded).
        scale_dtype: ``"float32"`` (default) or ``"float16"``.

    Returns:
        A :class:`BlockQuantized` whose ``codes`` are packed uint8 bytes.

    Example:
        >>> p = encode_int4(np.array([1.0, -1.0, 0.3, 0.0], np.float32), block=4)
        >>> p.codes  # codes 7 | -7 (nibble 0x9) << 4, then rint(2.1) = 2 | 0 << 4
        array([151,   2], dtype=uint8)
    """
    return _encode_blocks(x, 4, block, scale_dtype)


def decode_int4(payload: BlockQuantized):
    """Decode an :func:`encode_int4` payload: unpack the nibbles, ``code * scale``.

    Args:
        payload: the :class:`BlockQuantized` returned by :func:`encode_int4`.

    Returns:
        A flat float32 array of ``payload.n`` elements.

    Example:
        >>> decode_int4(encode_int4(np.array([0.7, -0.1], np.float32), block=2))
        array([ 0.7, -0.1], dtype=float32)
    """
    return _decode_blocks(payload, 4, "decode_int4")


# ----------------------------------------------------------------------------
# Registry and generic helpers, for benchmarks that loop over methods.
# ----------------------------------------------------------------------------
class Baseline(NamedTuple):
    """One comparison codec: ``decode(encode(x, **opts))`` round-trips ``x``.

    Attributes:
        name: registry key.
        encode: ``encode(x, **opts) -> payload``.
        decode: ``decode(payload) -> float32`` (flat).
        blockwise: whether ``block`` / ``scale_dtype`` options apply.
        code_bits: bits per element of the codes (scales excluded).
        summary: one line for tables and ``--help``.
    """

    name: str
    encode: Callable[..., Any]
    decode: Callable[[Any], Any]
    blockwise: bool
    code_bits: int
    summary: str


BASELINES: dict[str, Baseline] = {
    "fp16": Baseline("fp16", encode_fp16, decode_fp16, False, 16,
                     "IEEE float16 cast, round to nearest even"),
    "bf16": Baseline("bf16", encode_bf16, decode_bf16, False, 16,
                     "bfloat16 cast, round to nearest even"),
    "int8": Baseline("int8", encode_int8, decode_int8, True, 8,
                     "int8 block absmax (symmetric, -127..127)"),
    "int4": Baseline("int4", encode_int4, decode_int4, True, 4,
                     "int4 block absmax (symmetric, -7..7, 2 per byte)"),
}


def _lookup(method: Any) -> Baseline:
    if method not in BASELINES:
        raise ValueError(f"unknown baseline method {method!r}; choose one of "
                         f"{sorted(BASELINES)}.")
    return BASELINES[method]


def bits_per_element(method: str, block: int = DEFAULT_BLOCK,
                     scale_dtype: Any = "float32") -> float:
    """Return the asymptotic wire bits per element of ``method``, scales included.

    ``block`` and ``scale_dtype`` are validated for every method (so a loop
    can pass them uniformly) but only change the block-absmax methods. The
    tail padding of a finite tensor is not counted; see :func:`payload_nbytes`.

    Args:
        method: a key of :data:`BASELINES`.
        block: elements per scale (int8 / int4).
        scale_dtype: ``"float32"`` or ``"float16"`` (int8 / int4).

    Returns:
        Bits per element as a float.

    Example:
        >>> bits_per_element("int8", block=32)
        9.0
        >>> bits_per_element("int4", block=128, scale_dtype="float16")
        4.125
    """
    spec = _lookup(method)
    block = _check_block(block)
    scale_bits = _SCALE_DTYPES[_check_scale_dtype(scale_dtype)]
    if not spec.blockwise:
        return float(spec.code_bits)
    return spec.code_bits + scale_bits / block


def payload_nbytes(method: str, n: int, block: int = DEFAULT_BLOCK,
                   scale_dtype: Any = "float32") -> int:
    """Return the exact payload size in bytes for ``n`` elements.

    Args:
        method: a key of :data:`BASELINES`.
        n: number of elements (>= 0).
        block, scale_dtype: as in :func:`bits_per_element`.

    Returns:
        Bytes of codes plus scales (int8/int4 include the tail block's padding).

    Example:
        >>> payload_nbytes("int4", 1000, block=128)
        544
    """
    spec = _lookup(method)
    block = _check_block(block)
    scale_bits = _SCALE_DTYPES[_check_scale_dtype(scale_dtype)]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int (element count), got {n!r}.")
    if not spec.blockwise:
        return 2 * int(n)
    nb = -(-int(n) // block)
    code_bytes = math.ceil(nb * block * spec.code_bits / 8)
    return code_bytes + nb * scale_bits // 8


def roundtrip(x: Any, method: str, **opts: Any):
    """Encode and decode ``x`` with ``method``; return float32 of ``x``'s shape.

    Args:
        x: NumPy or CuPy array.
        method: a key of :data:`BASELINES`.
        **opts: ``block`` and ``scale_dtype``, validated for every method and
            used by int8 / int4 (ignored by the casts, so loops can pass them).

    Returns:
        The decoded float32 array, same shape as ``x``, same array module.

    Example:
        >>> roundtrip(np.array([[0.1, 0.2]], np.float32), "bf16")
        array([[0.10009766, 0.20019531]], dtype=float32)
    """
    spec = _lookup(method)
    unknown = set(opts) - {"block", "scale_dtype"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for roundtrip; "
                         "the options are block=... and scale_dtype=....")
    block = _check_block(opts.get("block", DEFAULT_BLOCK))
    scale_dtype = _check_scale_dtype(opts.get("scale_dtype", "float32"))
    shape = _xp(x).asarray(x).shape
    if spec.blockwise:
        payload = spec.encode(x, block=block, scale_dtype=scale_dtype)
    else:
        payload = spec.encode(x)
    return spec.decode(payload).reshape(shape)
