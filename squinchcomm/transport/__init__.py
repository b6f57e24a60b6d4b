"""Transports: engines that move bytes between ranks (see :mod:`.base`).

Importing this package imports only :mod:`.base` (standard library). The
engine modules load on first use, so torch, CuPy and mpi4py are imported only
by the code that asks for them::

    from squinchcomm import transport

    tr = transport.MPITransport()                    # imports mpi4py now
    tr = transport.TorchTransport()                  # imports torch now
    tr = transport.get("torch", timeout=60)          # the same, by name
"""

from __future__ import annotations

import importlib
from typing import Any

from squinchcomm.transport.base import DoneWork, PollingWork, Transport, Work

__all__ = ["Transport", "Work", "DoneWork", "PollingWork", "MPITransport", "TorchTransport",
           "NcclTransport", "init_process_group_from_env", "get"]

# name -> (module, attribute), imported on first access.
_LAZY = {
    "MPITransport": ("squinchcomm.transport.mpi", "MPITransport"),
    "TorchTransport": ("squinchcomm.transport.torch_dist", "TorchTransport"),
    "init_process_group_from_env": ("squinchcomm.transport.torch_dist", "init_process_group_from_env"),
    "NcclTransport": ("squinchcomm.transport.nccl", "NcclTransport"),
}

# get() names -> the class attribute in _LAZY.
_ENGINES = {"mpi": "MPITransport", "torch": "TorchTransport", "nccl": "NcclTransport"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def get(name: str, **kwargs) -> Transport:
    """Build a transport by engine name, importing its engine only now.

    Args:
        name: ``"mpi"``, ``"torch"`` or ``"nccl"``.
        **kwargs: the engine class's constructor arguments.

    Returns:
        The transport.
    """
    if name not in _ENGINES:
        raise ValueError(f"unknown transport {name!r}: pass one of {', '.join(sorted(_ENGINES))}")
    return __getattr__(_ENGINES[name])(**kwargs)
