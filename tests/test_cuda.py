"""The CUDA backend against the NumPy oracle, bit for bit, on a GPU.

Every test compares payload bytes, residual bits and decoded float bits with
:mod:`squinchcomm.codec.oracle` (float16/bfloat16 outputs with NumPy's
round-to-nearest-even cast and cpu._store_bf16's rule). They skip without a
usable GPU and fail instead when ``SQUINCHCOMM_TEST_GPU=1``. The test data
(boundary values, exact ties, special values) is shared with
tests/test_native_host.py, which runs the same per-block code on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import no_gpu

from squinchcomm.codec import format as fmt
from squinchcomm.codec import oracle


import squinch_data as data
from squinch_data import assert_bits_equal
SIZES = [0, 1, 7, 8, 9, 1000, (1 << 20) + 3]
OFFSETS = [0, 12345, 2**32 - 5, 2**64 - 20]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/Inf inputs


@pytest.fixture(scope="module")
def cp():
    """CuPy with a usable GPU, or skip (fail when SQUINCHCOMM_TEST_GPU=1)."""
    reason = None
    try:
        import cupy

        if not cupy.is_available():
            reason = "cupy.is_available() is False"
    except Exception as exc:  # ImportError, or a broken CUDA installation
        reason = f"cupy cannot be imported: {exc}"
    if reason is not None:
        no_gpu(f"no usable CUDA GPU: {reason}")
    return cupy


@pytest.fixture(scope="module")
def cuda(cp):
    from squinchcomm.codec import cuda as backend

    return backend


def rounding(stochastic: bool) -> str:
    return "stochastic" if stochastic else "nearest"


def shifted(cp, host: np.ndarray, shift: int):
    """A device copy of ``host`` whose data starts ``shift`` elements past an
    aligned allocation (shift = 1 defeats the 16-byte vector path)."""
    full = cp.zeros(host.size + shift, dtype=host.dtype)
    view = full[shift:]
    view[...] = cp.asarray(host)
    return view


def run_encode(cp, cuda, x, kind, stochastic, seed, offset, residual, shift=0):
    """Encode host array x on the GPU; return (payload, residual) on the host."""
    d_x = shifted(cp, x, shift)
    d_out = shifted(cp, np.zeros(fmt.encoded_nbytes(x.size), np.uint8), shift)
    d_res = None if residual is None else shifted(cp, residual, shift)
    result = cuda.encode(d_x, kind, d_out, stochastic, seed, offset, d_res)
    assert result is d_out
    return cp.asnumpy(d_out), None if d_res is None else cp.asnumpy(d_res)


# ---------------------------------------------------------------- encode
@pytest.mark.gpu
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_encode_float32(cp, cuda, n, stochastic, with_residual):
    rng = np.random.default_rng([n, int(stochastic), int(with_residual)])
    x = data.random_values(rng, n, stochastic)
    residual = None
    if with_residual:
        residual = (data.random_values(rng, n, specials=False) * np.float32(1e-3))
        residual = residual.astype(np.float32)
        residual[: min(n, 3)] = [np.nan, np.inf, -0.0][: min(n, 3)]
    seed = int(rng.integers(0, 2**63)) * 2 + 1
    offset = OFFSETS[n % len(OFFSETS)]
    got, got_res = run_encode(cp, cuda, x, "float32", stochastic, seed, offset,
                              None if residual is None else residual.copy())
    want_res = None if residual is None else residual.copy()
    want = oracle.encode(x, rounding(stochastic), seed, offset, want_res)
    assert_bits_equal(got, want, "payload")
    if residual is not None:
        assert_bits_equal(got_res, want_res, "residual")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 9, 1000, 4099])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_encode_misaligned(cp, cuda, n, stochastic):
    """Views one element off alignment take the scalar load/store paths."""
    rng = np.random.default_rng([n, int(stochastic), 1])
    x = data.random_values(rng, n, stochastic)
    residual = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    got, got_res = run_encode(cp, cuda, x, "float32", stochastic, 3, 0, residual.copy(), 1)
    want_res = residual.copy()
    want = oracle.encode(x, rounding(stochastic), 3, 0, want_res)
    assert_bits_equal(got, want, "payload")
    assert_bits_equal(got_res, want_res, "residual")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 9, 1000, 65536 + 5])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_encode_half_inputs(cp, cuda, kind, n, stochastic, with_residual):
    rng = np.random.default_rng([n, int(stochastic), int(with_residual), len(kind)])
    if n > 65536:  # every bit pattern (NaNs, Infs, subnormals included), then random
        bits = np.concatenate([np.arange(65536), rng.integers(0, 65536, n - 65536)])
        bits = rng.permutation(bits).astype(np.uint16)
    else:
        bits = data.to_kind(data.random_values(rng, n, stochastic), kind)
    residual = (rng.standard_normal(n) * 1e-3).astype(np.float32) if with_residual else None
    got, got_res = run_encode(cp, cuda, bits, kind, stochastic, 5, 17,
                              None if residual is None else residual.copy())
    want_res = None if residual is None else residual.copy()
    want = oracle.encode(data.from_kind(bits, kind), rounding(stochastic), 5, 17, want_res)
    assert_bits_equal(got, want, "payload")
    if residual is not None:
        assert_bits_equal(got_res, want_res, "residual")


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 2**32 - 8])
def test_encode_stochastic_ties(cp, cuda, offset):
    """Exact ties u * STEP[k] == r - F[k] round down on the GPU as well."""
    rng = np.random.default_rng(offset % 1000)
    x = data.stochastic_tie_values(21, offset, 2000, rng)
    got, _ = run_encode(cp, cuda, x, "float32", True, 21, offset, None)
    assert_bits_equal(got, oracle.encode(x, "stochastic", 21, offset), "payload")


@pytest.mark.gpu
def test_encode_grid_stride_and_stream(cp, cuda):
    """A grid smaller than the work (grid-stride loop) on a non-default stream."""
    _, state = cuda._device_state()
    saved = state.max_grid
    rng = np.random.default_rng(9)
    x = data.random_values(rng, 100_003)
    residual = (rng.standard_normal(x.size) * 1e-3).astype(np.float32)
    try:
        state.max_grid = 3
        with cp.cuda.Stream(non_blocking=True) as stream:
            got, got_res = run_encode(cp, cuda, x, "float32", True, 1, 5, residual.copy())
            stream.synchronize()
    finally:
        state.max_grid = saved
    want_res = residual.copy()
    assert_bits_equal(got, oracle.encode(x, "stochastic", 1, 5, want_res), "payload")
    assert_bits_equal(got_res, want_res, "residual")


# ---------------------------------------------------------------- decode
def _decode_reference(payload, n, kind):
    ref = oracle.decode(payload, n)
    return {"float32": ref, "float16": data.f16_reference(ref),
            "bfloat16": data.bf16_reference(ref)}[kind]


def run_decode(cp, cuda, payload, n, kind, shift=0):
    dtype = np.float32 if kind == "float32" else np.uint16
    d_out = shifted(cp, np.zeros(n, dtype), shift)
    result = cuda.decode(shifted(cp, payload, shift), n, d_out, kind)
    assert result is d_out
    return cp.asnumpy(d_out)


@pytest.mark.gpu
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_decode(cp, cuda, n, kind, shift):
    rng = np.random.default_rng([n, len(kind), shift])
    payload = data.scribble_tail(oracle.encode(data.random_values(rng, n))[None], n, rng)[0]
    garbage = rng.integers(0, 256, payload.size).astype(np.uint8)  # any bytes decode
    for p in (payload, garbage):
        assert_bits_equal(run_decode(cp, cuda, p, n, kind, shift),
                          _decode_reference(p, n, kind), f"decode {kind}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16"])
def test_decode_every_level(cp, cuda, kind):
    """All 255 x 16 x 2 decoded values plus NaN blocks."""
    payload, n = data.every_level_payload()
    assert_bits_equal(run_decode(cp, cuda, payload, n, kind),
                      _decode_reference(payload, n, kind), kind)


# ---------------------------------------------------------------- decode_accumulate
def run_accumulate(cp, cuda, payloads, n, out, scale, shift=0):
    d_out = shifted(cp, out, shift)
    d_p = cp.asarray(payloads)
    result = cuda.decode_accumulate(d_p, n, d_out, scale)
    assert result is d_out
    return cp.asnumpy(d_out)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 9, 1000, (1 << 20) + 3])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("scale", [1.0, 1 / 3, -2.0, 1e-35, 0.0])
def test_decode_accumulate(cp, cuda, n, k, scale):
    rng = np.random.default_rng([n, k, int(abs(scale) * 1000)])
    payloads = data.scribble_tail(data.random_payloads(rng, k, n), n, rng)
    out = data.random_values(rng, n, specials=False)
    out[: min(n, 2)] = [-0.0, 1e-42][: min(n, 2)]
    got = run_accumulate(cp, cuda, payloads, n, out.copy(), scale, shift=n % 2)
    want = oracle.decode_accumulate(payloads, n, out.copy(), scale)
    assert_bits_equal(got, want, "decode_accumulate")


@pytest.mark.gpu
def test_decode_accumulate_nan_bits(cp, cuda):
    """NaN results are the canonical 0x7FC00000, not the GPU's 0x7FFFFFFF."""
    n = 64
    rng = np.random.default_rng(3)
    finite = data.random_payloads(rng, 2, n, nan_blocks=False)
    out = rng.standard_normal(n).astype(np.float32)
    nan_bits = np.array([0x7FC00000, 0xFFC00000, 0x7FA00001, 0xFFE12345], np.uint32)
    out[::5] = nan_bits[np.arange(out[::5].size) % 4].view(np.float32)
    out[1::7] = np.inf
    for scale in (1.0, -1.0, np.inf, -np.inf):
        want = oracle.decode_accumulate(finite, n, out.copy(), scale)
        assert_bits_equal(run_accumulate(cp, cuda, finite, n, out.copy(), scale), want,
                          f"scale {scale}")
    with_nan = finite.copy()
    with_nan[1, 0::12] = 255
    out = rng.standard_normal(n).astype(np.float32)
    want = oracle.decode_accumulate(with_nan, n, out.copy(), 0.5)
    assert_bits_equal(run_accumulate(cp, cuda, with_nan, n, out.copy(), 0.5), want,
                      "NaN blocks")


# ---------------------------------------------------------------- reduce_encode
@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8, 9, 1000, (1 << 20) + 3])
@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_reduce_encode(cp, cuda, n, k, stochastic, with_residual):
    rng = np.random.default_rng([n, k, int(stochastic), int(with_residual)])
    payloads = data.scribble_tail(data.random_payloads(rng, k, n), n, rng)
    scale = [1.0, -0.25, 1 / 3][n % 3]
    residual = None
    if with_residual:
        residual = (rng.standard_normal(n) * 1e-2).astype(np.float32)
        residual[:1] = np.nan
    offset = OFFSETS[n % len(OFFSETS)]
    want_res = None if residual is None else residual.copy()
    d_out = cp.zeros(fmt.encoded_nbytes(n), cp.uint8)
    d_res = None if residual is None else cp.asarray(residual.copy())
    result = cuda.reduce_encode(cp.asarray(payloads), n, d_out, scale, stochastic, 11, offset,
                                d_res)
    assert result is d_out
    want = oracle.reduce_encode(payloads, n, scale, rounding(stochastic), 11, offset, want_res)
    assert_bits_equal(cp.asnumpy(d_out), want, "payload")
    if residual is not None:
        assert_bits_equal(cp.asnumpy(d_res), want_res, "residual")


@pytest.mark.gpu
def test_round_trip_through_all_kernels(cp, cuda):
    """encode -> reduce_encode -> decode on the device equals the oracle chain."""
    rng = np.random.default_rng(12)
    n, k = 10_007, 3
    xs = [data.random_values(rng, n, specials=False) for _ in range(k)]
    d_payloads = cp.zeros((k, fmt.encoded_nbytes(n)), cp.uint8)
    for i, x in enumerate(xs):
        cuda.encode(cp.asarray(x), "float32", d_payloads[i], False, 0, 0, None)
    d_red = cp.zeros(fmt.encoded_nbytes(n), cp.uint8)
    cuda.reduce_encode(d_payloads, n, d_red, 1 / k, True, 42, 0, None)
    d_y = cp.zeros(n, cp.float32)
    cuda.decode(d_red, n, d_y, "float32")
    payloads = np.stack([oracle.encode(x) for x in xs])
    want = oracle.decode(oracle.reduce_encode(payloads, n, 1 / k, "stochastic", 42, 0), n)
    assert_bits_equal(cp.asnumpy(d_y), want, "round trip")


@pytest.mark.gpu
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_above_two_to_the_31_elements(cp, cuda, rounding):
    """One input of 2^31 + 13 elements (8 GiB): 64-bit indices in the
    grid-stride loop, payload offsets past 2^32 bytes, rounding draws at
    global indices past 2^31. Slices around the 2^31 boundary, the start and
    the partial last block are compared with the oracle run on the slice at
    the same global offset (blocks are independent)."""
    n = 2**31 + 13
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < 26 * 2**30:
        pytest.skip(f"needs 26 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    d_x = cp.random.default_rng(5).standard_normal(n, dtype=cp.float32)
    d_p = cp.empty(fmt.encoded_nbytes(n), cp.uint8)
    stochastic = rounding == "stochastic"
    cuda.encode(d_x, "float32", d_p, stochastic, 77, 0, None)
    d_y = cp.empty(n, cp.float32)
    cuda.decode(d_p, n, d_y, "float32")
    for lo, hi in ((0, 4096), (2**31 - 4096, 2**31 + 4096), (n - 1000 - 5, n)):
        lo -= lo % 8
        x = cp.asnumpy(d_x[lo:hi])
        want = oracle.encode(x, rounding, 77, lo)
        b0 = 6 * (lo // 8)
        got = cp.asnumpy(d_p[b0: b0 + want.size])
        assert_bits_equal(got, want, f"payload of [{lo}, {hi})")
        assert_bits_equal(cp.asnumpy(d_y[lo:hi]), oracle.decode(want, hi - lo),
                          f"decode of [{lo}, {hi})")
    del d_x, d_p, d_y
    cp.get_default_memory_pool().free_all_blocks()


# ---------------------------------------------------------------- no GPU needed
def test_import_is_lazy():
    """Importing the backend compiles nothing and does not import CuPy."""
    code = ("import sys, squinchcomm.codec.cuda as c; "
            "assert 'cupy' not in sys.modules, 'cupy imported'; "
            "assert not c._DEVICES; print(c._source().count('squinch_encode'))")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 1  # the kernel source with the header inlined is readable


def test_nvrtc_compiles_kernels():
    """NVRTC (no GPU needed) compiles the exact source and options the backend
    uses, and the float32 arithmetic stays unfused (no fma in the PTX)."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # no CuPy, or no libnvrtc
        pytest.skip(f"NVRTC is not available: {exc}")
    from squinchcomm.codec import cuda

    prog = nvrtc.createProgram(cuda._source(), "squinch.cu", [], [])
    try:
        nvrtc.compileProgram(prog, list(cuda._OPTIONS) + ["--gpu-architecture=compute_90"])
    except Exception as exc:
        pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}")
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for name in ("squinch_encode", "squinch_decode", "squinch_decode_accumulate",
                 "squinch_reduce_encode"):
        assert f".entry {name}(" in ptx
    assert "fma.rn.f32" not in ptx


def test_debug_mode_names_the_failing_kernel(monkeypatch):
    """SQUINCHCOMM_CUDA_DEBUG=1: a fault found by the synchronize after a launch
    is raised as BackendError naming the kernel and its grid (a stand-in for
    CuPy's stream here; on a GPU, test_encode_float32 runs with the real one
    under bench/gpu_check.sh, which sets the variable)."""
    import types

    from squinchcomm.codec import cuda
    from squinchcomm.errors import BackendError

    class FaultyStream:
        def synchronize(self):
            raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=FaultyStream))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendError, match=r"squinch_decode \(grid 7 x 256 threads\) failed: "
                                           r"cudaErrorIllegalAddress"):
        cuda._check_finished("squinch_decode", 7)
