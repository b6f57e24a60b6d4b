"""fp16/bf16 on the wire: 2 bytes per element (uint16 bits), sums in fp32.

The comparison wire formats of the compressed collectives (Horovod's fp16
compression, and bf16), with the same interface as the Squinch wire codec
(:class:`squinchcomm.collectives.wire.SquinchWire`): ``encode``,
``reduce_encode``, ``decode_accumulate``, ``decode``, ``nbytes``.

Host arrays run the fused, parallel Numba kernels of :mod:`squinchcomm.codec.cpu`;
CuPy arrays, and host arrays under ``SQUINCHCOMM_CODEC_BACKEND=oracle``, run
the array-module code below, which is the reference the kernels are tested
against bit for bit (tests/test_cast_wire.py).
"""

from __future__ import annotations

import numpy as np

from squinchcomm import config
from squinchcomm.codec import _arrays, baselines

__all__ = ["CastWire", "as_f32", "from_f32", "store", "array_module"]


class CastWire:
    """fp16 (``kind="float16"``) or bf16 (``kind="bfloat16"``) on the wire."""

    def __init__(self, kind: str):
        if kind not in ("float16", "bfloat16"):
            raise ValueError(f"kind={kind!r}: the cast wire is 'float16' or 'bfloat16'")
        self.name, self.kind = kind, kind

    @staticmethod
    def nbytes(n):
        return 2 * n

    @staticmethod
    def _kernels(xp):
        """``codec.cpu`` when the Numba kernels serve this call, else None."""
        if xp is not np or config.codec_backend() != "numba":
            return None
        from squinchcomm.errors import require

        require("numba", "cpu", "fp16/bf16 compression on the CPU (or set "
                "SQUINCHCOMM_CODEC_BACKEND=oracle)")
        from squinchcomm.codec import cpu

        return cpu

    def _values(self, payload, xp):
        return as_f32(payload.view(xp.uint16), xp, self.kind)

    def encode(self, x: _arrays.Flat, out, residual, seed, offset=0):
        xp = array_module(x.data)
        kernels = self._kernels(xp)
        if kernels is not None:
            kernels.cast_encode(x.data, x.kind, self.kind, out.view(np.uint16), residual)
            return
        v = as_f32(x.data, xp, x.kind)
        if residual is not None:
            v = v + residual
        out.view(xp.uint16)[:] = from_f32(v, self.kind, xp)
        if residual is not None:
            residual[:] = v - self._values(out, xp)

    def _sum(self, stack, n, scale, xp):
        total = xp.zeros(n, xp.float32)
        for row in stack:  # in rank order from +0: the same sum on every rank
            total += self._values(row, xp)
        return total * xp.float32(scale)

    def reduce_encode(self, stack, n, scale, out, residual, seed, offset):
        xp = array_module(stack)
        kernels = self._kernels(xp)
        if kernels is not None:
            kernels.cast_reduce_encode(stack.view(np.uint16), out.view(np.uint16), scale,
                                       self.kind, residual)
            return
        self.encode(_arrays.Flat(self._sum(stack, n, scale, xp), "float32",
                                 "numpy" if xp is np else "cupy", None, None), out, residual, seed)

    def decode_accumulate(self, stack, n, out, scale):
        xp = array_module(stack)
        kernels = self._kernels(xp)
        if kernels is not None:
            kernels.cast_decode_accumulate(stack.view(np.uint16), out, scale, self.kind)
            return
        out += self._sum(stack, n, scale, xp)

    def decode(self, payload, n, out: _arrays.Flat):
        xp = array_module(payload)
        kernels = self._kernels(xp)
        if kernels is not None:
            kernels.cast_decode(payload.view(np.uint16), out.data, out.kind, self.kind)
            return
        store(self._values(payload, xp), out, xp)


def array_module(a):
    """NumPy for host arrays, CuPy for device arrays."""
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


def as_f32(data, xp, kind: str):
    """float32 values of flat ``data`` of ``kind`` (fp16/bf16 as uint16 bits);
    the array itself when it already is float32."""
    if kind == "float32":
        return data
    if kind == "float16":
        return data.view(xp.float16).astype(xp.float32)
    return (data.astype(xp.uint32) << 16).view(xp.float32)


def from_f32(v, kind: str, xp):
    """float32 -> ``kind`` bits (uint16), rounded to nearest even (the casts
    of :mod:`squinchcomm.codec.baselines`, for NumPy and CuPy alike)."""
    enc = baselines.encode_fp16 if kind == "float16" else baselines.encode_bf16
    return enc(v).view(xp.uint16)


def store(buf32, dst: _arrays.Flat, xp):
    """Write float32 values into ``dst`` (float32, or fp16/bf16 bits)."""
    dst.data[:] = buf32 if dst.kind == "float32" else from_f32(buf32, dst.kind, xp)
    return dst
