"""The Squinch codec: 8 gradient values in 48 bits (FORMAT.md).

Functions take NumPy arrays (Numba kernels), CuPy arrays (CUDA kernels) or
torch tensors on the CPU or a CUDA device (zero-copy through the first two),
in float32, float16 or bfloat16, and return the same kind of array. The
comparison codecs (fp16/bf16 casts, int8/int4 block absmax) are in
:mod:`squinchcomm.codec.baselines`. The
NumPy oracle (``backend="oracle"``) is the readable specification; every
backend produces identical bytes and floats.

Example:
    >>> import numpy as np
    >>> from squinchcomm import codec
    >>> x = np.linspace(-1, 1, 20, dtype=np.float32)
    >>> payload = codec.encode(x)
    >>> payload.nbytes == codec.encoded_nbytes(20) == 18
    True
    >>> y = codec.decode(payload, 20)
    >>> float(np.abs(y - x).max()) < 0.1
    True
"""

from __future__ import annotations

import numpy as np

from squinchcomm import config
from squinchcomm.codec import _arrays, baselines, oracle
from squinchcomm.codec.format import BLOCK, BLOCK_BYTES, encoded_nbytes
from squinchcomm.errors import require

__all__ = [
    "encode",
    "decode",
    "decode_accumulate",
    "reduce_encode",
    "warm_up",
    "encoded_nbytes",
    "BLOCK",
    "BLOCK_BYTES",
    "ROUNDINGS",
    "BACKENDS",
    "baselines",
]

ROUNDINGS = ("nearest", "stochastic")
BACKENDS = ("numba", "oracle", "cuda")
_U64 = 1 << 64


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------
def encode(x, *, rounding: str = "nearest", seed: int = 0, offset: int = 0, out=None,
           residual=None, backend: str | None = None):
    """Encode ``x`` into a Squinch payload of ``encoded_nbytes(x.size)`` bytes.

    Args:
        x: contiguous float32/float16/bfloat16 array or tensor, any shape
            (flattened in C order).
        rounding: "nearest" (default) or "stochastic" (unbiased, FORMAT.md).
        seed: 64-bit seed of the stochastic-rounding hash; vary it per step.
        offset: global index of ``x``'s first element, so shards of one tensor
            draw the same random bits as the whole tensor would.
        out: optional uint8 buffer of the payload size (same array kind/device).
        residual: optional float32 error-feedback buffer of ``x.size``: encodes
            ``x + residual`` and overwrites it with ``(x + residual) - decoded``.
        backend: "numba" or "oracle" on the host (default from
            ``SQUINCHCOMM_CODEC_BACKEND``); CUDA arrays always use "cuda".

    Returns:
        The uint8 payload, as the caller's array type (``out`` if given).

    Example:
        >>> import numpy as np
        >>> encode(np.ones(8, np.float32))[:2].tolist()  # q_max 129, no signs
        [129, 0]
    """
    src = _arrays.flat_input(x)
    n = src.data.size
    stochastic = _check_rounding(rounding, seed, offset)
    dst = _output(out, "out", "uint8", encoded_nbytes(n), src)
    res = None if residual is None else _arrays.flat_buffer(residual, "residual", "float32", n, src)
    _arrays.check_disjoint(("out", dst), ("x", src), ("residual", res))
    if res is not None:
        _arrays.check_disjoint(("residual", res), ("x", src))
    if n:
        impl = _backend(src, backend)
        with _arrays.stream_context(src):
            impl.encode(src.data, src.kind, dst.data, stochastic, seed, offset,
                        None if res is None else res.data)
    return _arrays.wrap(dst)


def decode(payload, n: int, *, dtype="float32", out=None, backend: str | None = None):
    """Decode ``n`` values from a payload.

    Args:
        payload: uint8 array of exactly ``encoded_nbytes(n)`` bytes.
        n: the element count (sizes travel out of band).
        dtype: float32 (default), float16 or bfloat16 (rounded to nearest even
            from the float32 value; NumPy needs ml_dtypes for bfloat16).
        out: optional buffer of ``n`` elements of ``dtype``, any shape, contiguous.
        backend: as in :func:`encode`.

    Returns:
        The decoded values (flat, or ``out``), as the payload's array type.
    """
    src = _payload(payload, n)
    kind = _arrays.normalize_dtype(dtype) if out is None else _out_kind(out)
    if kind not in _arrays.KINDS:
        raise ValueError(f"cannot decode to {kind}: use float32, float16 or bfloat16")
    if kind == "bfloat16" and out is None:
        _arrays.check_bfloat16_output(src.family)
    dst = _output(out, "out", kind, n, src)
    _arrays.check_disjoint(("out", dst), ("payload", src))
    if n:
        impl = _backend(src, backend)
        with _arrays.stream_context(src):
            impl.decode(src.data, n, dst.data, kind)
    return _arrays.wrap(dst)


def decode_accumulate(payloads, n: int, out, *, scale: float = 1.0, backend: str | None = None):
    """Decode k payloads and add their scaled sum into a float32 buffer: the
    reduce step of a reduce-scatter.

    ``out[i] = out[i] + fl(fl(d_0[i] + d_1[i] + ... + d_{k-1}[i]) * scale)``,
    summed in payload order from +0.0 in float32; NaN/Inf blocks propagate.

    Args:
        payloads: 2-D uint8 array (k, encoded_nbytes(n)) or a sequence of k payloads.
        n: elements per payload.
        out: float32 buffer of n elements (updated in place and returned).
        scale: e.g. 1/world_size to average.
        backend: as in :func:`encode`.
    """
    stack = _payload_stack(payloads, n)
    dst = _arrays.flat_buffer(out, "out", "float32", n, stack)
    scale = _check_scale(scale)
    _arrays.check_disjoint(("out", dst), ("payloads", stack))
    if n:
        impl = _backend(stack, backend)
        with _arrays.stream_context(stack):
            impl.decode_accumulate(stack.data, n, dst.data, scale)
    return out


def reduce_encode(payloads, n: int, *, scale: float = 1.0, rounding: str = "nearest",
                  seed: int = 0, offset: int = 0, out=None, residual=None,
                  backend: str | None = None):
    """Decode-accumulate k payloads and re-encode the reduced values, fused:
    the reduce-scatter -> all-gather step of the compressed allreduce.

    Encodes ``fl(fl(sum_k d_k) * scale)`` (see :func:`decode_accumulate`),
    plus ``residual`` when given (second error feedback, as in :func:`encode`).

    Returns:
        The uint8 payload of the reduced values (``out`` if given).
    """
    stack = _payload_stack(payloads, n)
    stochastic = _check_rounding(rounding, seed, offset)
    scale = _check_scale(scale)
    dst = _output(out, "out", "uint8", encoded_nbytes(n), stack)
    res = None if residual is None else _arrays.flat_buffer(residual, "residual", "float32", n,
                                                            stack)
    _arrays.check_disjoint(("out", dst), ("payloads", stack), ("residual", res))
    if res is not None:
        _arrays.check_disjoint(("residual", res), ("payloads", stack))
    if n:
        impl = _backend(stack, backend)
        with _arrays.stream_context(stack):
            impl.reduce_encode(stack.data, n, dst.data, scale, stochastic, seed, offset,
                               None if res is None else res.data)
    return _arrays.wrap(dst)


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------
def warm_up() -> float:
    """Compile the host codec's kernels now (Numba: about 22 s on a fresh
    machine, well under a second once its on-disk cache holds them), so that
    no collective, and no throughput number, pays for it later. A no-op
    returning 0 when the host backend is not Numba
    (``SQUINCHCOMM_CODEC_BACKEND``). One process per machine compiles at a
    time (a file lock), so the ranks of a node compile once, not once each.
    ``squinchcomm.init()`` starts it in the background; a call while that
    compile runs waits for it (the same lock), so calling it before timing
    anything keeps compilation out of the measurement. Returns the seconds
    taken."""
    if config.codec_backend() != "numba":
        return 0.0
    require("numba", "cpu", "The Squinch CPU codec")
    from squinchcomm.codec import cpu

    return cpu.warm_up()


def _check_rounding(rounding: str, seed: int, offset: int) -> bool:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: use 'nearest' or 'stochastic'")
    for name, value in (("seed", seed), ("offset", offset)):
        if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < _U64:
            raise ValueError(f"{name}={value!r} must be an integer in [0, 2**64)")
    return rounding == "stochastic"


def _check_scale(scale) -> np.float32:
    s = np.float32(scale)
    if not np.isfinite(s):
        raise ValueError(f"scale={scale!r} must be finite")
    return s


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer element count")
    return int(n)


def _payload(payload, n) -> _arrays.Flat:
    n = _check_n(n)
    src = _arrays._flat(payload, "payload", ("uint8",))
    expected = encoded_nbytes(n)
    if src.data.size != expected:
        raise ValueError(f"payload has {src.data.size} bytes, but n={n} elements need "
                         f"6 * ceil(n / 8) = {expected} bytes: check n and the payload")
    return src


def _payload_stack(payloads, n) -> _arrays.Flat:
    """Validate k payloads; return them as one 2-D (k, nbytes) array."""
    n = _check_n(n)
    nbytes = encoded_nbytes(n)
    if isinstance(payloads, (list, tuple)):
        if not payloads:
            raise ValueError("payloads is empty: pass at least one payload")
        flats = [_payload(p, n) for p in payloads]
        if len({(f.family, f.device) for f in flats}) > 1:
            raise ValueError("payloads mix array kinds or devices: put them on one device")
        first = flats[0]
        xp = np if not first.on_gpu else __import__("cupy")
        with _arrays.stream_context(first):
            data = xp.stack([f.data for f in flats]) if nbytes else xp.zeros((len(flats), 0),
                                                                                np.uint8)
        return _arrays.Flat(data, "uint8", first.family, first.device, None)
    stack = _arrays._flat(payloads, "payloads", ("uint8",))
    if getattr(payloads, "ndim", None) != 2 or payloads.shape[1] != nbytes or payloads.shape[0] < 1:
        raise ValueError(f"payloads has shape {tuple(payloads.shape)}, expected (k, {nbytes}) "
                         f"with k >= 1 for n={n} (or pass a list of 1-D payloads)")
    stack.data = stack.data.reshape(payloads.shape[0], nbytes)
    return stack


def _out_kind(out) -> str:
    if isinstance(out, _arrays.Flat):
        return out.kind
    return _arrays.normalize_dtype(out.dtype)


def _output(out, name: str, kind: str, size: int, like: _arrays.Flat) -> _arrays.Flat:
    if out is None:
        return _arrays.new_buffer(like, kind, size)
    return _arrays.flat_buffer(out, name, kind, size, like)


# ----------------------------------------------------------------------------
# Backends: each exposes encode / decode / decode_accumulate / reduce_encode
# with the signatures of squinchcomm.codec.cpu.
# ----------------------------------------------------------------------------
class _OracleBackend:
    """The NumPy oracle behind the backend contract (slow; the reference)."""

    @staticmethod
    def encode(x, kind, out, stochastic, seed, offset, residual):
        out[:] = oracle.encode(oracle.to_float32(x, kind), _rounding(stochastic), seed, offset,
                               residual)
        return out

    @staticmethod
    def decode(payload, n, out, kind):
        out[:] = oracle.from_float32(oracle.decode(payload, n), kind)
        return out

    @staticmethod
    def decode_accumulate(payloads, n, out, scale):
        return oracle.decode_accumulate(payloads, n, out, scale)

    @staticmethod
    def reduce_encode(payloads, n, out, scale, stochastic, seed, offset, residual):
        out[:] = oracle.reduce_encode(payloads, n, scale, _rounding(stochastic), seed, offset,
                                      residual)
        return out


def _rounding(stochastic: bool) -> str:
    return "stochastic" if stochastic else "nearest"


def _backend(arr: _arrays.Flat, name: str | None):
    if arr.on_gpu:
        if name not in (None, "cuda"):
            raise ValueError(f"backend={name!r} cannot run on CUDA arrays: use backend='cuda' "
                             "or move the data to the host")
        from squinchcomm.codec import cuda

        return cuda
    name = config.codec_backend() if name is None else name
    if name == "oracle":
        return _OracleBackend
    if name == "numba":
        require("numba", "cpu", "The Squinch CPU codec")
        from squinchcomm.codec import cpu

        return cpu
    raise ValueError(f"backend={name!r}: use 'numba' or 'oracle' for host arrays, 'cuda' for GPU")
