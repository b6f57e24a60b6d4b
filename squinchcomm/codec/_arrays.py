"""Adapt NumPy, CuPy and torch arrays to the flat buffers the backends take.

Zero-copy: torch CPU tensors become NumPy views (``Tensor.numpy``), torch CUDA
tensors become CuPy views through DLPack. fp16/bf16 travel as their uint16
bits (NumPy and CuPy have no bfloat16, Numba no float16), with a ``kind``
string naming the real type. Nothing here imports torch or CuPy unless the
caller already handed us one of their arrays.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Flat", "KINDS", "flat_input", "flat_any", "flat_buffer", "new_buffer", "wrap",
           "internal", "normalize_dtype", "check_bfloat16_output", "stream_context",
           "check_disjoint"]

KINDS = ("float32", "float16", "bfloat16")
_BITS_KINDS = ("float16", "bfloat16")


@dataclass
class Flat:
    """A flat, contiguous view of a caller's array.

    Attributes:
        data: NumPy or CuPy 1-D array (float32/uint8 as is; fp16/bf16 as uint16 bits).
        kind: "float32", "float16", "bfloat16", or another NumPy dtype name
            ("float64", "int64", "bool", "uint8", ...).
        family: "numpy", "cupy" or "torch" (the caller's array type).
        device: CUDA device index, or None on the host.
        original: the caller's object, returned when it was an ``out=``.
    """

    data: Any
    kind: str
    family: str
    device: int | None
    original: Any

    @property
    def on_gpu(self) -> bool:
        return self.device is not None


def _family(x) -> str:
    module = type(x).__module__
    if isinstance(x, np.ndarray):
        return "numpy"
    if module.startswith("cupy"):
        return "cupy"
    if module.startswith("torch") and "torch" in sys.modules:
        import torch

        if isinstance(x, torch.Tensor):
            return "torch"
    raise ValueError(
        f"expected a NumPy array, CuPy array or torch tensor, got {type(x).__name__}; "
        "convert with np.asarray(...) first")


def normalize_dtype(dtype) -> str:
    """Return "float32", "float16", "bfloat16" (or another NumPy name) for a
    NumPy / torch / ml_dtypes dtype or a string."""
    if isinstance(dtype, str):
        return dtype.replace("torch.", "")
    if type(dtype).__module__.startswith("torch"):
        return str(dtype).replace("torch.", "")
    return np.dtype(dtype).name


def _check_contiguous(x, family: str, name: str):
    if family == "torch":
        ok = x.is_contiguous()
        fix = f"{name}.contiguous()"
    else:
        ok = x.flags.c_contiguous
        fix = f"np.ascontiguousarray({name}) (or cupy.ascontiguousarray)"
    if not ok:
        raise ValueError(f"{name} must be contiguous (got strides {tuple(x.stride() if family == 'torch' else x.strides)}); "
                         f"pass {fix}")


def _torch_view(t):
    """Return (numpy-or-cupy flat array, kind, device) for a contiguous torch tensor."""
    import torch

    t = t.detach()
    kind = normalize_dtype(t.dtype)
    if kind in _BITS_KINDS:
        t = t.view(torch.int16)
    if t.is_cuda:
        import cupy

        arr = cupy.from_dlpack(t).reshape(-1)
        device = t.device.index
    elif t.device.type == "cpu":
        try:
            arr = t.numpy().reshape(-1)
        except TypeError as exc:  # a dtype NumPy has no type for (float8, ...)
            raise ValueError(f"tensors of dtype {t.dtype} are not supported: cast to float32 "
                             f"(or an integer type) first ({exc})") from None
        device = None
    else:
        raise ValueError(f"tensors on device '{t.device}' are not supported; use CPU or CUDA")
    if kind in _BITS_KINDS:
        arr = arr.view(np.uint16)
    return arr, kind, device


def _flat(x, name: str, allowed: tuple[str, ...] | None) -> Flat:
    if isinstance(x, Flat):  # already adapted (library-internal callers)
        if allowed is not None and x.kind not in allowed:
            raise ValueError(f"{name} holds {x.kind}; expected {', '.join(allowed)}")
        return Flat(x.data, x.kind, x.family, x.device, x)  # wrap() hands the Flat back
    family = _family(x)
    _check_contiguous(x, family, name)
    if family == "torch":
        data, kind, device = _torch_view(x)
    else:
        kind = x.dtype.name  # ml_dtypes' bfloat16 is named "bfloat16"
        data, device = x.reshape(-1), (x.device.id if family == "cupy" else None)
        if kind in _BITS_KINDS:
            data = data.view(np.uint16)
    if family != "torch" and not x.dtype.isnative:
        raise ValueError(f"{name} has the non-native byte order dtype {x.dtype.str!r}; the codec "
                         f"reads native-endian data: convert it with "
                         f"{name}.astype({name}.dtype.newbyteorder('='))")
    if allowed is not None and kind not in allowed:
        raise ValueError(f"{name} has dtype {kind}; supported: {', '.join(allowed)} "
                         f"(cast it, e.g. {name}.astype(np.float32) / {name}.float())")
    return Flat(data, kind, family, device, x)


def flat_input(x, name: str = "x") -> Flat:
    """Flatten a float32/float16/bfloat16 input (any shape, contiguous)."""
    return _flat(x, name, KINDS)


def flat_any(x, name: str = "x") -> Flat:
    """Flatten an input of any dtype (any shape, contiguous): the float kinds
    as :func:`flat_input`, others (float64, integers, bool) as they are."""
    return _flat(x, name, None)


def flat_buffer(x, name: str, kind: str, size: int, like: Flat) -> Flat:
    """Validate a caller-provided buffer: dtype ``kind``, ``size`` elements,
    contiguous, writable, on the same kind of array and device as ``like``."""
    buf = _flat(x, name, (kind,))
    if buf.data.size != size:
        raise ValueError(f"{name} has {buf.data.size} elements, expected {size}")
    if buf.family != like.family or buf.device != like.device:
        raise ValueError(f"{name} is a {buf.family} array on {_where(buf)}, but the input is "
                         f"a {like.family} array on {_where(like)}: use the same kind and device")
    if buf.family == "numpy" and not buf.data.flags.writeable:
        raise ValueError(f"{name} is read-only; pass a writable array")
    return buf


def _extent(f: Flat) -> tuple[int, int]:
    """[first byte, one past the last byte) of a flat buffer's data."""
    data = f.data
    start = data.data.ptr if f.on_gpu else data.__array_interface__["data"][0]
    return start, start + data.nbytes


def check_disjoint(written: tuple[str, Flat], *others: tuple[str, Flat | None]) -> None:
    """Raise ValueError when the buffer a kernel writes shares memory with
    another argument: the kernels declare every pointer ``__restrict__`` (and
    the host backends read and write in blocks), so aliasing would be
    undefined behaviour, not an in-place update."""
    name, buf = written
    if buf.data.nbytes == 0:
        return
    lo, hi = _extent(buf)
    for other_name, other in others:
        if other is None or other.data.nbytes == 0 or other.device != buf.device:
            continue
        olo, ohi = _extent(other)
        if lo < ohi and olo < hi:
            raise ValueError(f"{name} overlaps {other_name} in memory; the codec does not "
                             f"work in place: pass a separate {name} buffer")


def _where(f: Flat) -> str:
    return "the host" if f.device is None else f"cuda:{f.device}"


def new_buffer(like: Flat, kind: str, size: int) -> Flat:
    """Allocate a flat buffer of ``kind`` beside ``like`` (same family and device)."""
    storage = np.uint16 if kind in _BITS_KINDS else np.dtype(kind)
    if like.on_gpu:
        import cupy

        with cupy.cuda.Device(like.device):
            data = cupy.empty(size, dtype=storage)
    else:
        data = np.empty(size, dtype=storage)
    return Flat(data, kind, like.family, like.device, None)


def wrap(buf: Flat):
    """Return ``buf`` as the caller's array type (its own object if it passed one)."""
    if buf.original is not None:
        return buf.original
    data = buf.data
    if buf.family == "torch":
        import torch

        t = torch.from_dlpack(data) if buf.on_gpu else torch.from_numpy(data)
        if buf.kind in _BITS_KINDS:
            t = t.view(torch.int16).view(getattr(torch, buf.kind))
        return t
    if buf.kind in _BITS_KINDS:
        if buf.kind == "float16":
            return data.view(np.float16)
        return data.view(_numpy_bfloat16())
    return data


def _numpy_bfloat16():
    try:
        import ml_dtypes
    except ImportError as exc:
        raise ValueError("NumPy has no bfloat16: decode to dtype='float32', pass out= a torch "
                         "bfloat16 tensor, or install ml_dtypes (pip install "
                         "'squinchcomm[cpu]')") from exc
    return ml_dtypes.bfloat16


def check_bfloat16_output(family: str):
    """Fail early (before any work) if a bfloat16 result cannot be returned."""
    if family in ("numpy", "cupy"):
        if family == "cupy":
            raise ValueError("CuPy has no bfloat16: decode to dtype='float32' or pass out= a "
                             "torch bfloat16 CUDA tensor")
        _numpy_bfloat16()


def stream_context(f: Flat) -> contextlib.AbstractContextManager:
    """A context that makes CuPy launch on the right device and stream: torch's
    current stream for torch tensors, CuPy's own current stream otherwise."""
    if not f.on_gpu:
        return contextlib.nullcontext()
    import cupy

    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(f.device))
    if f.family == "torch":
        import torch

        stream = torch.cuda.current_stream(f.device)
        stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, f.device))
    return stack


def internal(f: Flat) -> Flat:
    """The same data as a NumPy/CuPy-family Flat (what library code hands back to
    the codec: buffers it allocates itself are NumPy or CuPy arrays)."""
    return Flat(f.data, f.kind, "cupy" if f.on_gpu else "numpy", f.device, None)
