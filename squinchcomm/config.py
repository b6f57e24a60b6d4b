"""Configuration from ``SQUINCHCOMM_*`` environment variables, parsed in one place.

Constructor and function arguments always win; these are only the defaults.

| variable | meaning | default |
|---|---|---|
| SQUINCHCOMM_CODEC_BACKEND | host codec backend: ``numba`` or ``oracle`` | ``numba`` |
"""

from __future__ import annotations

import os

__all__ = ["PREFIX", "env_choice", "codec_backend"]

PREFIX = "SQUINCHCOMM_"


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """Read ``SQUINCHCOMM_<name>``; raise ValueError naming the choices if it is not one."""
    raw = os.environ.get(PREFIX + name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ValueError(f"{PREFIX}{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def codec_backend() -> str:
    """The default host codec backend (``SQUINCHCOMM_CODEC_BACKEND``)."""
    return env_choice("CODEC_BACKEND", ("numba", "oracle"), "numba")
