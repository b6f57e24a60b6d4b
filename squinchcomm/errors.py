"""The library's exceptions (stdlib only)."""

from __future__ import annotations

__all__ = ["SquinchError", "MissingDependencyError", "BackendError", "TransportError",
           "MismatchError"]


class SquinchError(RuntimeError):
    """Base class of the library's runtime errors."""


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the extra."""


class BackendError(SquinchError):
    """A compute backend (Numba, CUDA) failed: compilation, launch or device error."""


class TransportError(SquinchError):
    """A communication engine failed or a peer did not answer in time."""


class MismatchError(ValueError, SquinchError):
    """Ranks called a collective differently (shape, dtype, kind, name,
    settings). Raised with the same message on every rank. Both a ValueError
    (bad input) and a RuntimeError (what Horovod raises for a mismatch), so
    either ``except`` catches it."""


def require(module: str, extra: str, what: str):
    """Import and return ``module``, or raise MissingDependencyError naming the extra.

    Args:
        module: the module to import, e.g. ``"numba"``.
        extra: the pyproject extra that installs it, e.g. ``"cpu"``.
        what: what needs it, for the message.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{what} needs the '{module}' package, which is not installed: "
            f"pip install 'squinchcomm[{extra}]'") from exc
