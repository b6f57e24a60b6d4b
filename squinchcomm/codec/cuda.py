"""Squinch on NVIDIA GPUs: CuPy RawModule kernels, bit-identical to the oracle.

The kernels are native/squinch.cu; the per-block logic they run is
native/squinch.cuh, ``__host__ __device__`` code that tests/native/host_check.cu
also runs on the CPU against the oracle. The module is compiled with NVRTC on
first use (never at import: importing this module does not import CuPy),
once per device, and the shared float32 tables of
:mod:`squinchcomm.codec.format` are uploaded once per device beside it.
Kernels launch on CuPy's current stream, one launch per operation, and return
without synchronizing; with ``SQUINCHCOMM_CUDA_DEBUG=1`` every launch is
followed by a synchronize and an error check that names the kernel.

The entry points have the signatures of :mod:`squinchcomm.codec.cpu`; their
arrays are flat, C-contiguous CuPy arrays on the current device, already
validated by the caller.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from squinchcomm import config
from squinchcomm.codec import format as fmt
from squinchcomm.errors import BackendError

__all__ = ["encode", "decode", "decode_accumulate", "reduce_encode"]

_THREADS = 256  # threads per CTA; one thread per 8-element block
_CTAS_PER_SM = 8  # grid cap (2048 threads per SM); larger inputs use the grid-stride loop
_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2}
_KERNELS = ("squinch_encode", "squinch_decode", "squinch_decode_accumulate",
            "squinch_reduce_encode")
# IEEE float32 everywhere: no FMA contraction, no flush of denormals to zero,
# correctly rounded division and square root (the bytes must match the oracle).
_OPTIONS = ("--std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true",
            "--prec-sqrt=true")
_INCLUDE = '#include "squinch.cuh"'
_NULL = np.uint64(0)  # a null device pointer, passed by value (no residual)

_LOCK = threading.Lock()
_DEVICES: dict[int, "_DeviceState"] = {}  # device id -> compiled kernels and tables


class _DeviceState:
    """What one GPU needs to run the codec: kernels, tables, grid cap."""

    def __init__(self, kernels: dict, tables, max_grid: int):
        self.kernels = kernels
        self.tables = tables  # cupy float32, format.packed_tables()
        self.max_grid = max_grid


def _read_native(name: str) -> str:
    """Return the text of native/``name``: package data when installed
    (``squinchcomm.native``), else the source checkout's native/ folder."""
    try:
        from importlib.resources import files

        return files("squinchcomm.native").joinpath(name).read_text(encoding="utf-8")
    except (ImportError, OSError, TypeError, AttributeError):
        path = Path(__file__).resolve().parents[2] / "native" / name
        return path.read_text(encoding="utf-8")


def _source() -> str:
    """Return squinch.cu with squinch.cuh pasted in place of its #include.

    Inlining (instead of an include path) needs no file system at compile
    time and makes the header part of the source text that CuPy's kernel
    cache is keyed on, so an edited header is never served stale.
    """
    kernels, header = _read_native("squinch.cu"), _read_native("squinch.cuh")
    if _INCLUDE not in kernels:
        raise BackendError(f"native/squinch.cu lacks the line {_INCLUDE!r}")
    return kernels.replace(_INCLUDE, header, 1)


def _build(cupy, device_id: int) -> _DeviceState:
    """Compile the module and upload the tables on the current device."""
    try:
        module = cupy.RawModule(code=_source(), options=_OPTIONS)
        kernels = {name: module.get_function(name) for name in _KERNELS}  # compiles
        tables = cupy.asarray(fmt.packed_tables())
        # The kernels may later run on other streams: finish the upload now.
        cupy.cuda.get_current_stream().synchronize()
        sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(
            f"could not build the Squinch CUDA kernels on device {device_id}: {exc}") from exc
    return _DeviceState(kernels, tables, max(1, sms * _CTAS_PER_SM))


def _device_state():
    """Return (cupy, the memoized state of the current device), building it once."""
    try:
        import cupy

        device_id = cupy.cuda.runtime.getDevice()
    except Exception as exc:
        raise BackendError(f"CUDA is not usable: {exc}") from exc
    state = _DEVICES.get(device_id)
    if state is None:
        with _LOCK:  # one compile per device even when threads race
            state = _DEVICES.get(device_id)
            if state is None:
                state = _DEVICES[device_id] = _build(cupy, device_id)
    return cupy, state


def _grid(nblocks: int, max_grid: int) -> int:
    """CTAs for ``nblocks`` 8-element blocks: one thread each, at most
    ``max_grid`` CTAs (the kernels' grid-stride loops cover the rest)."""
    return max(1, min((nblocks + _THREADS - 1) // _THREADS, max_grid))


def _launch(name: str, n: int, *args) -> None:
    """Launch kernel ``name`` over the ceil(n / 8) blocks of n elements on the
    current stream; every kernel takes the device tables as its last argument."""
    nblocks = fmt.num_blocks(n)
    if nblocks == 0:
        return
    _, state = _device_state()
    grid = _grid(nblocks, state.max_grid)
    try:
        state.kernels[name]((grid,), (_THREADS,), args + (state.tables,))
    except Exception as exc:
        raise BackendError(f"CUDA kernel {name} failed to launch: {exc}") from exc
    if config.cuda_debug():
        _check_finished(name, grid)


def _check_finished(name: str, grid: int) -> None:
    """Debug mode: wait for the launch and raise its error, if any, here."""
    import cupy

    try:
        # A fault inside the kernel (illegal address, trap) surfaces here as
        # CUDARuntimeError; launch errors were raised by the launch itself.
        cupy.cuda.get_current_stream().synchronize()
    except Exception as exc:
        raise BackendError(
            f"CUDA kernel {name} (grid {grid} x {_THREADS} threads) failed: {exc} "
            "(SQUINCHCOMM_CUDA_DEBUG=1 checks after every launch)") from exc


def encode(x, kind, out, stochastic, seed, offset, residual):
    """Encode the flat array ``x`` into the uint8 array ``out``.

    Args:
        x: float32 (kind "float32") or uint16 bits (kind "float16"/"bfloat16"), (n,).
        kind: the element kind of ``x``.
        out: uint8 (6 * ceil(n / 8),), written.
        stochastic: stochastic rounding instead of nearest.
        seed: the rounding seed (a 64-bit int); offset: global index of x[0].
        residual: float32 (n,) error-feedback state updated in place, or None.

    Returns:
        ``out``.
    """
    _launch("squinch_encode", x.size, x, np.int32(_KINDS[kind]), np.uint64(x.size), out,
            _NULL if residual is None else residual, np.int32(bool(stochastic)),
            np.uint32(fmt.stream_key(seed)), np.uint64(offset))
    return out


def decode(payload, n, out, kind):
    """Decode ``n`` elements of ``payload`` into ``out`` (float32, or uint16
    bits for "float16"/"bfloat16", rounded to nearest even) and return it."""
    _launch("squinch_decode", n, payload, np.uint64(n), out, np.int32(_KINDS[kind]))
    return out


def decode_accumulate(payloads, n, out, scale):
    """``out += fl(fl(sum_k decode(payloads[k])) * scale)`` in float32, summing
    the rows of the (k, nbytes) array ``payloads`` in order; returns ``out``."""
    _launch("squinch_decode_accumulate", n, payloads, np.int32(payloads.shape[0]),
            np.uint64(payloads.shape[1]), np.uint64(n), out, np.float32(scale))
    return out


def reduce_encode(payloads, n, out, scale, stochastic, seed, offset, residual):
    """Encode ``fl(sum_k decode(payloads[k]) * scale)`` (+ ``residual``, updated
    as in :func:`encode`) into ``out`` in one pass; returns ``out``."""
    _launch("squinch_reduce_encode", n, payloads, np.int32(payloads.shape[0]),
            np.uint64(payloads.shape[1]), np.uint64(n), out,
            _NULL if residual is None else residual, np.float32(scale),
            np.int32(bool(stochastic)), np.uint32(fmt.stream_key(seed)), np.uint64(offset))
    return out
