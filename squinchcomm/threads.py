"""Share a node's cores between its ranks: torch's threads and the CPU codec's.

Every rank of a node defaults to one thread per core, in torch and in Numba,
so N ranks on a node oversubscribe it N times over. :func:`share_cores` gives
each rank ``cores // local_size`` threads for both. It is the one place that
sets these process-wide knobs; ``squinchcomm.init()`` and ``hvd.init()``
call it for the codec only, Communicator constructors never do.
"""

from __future__ import annotations

import os
import sys

from squinchcomm import config

__all__ = ["share_cores"]


def share_cores(local_size: int | None = None, *, torch_threads: bool = True) -> int:
    """Give this rank its share of the node's cores; return the share.

    Args:
        local_size: ranks on this node; None: the default communicator's
            (``squinchcomm.local_size()``), or 1 before ``init()``.
        torch_threads: also set ``torch.set_num_threads`` (when torch is
            imported and ``OMP_NUM_THREADS`` is not set).

    Explicit settings win: ``SQUINCHCOMM_CODEC_THREADS`` or
    ``NUMBA_NUM_THREADS`` for the codec, ``OMP_NUM_THREADS`` for torch.

    Example:
        >>> import squinchcomm.torch as hvd                      # doctest: +SKIP
        >>> hvd.init(); squinchcomm.share_cores()                # doctest: +SKIP
    """
    if local_size is None:
        from squinchcomm.collectives import default, is_initialized

        local_size = default().local_size if is_initialized() else 1
    share = max(1, (os.cpu_count() or 1) // max(1, int(local_size)))
    codec_threads = config.env_int("CODEC_THREADS", 0) or (
        None if os.environ.get("NUMBA_NUM_THREADS") else share)
    if codec_threads is not None:
        try:
            from squinchcomm.codec import cpu
        except ImportError:  # no numba: the codec will say which extra to install
            pass
        else:
            cpu.set_threads(codec_threads)
    if torch_threads and "torch" in sys.modules and not os.environ.get("OMP_NUM_THREADS"):
        sys.modules["torch"].set_num_threads(share)
    return share
