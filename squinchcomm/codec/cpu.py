"""Squinch on the CPU: parallel Numba kernels, bit-identical to the oracle.

Each kernel walks the tensor in chunks of blocks with ``prange`` (one task per
chunk, so threads stream through contiguous memory). The per-block logic is
written once (``_encode_block``) and shared by encode and the fused
decode-accumulate-encode. Decisions use the shared float32 tables of
:mod:`squinchcomm.codec.format` (frozen into the compiled code as constants);
``q_max`` and the code start from cheap estimates that are then corrected by
exact table comparisons, so the result never depends on the estimate.

The fp16/bf16 cast wire of the collectives (``compression="fp16"|"bf16"``)
has its kernels here too (``cast_*``): the same chunked, fused style, with the
float32 <-> float16/bfloat16 conversions done on the bits, since Numba has no
float16 on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

import numpy as np
from llvmlite import ir
import numba
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from squinchcomm.codec import format as fmt

__all__ = ["encode", "decode", "decode_accumulate", "reduce_encode", "set_threads",
           "warm_up", "cast_encode", "cast_decode", "cast_decode_accumulate", "cast_reduce_encode"]

_CHUNK = 2048  # blocks per parallel task (12 KiB of payload, 64 KiB of fp32)

# Numba picks the OpenMP layer when it can; its workers spin after every
# parallel region, taking cores from the other ranks of a node (and from
# torch's own threads). The workqueue layer's workers sleep. A layer the user
# chose (NUMBA_THREADING_LAYER) wins. Must be set before the first launch.
if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = "workqueue"
_SCALE = fmt.SCALE
_INV = fmt.INV_SCALE
_T = fmt.THRESHOLD
_F = fmt.LEVEL_FRACTION
_MID = fmt.MIDPOINT
_STEP = fmt.LEVEL_STEP
_NAN = np.uint32(fmt.CANONICAL_NAN_BITS)
_U24 = np.float32(2.0 ** -24)
_LOG2_TO_Q = np.float32(6.0 * math.log(2.0))  # q = 129 + 6 ln2 * log2(m)
_M32 = np.uint64(0xFFFFFFFF)
_T_BITS = fmt.THRESHOLD.view(np.uint32)  # for m >= 0, m >= T[q] <=> bits(m) >= bits(T[q])
_INF_BITS = 0x7F800000
_Q_BIAS = np.float64(129.0 - 6.0 * math.log(2.0) * 127.0)
_Q_SLOPE = np.float64(6.0 * math.log(2.0) / 2.0 ** 23)


# ---------------------------------------------------------------- bit casts
@intrinsic
def _f32_bits(typingctx, v):
    """Reinterpret a float32 as uint32."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, v):
    """Reinterpret the low 32 bits of an integer as float32 (Numba widens
    uint32 arithmetic to 64 bits, so accept any integer width)."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        low = args[0]
        if v.bitwidth > 32:
            low = builder.trunc(low, ir.IntType(32))
        elif v.bitwidth < 32:
            low = builder.zext(low, ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(v), codegen


# ---------------------------------------------------------------- loads / stores
@njit(inline="always")
def _load_bf16(x, i):
    return _bits_f32(np.uint32(x[i]) << np.uint32(16))


@njit(inline="always")
def _load_f16(x, i):
    """IEEE half (as uint16 bits) to float32, exactly."""
    h = np.uint32(x[i])
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if e == 0x1F:  # Inf / NaN
        return _bits_f32(sign | np.uint32(0x7F800000) | (mant << np.uint32(13)))
    if e == 0:  # zero / subnormal: mant * 2^-24 is exact in float32
        mag = np.float32(mant) * np.float32(2.0 ** -24)
        return _bits_f32(_f32_bits(mag) | sign)
    return _bits_f32(sign | ((e + np.uint32(112)) << np.uint32(23))
                     | (mant << np.uint32(13)))


_KIND_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


@njit(inline="always")
def _fill(val, x, base, count, kind):
    """val[:count] = x[base:base+count] as float32. ``kind`` (0 f32, 1 f16 bits,
    2 bf16 bits) is an int, not a function argument: cached kernels must not
    take functions (Numba's cache index then pickles dispatcher types, which
    fails across processes). One loop per kind keeps each loop vectorizable."""
    if kind == 1:
        for i in range(count):
            val[i] = _load_f16(x, base + i)
    elif kind == 2:
        for i in range(count):
            val[i] = _load_bf16(x, base + i)
    else:
        for i in range(count):
            val[i] = np.float32(x[base + i])


@njit(inline="always")
def _store_bf16(out, i, bits):
    """float32 bits to bfloat16 bits, round to nearest even; NaN -> 0x7FC0|sign."""
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        out[i] = np.uint16((bits >> np.uint32(16)) | np.uint32(0x0040))
    else:
        lsb = (bits >> np.uint32(16)) & np.uint32(1)
        out[i] = np.uint16((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16))


@njit(inline="always")
def _f16_bits(bits):
    """float32 bits to IEEE half bits, as NumPy's ``astype(np.float16)``: round
    to nearest even, subnormals, overflow to Inf; NaN keeps its sign and top 10
    payload bits (a quiet NaN stays quiet), or payload 1 when those are all 0
    (NumPy's ``npy_floatbits_to_halfbits``). Selects, not branches, so loops
    over it vectorize."""
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    a = bits & np.uint32(0x7FFFFFFF)
    # Normal half range: rebias the exponent (127 -> 15) and round the 13
    # dropped bits to nearest even; a carry out of the mantissa is the next
    # binade, and past 65504 it reaches 0x7C00 (Inf), where it is held.
    odd = (a >> np.uint32(13)) & np.uint32(1)
    normal = min((a - np.uint32(0x38000000) + np.uint32(0xFFF) + odd) >> np.uint32(13),
                 np.uint32(0x7C00))
    # Below 2^-14 (half subnormals): in 0.5 + |x| the float32 ulp is 2^-24, the
    # half subnormal step, so the FPU's own nearest-even rounding of the sum
    # leaves |x| / 2^-24, rounded, in the low bits (1024 = the smallest normal).
    sub = _f32_bits(_bits_f32(a) + np.float32(0.5)) - np.uint32(0x3F000000)
    nan = np.uint32(0x7C00) | max((a >> np.uint32(13)) & np.uint32(0x3FF), np.uint32(1))
    h = sub if a < np.uint32(0x38800000) else normal
    h = nan if a > np.uint32(0x7F800000) else h
    return np.uint16(h | sign)


# ---------------------------------------------------------------- format core
@njit(inline="always")
def _mix32(x):
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


@njit(inline="always")
def _uniform(key, index):
    """u * 2^-24 for the 24-bit hash of (key, global element index)."""
    i = np.uint64(index)
    h = _mix32((i & _M32) ^ _mix32((i >> np.uint64(32)) ^ np.uint64(key)))
    return np.float32(h >> np.uint64(8)) * _U24


@njit(inline="always")
def _block_q(mbits):
    """Largest q in 0..254 with m >= T[q], for the bits of a finite m >= 0."""
    # The float's bits are a piecewise-linear log2 (under by < 0.087): estimate,
    # then correct with exact integer comparisons against the table's bits.
    q = min(max(int(_Q_BIAS + _Q_SLOPE * mbits), 0), 254)
    if q < 254 and mbits >= _T_BITS[q + 1]:
        q += 1
    if q > 0 and mbits < _T_BITS[q]:
        q -= 1
    return q


@njit(inline="always")
def _pack_block(q, neg8, codes8, out, o):
    """Write one block from 8 sign bytes and 8 code bytes, each read as a uint64."""
    # Gather bit 0 of each byte into one byte (byte j -> bit j): the terms of the
    # product land on distinct bits, so there are no carries.
    signs = ((neg8 * np.uint64(0x0102040810204080)) >> np.uint64(56)) & np.uint64(0xFF)
    # Codes c_j in byte j -> nibble j of a 32-bit word.
    t = (codes8 | (codes8 >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    t = (t | (t >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    word = (t | (t >> np.uint64(16))) & np.uint64(0xFFFFFFFF)
    out[o] = q
    out[o + 1] = signs
    out[o + 2] = word & np.uint64(0xFF)
    out[o + 3] = (word >> np.uint64(8)) & np.uint64(0xFF)
    out[o + 4] = (word >> np.uint64(16)) & np.uint64(0xFF)
    out[o + 5] = word >> np.uint64(24)


@njit(inline="always")
def _encode_chunk(val, nvalid, b0, out, res, has_res, stochastic, key, offset):
    """Encode the values ``val[:nvalid]`` (zero-padded to whole blocks) of the
    blocks starting at global block ``b0``; the work is split into flat loops
    that vectorize and short per-block loops."""
    nb = (nvalid + 7) // 8
    ne = 8 * nb
    abits = np.empty(ne, np.uint32)  # |value| as bits
    neg = np.empty(ne, np.uint8)  # 1 where value < 0 (not for -0.0)
    inv = np.empty(ne, np.float32)  # 1/A(q) of each element's block (0: non-finite)
    codes = np.empty(ne, np.uint8)
    qs = np.empty(nb, np.int32)
    # Step 1: magnitude bits and signs (vectorized).
    for i in range(ne):
        abits[i] = _f32_bits(val[i]) & np.uint32(0x7FFFFFFF)
        neg[i] = val[i] < np.float32(0.0)
    # Step 2: per block, the maximum and q_max; a maximum >= Inf's bits means
    # the block holds NaN or Inf.
    for bb in range(nb):
        mbits = abits[8 * bb]
        for j in range(1, 8):
            mbits = max(mbits, abits[8 * bb + j])
        finite = mbits < _INF_BITS
        q = _block_q(mbits) if finite else 255
        s = _INV[q] if finite else np.float32(0.0)
        qs[bb] = q
        for j in range(8):
            inv[8 * bb + j] = s
    # Step 3: codes (vectorized); r = |x| / A(q) as one float32 product.
    if stochastic:
        for i in range(ne):
            r = _bits_f32(abits[i]) * inv[i]
            k = 0
            for t in range(1, 16):
                k += r >= _F[t]
            kk = min(k, 14)
            up = _uniform(key, offset + 8 * b0 + i) * _STEP[kk] < r - _F[kk]
            codes[i] = 15 if k == 15 else k + up
    else:
        for i in range(ne):
            r = _bits_f32(abits[i]) * inv[i]
            c = 0
            for t in range(15):
                c += r >= _MID[t]
            codes[i] = c
    # Step 4: pack; non-finite blocks are canonical (q = 255, zeros).
    neg8 = neg.view(np.uint64)
    codes8 = codes.view(np.uint64)
    for bb in range(nb):
        o = 6 * (b0 + bb)
        if qs[bb] == 255:
            out[o] = 255
            for t in range(1, 6):
                out[o + t] = 0
        else:
            _pack_block(qs[bb], neg8[bb], codes8[bb], out, o)
    # Step 5: error feedback, residual = value - decoded (non-finite blocks keep
    # theirs), in one flat loop: the level F[c] = c^2 / 225 computed, not
    # looked up (the float32 division gives the table's values exactly).
    if has_res:
        scale = np.empty(ne, np.float32)  # A(q) per element (NaN: a non-finite block)
        for bb in range(nb):
            a = _SCALE[qs[bb]] if qs[bb] != 255 else _bits_f32(_NAN)
            for j in range(8):
                scale[8 * bb + j] = a
        r = res[8 * b0:8 * b0 + nvalid]
        for i in range(nvalid):
            c = np.float32(codes[i])
            d = scale[i] * (c * c / np.float32(225.0))
            e = val[i] - (-d if neg[i] else d)
            r[i] = e if scale[i] == scale[i] else r[i]


@njit(inline="always")
def _decode_block_into(p, o, acc, i0, add):
    """Decode the block at p[o:o+6] into acc[i0:i0+8] (``acc +=`` when add)."""
    q = p[o]
    if q == 255:
        nan = _bits_f32(_NAN)
        for j in range(8):
            acc[i0 + j] = nan if not add else acc[i0 + j] + nan
        return
    scale = _SCALE[q]
    signs = np.uint32(p[o + 1])
    word = (np.uint32(p[o + 2]) | (np.uint32(p[o + 3]) << np.uint32(8))
            | (np.uint32(p[o + 4]) << np.uint32(16)) | (np.uint32(p[o + 5]) << np.uint32(24)))
    for j in range(8):
        mag = scale * _F[(word >> np.uint32(4 * j)) & np.uint32(15)]
        v = _bits_f32(_f32_bits(mag) | (((signs >> np.uint32(j)) & np.uint32(1)) << np.uint32(31)))
        acc[i0 + j] = v if not add else acc[i0 + j] + v


@njit(inline="always")
def _reduce_chunk(P, b0, nb, acc):
    """acc[:8nb] = sum over k, in order, of decode(P[k]) for blocks b0..b0+nb."""
    for i in range(8 * nb):
        acc[i] = np.float32(0.0)
    for k in range(P.shape[0]):
        row = P[k]
        for bb in range(nb):
            _decode_block_into(row, 6 * (b0 + bb), acc, 8 * bb, True)


# ---------------------------------------------------------------- kernels
@njit(parallel=True, cache=True, nogil=True)
def _encode_kernel(x, kind, n, out, res, has_res, stochastic, key, offset):
    nb = (n + 7) // 8
    for chunk in prange((nb + _CHUNK - 1) // _CHUNK):
        b0 = chunk * _CHUNK
        nvalid = min(n - 8 * b0, 8 * _CHUNK)
        val = np.empty(8 * _CHUNK, np.float32)
        base = 8 * b0
        for i in range(nvalid, 8 * ((nvalid + 7) // 8)):
            val[i] = np.float32(0.0)
        _fill(val, x, base, nvalid, kind)
        if has_res:
            for i in range(nvalid):
                val[i] += res[base + i]
        _encode_chunk(val, nvalid, b0, out, res, has_res, stochastic, key, offset)


@njit(parallel=True, cache=True, nogil=True)
def _decode_f32_kernel(p, n, out):
    nfull = n // 8  # whole blocks decode straight into out
    for chunk in prange((nfull + _CHUNK - 1) // _CHUNK):
        for b in range(chunk * _CHUNK, min(nfull, (chunk + 1) * _CHUNK)):
            _decode_block_into(p, 6 * b, out, 8 * b, False)
    if n % 8:
        tail = np.empty(8, np.float32)
        _decode_block_into(p, 6 * nfull, tail, 0, False)
        for j in range(n % 8):
            out[8 * nfull + j] = tail[j]


@njit(parallel=True, cache=True, nogil=True)
def _decode_bf16_kernel(p, n, out):
    nb = (n + 7) // 8
    for chunk in prange((nb + _CHUNK - 1) // _CHUNK):
        b0 = chunk * _CHUNK
        nbc = min(nb - b0, _CHUNK)
        tmp = np.empty(8 * nbc, np.float32)
        for bb in range(nbc):
            _decode_block_into(p, 6 * (b0 + bb), tmp, 8 * bb, False)
        base = 8 * b0
        for i in range(min(n - base, 8 * nbc)):
            _store_bf16(out, base + i, _f32_bits(tmp[i]))


@njit(parallel=True, cache=True, nogil=True)
def _decode_accumulate_kernel(P, n, out, scale):
    nb = (n + 7) // 8
    for chunk in prange((nb + _CHUNK - 1) // _CHUNK):
        b0 = chunk * _CHUNK
        nbc = min(nb - b0, _CHUNK)
        acc = np.empty(8 * nbc, np.float32)
        _reduce_chunk(P, b0, nbc, acc)
        base = 8 * b0
        for i in range(min(n - base, 8 * nbc)):
            v = out[base + i] + acc[i] * scale
            out[base + i] = v if v == v else _bits_f32(_NAN)  # NaN results are canonical


@njit(parallel=True, cache=True, nogil=True)
def _reduce_encode_kernel(P, n, out, res, has_res, scale, stochastic, key, offset):
    nb = (n + 7) // 8
    for chunk in prange((nb + _CHUNK - 1) // _CHUNK):
        b0 = chunk * _CHUNK
        nbc = min(nb - b0, _CHUNK)
        nvalid = min(n - 8 * b0, 8 * nbc)
        val = np.empty(8 * nbc, np.float32)
        _reduce_chunk(P, b0, nbc, val)
        base = 8 * b0
        for i in range(8 * nbc):
            if i >= nvalid:
                val[i] = np.float32(0.0)
            elif has_res:
                val[i] = val[i] * scale + res[base + i]
            else:
                val[i] = val[i] * scale
        _encode_chunk(val, nvalid, b0, out, res, has_res, stochastic, key, offset)


# ---------------------------------------------------------------- fp16 / bf16 cast wire
# Payloads are uint16 bits; ``wire`` and ``kind`` are _KIND_CODES (1 float16,
# 2 bfloat16; kind 0 is float32 data). Every element is independent, so each
# task converts one chunk through a chunk-sized float32 buffer: no temporaries
# of the tensor's size, and one flat loop per kind. The helpers take the
# chunk's slices and index them from 0: loops indexing ``base + i`` inside a
# prange did not vectorize (5x slower), presumably because Numba must allow
# for negative, wrap-around indices there.
_CAST_CHUNK = 1 << 14  # elements per parallel task (64 KiB of float32)


@njit(inline="always")
def _emit_bits(val, out, wire):
    """out[i] = the ``wire`` bits (1 f16, 2 bf16) of val[i], for all of ``out``."""
    if wire == 1:
        for i in range(out.size):
            out[i] = _f16_bits(_f32_bits(val[i]))
    else:
        for i in range(out.size):
            _store_bf16(out, i, _f32_bits(val[i]))


@njit(inline="always")
def _cast_finish(val, out, wire, res, has_res):
    """Round val to the wire bits ``out``; with error feedback, first add the
    residual, then keep what the rounding lost: res = val - wire value."""
    if has_res:
        for i in range(out.size):
            val[i] += res[i]
    _emit_bits(val, out, wire)
    if has_res:
        if wire == 1:
            for i in range(out.size):
                res[i] = val[i] - _load_f16(out, i)
        else:
            for i in range(out.size):
                res[i] = val[i] - _load_bf16(out, i)


@njit(inline="always")
def _cast_sum(P, wire, base, acc):
    """acc = ((0 + P[0]) + P[1]) + ... in float32, in row order, over the
    elements base..base+acc.size of the wire rows P (k, n)."""
    for i in range(acc.size):
        acc[i] = np.float32(0.0)
    for k in range(P.shape[0]):
        row = P[k, base:base + acc.size]
        if wire == 1:
            for i in range(acc.size):
                acc[i] += _load_f16(row, i)
        else:
            for i in range(acc.size):
                acc[i] += _load_bf16(row, i)


@njit(parallel=True, cache=True, nogil=True)
def _cast_encode_kernel(x, kind, wire, n, out, res, has_res):
    for chunk in prange((n + _CAST_CHUNK - 1) // _CAST_CHUNK):
        lo, hi = chunk * _CAST_CHUNK, min(n, (chunk + 1) * _CAST_CHUNK)
        val = np.empty(hi - lo, np.float32)
        _fill(val, x[lo:hi], 0, hi - lo, kind)
        _cast_finish(val, out[lo:hi], wire, res[lo:hi], has_res)


@njit(parallel=True, cache=True, nogil=True)
def _cast_decode_f32_kernel(p, wire, n, out):
    for chunk in prange((n + _CAST_CHUNK - 1) // _CAST_CHUNK):
        lo, hi = chunk * _CAST_CHUNK, min(n, (chunk + 1) * _CAST_CHUNK)
        _fill(out[lo:hi], p[lo:hi], 0, hi - lo, wire)


@njit(parallel=True, cache=True, nogil=True)
def _cast_decode_bits_kernel(p, wire, n, out, kind):
    for chunk in prange((n + _CAST_CHUNK - 1) // _CAST_CHUNK):
        lo, hi = chunk * _CAST_CHUNK, min(n, (chunk + 1) * _CAST_CHUNK)
        val = np.empty(hi - lo, np.float32)
        _fill(val, p[lo:hi], 0, hi - lo, wire)
        _emit_bits(val, out[lo:hi], kind)


@njit(parallel=True, cache=True, nogil=True)
def _cast_decode_accumulate_kernel(P, wire, n, out, scale):
    for chunk in prange((n + _CAST_CHUNK - 1) // _CAST_CHUNK):
        lo, hi = chunk * _CAST_CHUNK, min(n, (chunk + 1) * _CAST_CHUNK)
        acc = np.empty(hi - lo, np.float32)
        _cast_sum(P, wire, lo, acc)
        dst = out[lo:hi]
        for i in range(acc.size):
            dst[i] += acc[i] * scale


@njit(parallel=True, cache=True, nogil=True)
def _cast_reduce_encode_kernel(P, wire, n, out, scale, res, has_res):
    for chunk in prange((n + _CAST_CHUNK - 1) // _CAST_CHUNK):
        lo, hi = chunk * _CAST_CHUNK, min(n, (chunk + 1) * _CAST_CHUNK)
        val = np.empty(hi - lo, np.float32)
        _cast_sum(P, wire, lo, val)
        for i in range(val.size):
            val[i] *= scale
        _cast_finish(val, out[lo:hi], wire, res[lo:hi], has_res)


# ---------------------------------------------------------------- entry points
_THREADS = [None]  # codec threads per process; None = Numba's default (all cores)
# Numba's workqueue layer aborts the process ("Concurrent access has been
# detected") when two threads launch parallel kernels at once, and its
# alternatives spin (OpenMP) or are not installed (TBB). The engine's progress
# thread, DDP hooks on autograd threads and users' own threads all call the
# codec, so launches are serialized: one parallel kernel at a time per
# process, which already uses every codec thread. The kernels release the GIL
# (nogil), so other Python threads (torch compute) run meanwhile.
_LAUNCH = threading.Lock()


def _serialized(fn):
    """Run ``fn`` holding the launch lock, with this process's codec threads."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _LAUNCH:
            _threads()
            return fn(*args, **kwargs)

    return run


def set_threads(n: int | None):
    """Cap the threads the CPU kernels use in this process (None: Numba's default).

    Numba's setting is thread-local, so it is applied on every call from
    whatever thread calls the codec (DDP hooks may run off the main thread).
    """
    _THREADS[0] = None if n is None else max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))


def _threads():
    if _THREADS[0] is not None:
        numba.set_num_threads(_THREADS[0])


_EMPTY_RES = np.zeros(0, np.float32)


@_serialized
def encode(x, kind, out, stochastic, seed, offset, residual):
    """Encode the flat array ``x`` (float32, or uint16 bits when ``kind`` is
    float16/bfloat16) into the uint8 array ``out``."""
    has_res = residual is not None
    _encode_kernel(x, _KIND_CODES[kind], x.size, out, residual if has_res else _EMPTY_RES,
                   has_res, stochastic, fmt.stream_key(seed), np.uint64(offset))
    return out


@_serialized
def decode(payload, n, out, kind):
    """Decode into ``out`` (float32, or uint16 bits for bfloat16). float16 output
    goes through a float32 buffer and NumPy's round-to-nearest-even cast."""
    if kind == "float32":
        _decode_f32_kernel(payload, n, out)
    elif kind == "bfloat16":
        _decode_bf16_kernel(payload, n, out)
    else:
        tmp = np.empty(n, np.float32)
        _decode_f32_kernel(payload, n, tmp)
        with np.errstate(over="ignore"):  # levels above 65504 become inf, as documented
            out.view(np.float16)[:] = tmp
    return out


@_serialized
def decode_accumulate(payloads, n, out, scale):
    _decode_accumulate_kernel(payloads, n, out, np.float32(scale))
    return out


@_serialized
def reduce_encode(payloads, n, out, scale, stochastic, seed, offset, residual):
    has_res = residual is not None
    _reduce_encode_kernel(payloads, n, out, residual if has_res else _EMPTY_RES, has_res,
                          np.float32(scale), stochastic, fmt.stream_key(seed),
                          np.uint64(offset))
    return out


# ---------------------------------------------------------------- cast wire entry points
# Arrays are flat and contiguous; wire payloads and fp16/bf16 data are uint16
# bits; ``kind`` / ``wire`` are "float32", "float16" or "bfloat16" (see
# codec.cast.CastWire, whose NumPy/CuPy code is the reference for these).
@_serialized
def cast_encode(x, kind, wire, out, residual):
    """Round ``x`` (float32, or uint16 bits of ``kind``) to ``wire`` bits in ``out``.

    With ``residual`` (float32, ``x.size``): round ``x + residual`` instead and
    overwrite ``residual`` with ``(x + residual) - wire value``.
    """
    has_res = residual is not None
    _cast_encode_kernel(x, _KIND_CODES[kind], _KIND_CODES[wire], x.size, out,
                        residual if has_res else _EMPTY_RES, has_res)
    return out


@_serialized
def cast_decode(payload, out, kind, wire):
    """Widen ``wire`` bits to float32 ``out``, or convert them to ``kind`` bits."""
    if kind == "float32":
        _cast_decode_f32_kernel(payload, _KIND_CODES[wire], payload.size, out)
    else:
        _cast_decode_bits_kernel(payload, _KIND_CODES[wire], payload.size, out,
                                 _KIND_CODES[kind])
    return out


@_serialized
def cast_decode_accumulate(payloads, out, scale, wire):
    """``out += fl(sum_k payloads[k]) * scale`` in float32, rows summed in order from +0."""
    _cast_decode_accumulate_kernel(payloads, _KIND_CODES[wire], payloads.shape[1], out,
                                   np.float32(scale))
    return out


@_serialized
def cast_reduce_encode(payloads, out, scale, wire, residual):
    """Round ``fl(sum_k payloads[k]) * scale`` (the sum of :func:`cast_decode_accumulate`),
    plus ``residual`` when given (error feedback as in :func:`cast_encode`), to ``wire`` bits."""
    has_res = residual is not None
    _cast_reduce_encode_kernel(payloads, _KIND_CODES[wire], payloads.shape[1], out,
                               np.float32(scale), residual if has_res else _EMPTY_RES, has_res)
    return out


# ---------------------------------------------------------------- first use
@contextlib.contextmanager
def _machine_lock():
    """One compiling process per machine: the ranks of a node share Numba's
    on-disk cache, so the first one compiles into it and the others, waiting
    here, then load it instead of compiling the same kernels on the same
    cores at once."""
    import fcntl
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"squinchcomm-numba-{os.getuid()}.lock")
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def warm_up() -> float:
    """Compile (or load from Numba's on-disk cache) every CPU kernel now, on
    tiny inputs of each array type the collectives pass: the first real
    collective then pays no compilation. Returns the seconds it took."""
    import time

    t0 = time.perf_counter()
    with _machine_lock():
        _run_every_kernel()
    return time.perf_counter() - t0


def _run_every_kernel():
    n = 16
    payload = np.zeros(fmt.encoded_nbytes(n), np.uint8)
    res = np.zeros(n, np.float32)
    for x, kind in ((np.zeros(n, np.float32), "float32"), (np.zeros(n, np.uint16), "bfloat16")):
        encode(x, kind, payload, False, 0, 0, None)
        encode(x, kind, payload, True, 0, 0, res)
        cast_encode(x, kind, "bfloat16", np.zeros(n, np.uint16), res)
    decode(payload, n, np.zeros(n, np.float32), "float32")
    decode(payload, n, np.zeros(n, np.uint16), "bfloat16")
    rows = np.zeros((2, payload.size), np.uint8)
    decode_accumulate(rows, n, np.zeros(n, np.float32), 1.0)
    reduce_encode(rows, n, payload.copy(), 1.0, False, 0, 0, res)
    bits = np.zeros((2, n), np.uint16)
    cast_decode(bits[0], np.zeros(n, np.float32), "float32", "bfloat16")
    cast_decode(bits[0], np.zeros(n, np.uint16), "bfloat16", "float16")
    cast_decode_accumulate(bits, np.zeros(n, np.float32), 1.0, "bfloat16")
    cast_reduce_encode(bits, np.zeros(n, np.uint16), 1.0, "bfloat16", res)
