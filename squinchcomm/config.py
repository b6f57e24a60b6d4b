"""Configuration from ``SQUINCHCOMM_*`` environment variables, parsed in one place.

Constructor and function arguments always win; these are only the defaults.

| variable | meaning | default |
|---|---|---|
| SQUINCHCOMM_CODEC_BACKEND | host codec backend: ``numba`` or ``oracle`` | ``numba`` |
| SQUINCHCOMM_TIMEOUT | seconds a collective may wait for peers before TransportError | 300 |
| SQUINCHCOMM_MPI_CUDA_AWARE | hand GPU buffers to MPI directly (CUDA-aware MPI only) | 0 |
| SQUINCHCOMM_COMPRESSION | default compression: ``none``, ``fp16``, ``bf16``, ``squinch`` | ``squinch`` |
| SQUINCHCOMM_ROUNDING | Squinch rounding: ``nearest`` or ``stochastic`` | ``nearest`` |
| SQUINCHCOMM_ERROR_FEEDBACK | error feedback for named allreduces: 0 or 1 | 0 |
| SQUINCHCOMM_MIN_COMPRESS_BYTES | tensors smaller than this go uncompressed | 65536 |
| SQUINCHCOMM_CHECK_METADATA | check shapes/dtypes/names agree across ranks: 0 or 1 | 1 |
| SQUINCHCOMM_HIERARCHICAL | reduce inside a node uncompressed, compress across nodes: 0 or 1 | 0 |
| SQUINCHCOMM_NODE_SIZE | ranks per node for hierarchical mode (0: detect) | 0 |
| SQUINCHCOMM_CODEC_THREADS | CPU codec threads per rank (0: cores / ranks on the node) | 0 |
"""

from __future__ import annotations

import os
import re

__all__ = ["PREFIX", "env_choice", "env_float", "env_int", "env_bytes", "env_bool", "parse_size",
           "codec_backend", "timeout", "mpi_cuda_aware", "cuda_debug"]

PREFIX = "SQUINCHCOMM_"


def _raw(name: str) -> str | None:
    raw = os.environ.get(PREFIX + name)
    return None if raw is None or raw.strip() == "" else raw.strip()


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """Read ``SQUINCHCOMM_<name>``; raise ValueError naming the choices if it is not one."""
    raw = _raw(name)
    if raw is None:
        return default
    value = raw.lower()
    if value not in choices:
        raise ValueError(f"{PREFIX}{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    """Read a number >= ``minimum``; ValueError naming the variable otherwise."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ValueError(f"{PREFIX}{name}={raw!r} must be a number >= {minimum:g}")
    return value


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """Read an integer >= ``minimum``; ValueError naming the variable otherwise."""
    raw = _raw(name)
    if raw is None:
        return default
    if not raw.lstrip("-").isdigit() or int(raw) < minimum:
        raise ValueError(f"{PREFIX}{name}={raw!r} must be an integer >= {minimum}")
    return int(raw)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str | int) -> int:
    """Parse nccl-tests style sizes: ``1024``, ``64K``, ``16M``, ``1G`` (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:I?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: use a byte count like 1024, 64K, 16M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def env_bytes(name: str, default: int) -> int:
    """Read a byte count (``65536``, ``64K``, ``16M``, ``1G``); ValueError naming the variable."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        return parse_size(raw)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}={raw!r} must be a byte count like 65536, 64K, 16M "
                         "or 1G") from None


def env_bool(name: str, default: bool) -> bool:
    """Read 0/1/true/false/yes/no/on/off."""
    raw = _raw(name)
    if raw is None:
        return default
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{PREFIX}{name}={raw!r} must be 0 or 1")


def codec_backend() -> str:
    """The default host codec backend (``SQUINCHCOMM_CODEC_BACKEND``)."""
    return env_choice("CODEC_BACKEND", ("numba", "oracle"), "numba")


def timeout() -> float:
    """Seconds a collective waits for its peers (``SQUINCHCOMM_TIMEOUT``)."""
    return env_float("TIMEOUT", 300.0, minimum=0.001)


def mpi_cuda_aware() -> bool:
    """Whether MPI may touch GPU memory (``SQUINCHCOMM_MPI_CUDA_AWARE``)."""
    return env_bool("MPI_CUDA_AWARE", False)


def cuda_debug() -> bool:
    """SQUINCHCOMM_CUDA_DEBUG (default 0): synchronize and check for errors
    after every CUDA kernel launch, so a failure names the kernel that caused it."""
    return env_bool("CUDA_DEBUG", False)
