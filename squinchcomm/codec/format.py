"""The Squinch wire format: constants, shared float32 tables and the rounding hash.

Every backend (NumPy oracle, Numba, CUDA) reads the tables built here, so the
decisions they make are comparisons and single IEEE operations on identical
float32 numbers: that is what makes their bytes identical. The tables are
computed with :mod:`decimal` (correctly rounded ``exp``) and rounded once to
float32, so they do not depend on the platform's libm either. FORMAT.md is the
prose version of this module.
"""

from __future__ import annotations

import decimal
import math

import numpy as np

__all__ = [
    "BLOCK",
    "BLOCK_BYTES",
    "Q_NONFINITE",
    "Q_MAX_FINITE",
    "LEVELS",
    "SCALE",
    "INV_SCALE",
    "THRESHOLD",
    "LEVEL_FRACTION",
    "MIDPOINT",
    "LEVEL_STEP",
    "CANONICAL_NAN_BITS",
    "encoded_nbytes",
    "num_blocks",
    "stream_key",
    "uniform24",
    "packed_tables",
]

BLOCK = 8  # elements per block
BLOCK_BYTES = 6  # bytes per block: q_max, signs, 4 bytes of nibbles
Q_NONFINITE = 255  # q_max of a block holding NaN or +-Inf
Q_MAX_FINITE = 254
LEVELS = 16  # 4-bit codes
CANONICAL_NAN_BITS = 0x7FC00000  # every backend writes this NaN


def num_blocks(n: int) -> int:
    """Return the number of 8-element blocks that hold ``n`` elements."""
    return (n + BLOCK - 1) // BLOCK


def encoded_nbytes(n: int) -> int:
    """Return the payload size in bytes for ``n`` elements: ``6 * ceil(n / 8)``.

    Example:
        >>> encoded_nbytes(1000)
        750
    """
    if n < 0:
        raise ValueError(f"element count must be >= 0, got {n}")
    return BLOCK_BYTES * num_blocks(n)


# ----------------------------------------------------------------------------
# Correctly rounded float32 tables.
# ----------------------------------------------------------------------------
_CTX = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN)


def _to_f32(d: decimal.Decimal) -> np.float32:
    """Round an exact decimal to the nearest float32 (ties to even), avoiding
    the double rounding that ``np.float32(float(d))`` could introduce."""
    guess = np.float32(float(d))
    best, best_err = guess, None
    for cand in (np.nextafter(guess, np.float32(-np.inf)), guess,
                 np.nextafter(guess, np.float32(np.inf))):
        err = abs(decimal.Decimal(float(cand)) - d)
        better = best_err is None or err < best_err
        tie_to_even = err == best_err and int(cand.view(np.uint32)) % 2 == 0
        if better or tie_to_even:
            best, best_err = cand, err
    return np.float32(best)


def _exp_sixths(k: int) -> np.float32:
    """float32 nearest to exp(k / 6)."""
    return _to_f32(_CTX.exp(_CTX.divide(decimal.Decimal(k), decimal.Decimal(6))))


def _build_tables():
    # SCALE[q] = A(q) = exp((q - 128) / 6) for q = 0..254; SCALE[255] = NaN.
    scale = np.array([_exp_sixths(q - 128) for q in range(255)] + [np.nan],
                     dtype=np.float32)
    # INV_SCALE[q] = 1 / A(q) = exp(-(q - 128) / 6), used to normalise |x|.
    inv_scale = np.array([_exp_sixths(128 - q) for q in range(255)] + [np.nan],
                         dtype=np.float32)
    # THRESHOLD[q] = T[q] = exp((q - 129) / 6) for q = 1..254, with T[0] = 0 and
    # T[255] = +inf, so q_max = the largest q in 0..254 with m >= T[q].
    threshold = np.array([0.0] + [_exp_sixths(q - 129) for q in range(1, 255)]
                         + [np.inf], dtype=np.float32)
    # LEVEL_FRACTION[c] = (c / 15)^2: the normalised magnitude of code c.
    frac = np.array([_to_f32(decimal.Decimal(c * c) / decimal.Decimal(225))
                     for c in range(LEVELS)], dtype=np.float32)
    # MIDPOINT[k] = (F[k] + F[k+1]) / 2 (k = 0..14), nearest-rounding boundaries;
    # LEVEL_STEP[k] = F[k+1] - F[k], stochastic-rounding interval widths.
    exact = [decimal.Decimal(float(f)) for f in frac]
    mid = np.array([_to_f32((exact[k] + exact[k + 1]) / 2) for k in range(15)]
                   + [np.inf], dtype=np.float32)
    step = np.array([_to_f32(exact[k + 1] - exact[k]) for k in range(15)] + [0.0],
                    dtype=np.float32)
    for t in (scale, inv_scale, threshold, frac, mid, step):
        t.setflags(write=False)
    return scale, inv_scale, threshold, frac, mid, step


SCALE, INV_SCALE, THRESHOLD, LEVEL_FRACTION, MIDPOINT, LEVEL_STEP = _build_tables()


def packed_tables() -> np.ndarray:
    """Return all tables in one float32 array, the layout the kernels read:
    ``SCALE[256] | INV_SCALE[256] | THRESHOLD[256] | F[16] | MIDPOINT[16] | STEP[16]``."""
    return np.concatenate([SCALE, INV_SCALE, THRESHOLD, LEVEL_FRACTION, MIDPOINT,
                           LEVEL_STEP]).astype(np.float32)


# ----------------------------------------------------------------------------
# Counter-based hash for stochastic rounding (FORMAT.md, "Stochastic rounding").
# ----------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(x):
    """The 'lowbias32' integer finaliser (C. Wellons), on uint32 values.

    Works on Python ints and on NumPy uint32/uint64 arrays alike.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_key(seed: int) -> int:
    """Return the 32-bit key of a 64-bit seed: mix32(lo ^ mix32(hi ^ 0x9E3779B9))."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return _mix32((seed & _M32) ^ _mix32((seed >> 32) ^ _GOLDEN))


def uniform24(key: int, index: np.ndarray) -> np.ndarray:
    """Return the 24-bit uniform integers of global element indices ``index``.

    ``h = mix32(lo32(i) ^ mix32(hi32(i) ^ key))``, ``u = h >> 8``; the element
    rounds up iff ``(u * 2^-24) * STEP[k] < r - F[k]`` (float32 operations).
    """
    i = np.asarray(index, dtype=np.uint64)
    hi = _mix32((i >> np.uint64(32)) ^ np.uint64(key))
    h = _mix32((i & np.uint64(_M32)) ^ hi)
    return (h >> np.uint64(8)).astype(np.uint32)


# Sanity of the construction, checked once at import (cheap, 256 entries).
assert np.all(THRESHOLD[1:255] == SCALE[0:254]), "T[q] must equal A(q-1)"
assert math.isclose(float(SCALE[128]), 1.0)
