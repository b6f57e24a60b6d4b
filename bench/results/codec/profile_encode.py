"""Where the CPU encode's time goes: each step of codec/cpu.py's
``_encode_chunk`` on its own, on one chunk held in cache, and the whole
chunk, in cycles per element at an assumed 3 GHz (one thread).

    NUMBA_NUM_THREADS=1 python bench/results/codec/profile_encode.py
"""
import time

import numpy as np
from numba import njit

from squinchcomm.codec import cpu as C

M = 8 * C._CHUNK  # elements of one chunk
REPS = 1024
_F32B, _B2F = C._f32_bits, C._bits_f32


@njit
def magnitudes(x, abits, neg, reps):  # Step 1
    for _ in range(reps):
        for i in range(x.size):
            abits[i] = _F32B(x[i]) & np.uint32(0x7FFFFFFF)
            neg[i] = x[i] < np.float32(0.0)


@njit
def block_scales(abits, qs, inv, reps):  # Step 2
    for _ in range(reps):
        for bb in range(qs.size):
            mbits = abits[8 * bb]
            for j in range(1, 8):
                mbits = max(mbits, abits[8 * bb + j])
            finite = mbits < C._INF_BITS
            q = C._block_q(mbits) if finite else 255
            s = C._INV[q] if finite else np.float32(0.0)
            qs[bb] = q
            for j in range(8):
                inv[8 * bb + j] = s


@njit
def nearest_codes(abits, inv, codes, reps):  # Step 3
    for _ in range(reps):
        for i in range(abits.size):
            r = _B2F(abits[i]) * inv[i]
            c = 0
            for t in range(15):
                c += r >= C._MID[t]
            codes[i] = c


@njit
def pack(qs, neg, codes, out, reps):  # Step 4
    neg8, codes8 = neg.view(np.uint64), codes.view(np.uint64)
    for _ in range(reps):
        for bb in range(qs.size):
            C._pack_block(qs[bb], neg8[bb], codes8[bb], out, 6 * bb)


@njit
def whole_chunk(x, out, reps):
    for _ in range(reps):
        C._encode_chunk(x, x.size, 0, out, out.view(np.float32)[:0], False, False, 0, 0)


def main():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(M) * np.exp(rng.uniform(-3, 3, M))).astype(np.float32)
    abits, neg = np.empty(M, np.uint32), np.empty(M, np.uint8)
    inv, codes = np.empty(M, np.float32), np.empty(M, np.uint8)
    qs, out = np.empty(M // 8, np.int32), np.empty(6 * M // 8, np.uint8)
    for f, args in ((magnitudes, (x, abits, neg)), (block_scales, (abits, qs, inv)),
                    (nearest_codes, (abits, inv, codes)), (pack, (qs, neg, codes, out)),
                    (whole_chunk, (x, out))):
        f(*args, 2)
        t0 = time.perf_counter()
        f(*args, REPS)
        dt = time.perf_counter() - t0
        print(f"{f.__name__:>14}: {dt / REPS / M * 3e9:.2f} cycles/elem at 3 GHz "
              f"({M * REPS / dt / 1e9:.2f} Gelem/s)")


if __name__ == "__main__":
    main()
