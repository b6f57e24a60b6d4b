"""What a residual costs the CPU codec: encode and reduce-encode (k=4) of 16 M
elements with and without error feedback (best of 5, ms).

    NUMBA_NUM_THREADS=2 python bench/results/ef_cost/codec_ef.py
"""
import time

import numpy as np

from squinchcomm.codec import cpu as C
from squinchcomm.codec import format as fmt


def best_ms(f, runs=5):
    f()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main():
    n = 1 << 24
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-3, 3, n))).astype(np.float32)
    out = np.empty(fmt.encoded_nbytes(n), np.uint8)
    res = np.zeros(n, np.float32)
    rows = np.stack([out] * 4)
    shard = np.empty_like(out)
    a = best_ms(lambda: C.encode(x, "float32", out, False, 0, 0, None))
    b = best_ms(lambda: C.encode(x, "float32", out, False, 0, 0, res))
    c = best_ms(lambda: C.reduce_encode(rows, n, shard, 0.25, False, 0, 0, None))
    d = best_ms(lambda: C.reduce_encode(rows, n, shard, 0.25, False, 0, 0, res))
    print(f"encode {a:.1f} ms, with residual {b:.1f} ms ({b / a - 1:+.0%}); "
          f"reduce_encode {c:.1f}, with residual {d:.1f} ({d / c - 1:+.0%})")


if __name__ == "__main__":
    main()
