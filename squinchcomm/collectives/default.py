"""The default communicator: ``squinchcomm.init()``, ``rank()``, ``size()``, ..."""

from __future__ import annotations

import threading

from squinchcomm.collectives.communicator import Communicator

__all__ = ["init", "shutdown", "is_initialized", "default", "rank", "size", "local_rank",
           "local_size", "cross_rank", "cross_size"]

_DEFAULT: Communicator | None = None


def init(transport=None, **options) -> Communicator:
    """Create the default communicator and return it.

    Also gives the CPU codec this rank's share of the node's cores
    (:func:`squinchcomm.share_cores`, codec only), and starts compiling the
    CPU codec's kernels in a background thread (:func:`squinchcomm.codec.warm_up`:
    about 22 s on a fresh 2-core machine, once per machine, under a second from
    Numba's cache afterwards), so that the compilation overlaps the caller's
    own setup instead of the first collective. ``SQUINCHCOMM_WARMUP=0`` turns
    that off.

    Args:
        transport: "mpi" (default; MPI COMM_WORLD), "torch" (torch.distributed,
            initialized from torchrun's or mpirun's environment if needed), a
            Transport, an mpi4py communicator or a torch process group.
        **options: :class:`Communicator` options (compression, rounding, ...).

    Example:
        >>> import squinchcomm                                   # doctest: +SKIP
        >>> squinchcomm.init("torch", compression="squinch")     # doctest: +SKIP
    """
    global _DEFAULT
    if transport == "torch":
        from squinchcomm.transport.torch_dist import TorchTransport, init_process_group_from_env
        import torch.distributed as dist

        from squinchcomm import config

        timeout = options.get("timeout") or config.timeout()
        if not dist.is_initialized():
            # The library's timeout, not torch's 30 minutes: a rank that never
            # arrives fails the others' rendezvous with an error.
            init_process_group_from_env(timeout=timeout)
        transport = TorchTransport(timeout=timeout)
    elif transport == "mpi":
        transport = None
    elif isinstance(transport, str):
        raise ValueError(f"transport={transport!r}: use 'mpi', 'torch' or a communicator object")
    comm = Communicator(transport, **options)
    from squinchcomm.threads import share_cores

    share_cores(comm.local_size, torch_threads=False)
    _start_warm_up()
    _DEFAULT = comm
    return comm


def _start_warm_up():
    from squinchcomm import config

    if not config.env_bool("WARMUP", True) or config.codec_backend() != "numba":
        return
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        return  # the codec raises its own error (naming the extra) when used
    from squinchcomm import codec

    threading.Thread(target=codec.warm_up, name="squinchcomm-warmup", daemon=True).start()


def shutdown():
    """Finish the default communicator's operations and forget it (the
    engines stay initialized; interpreter exit stops their threads)."""
    global _DEFAULT
    if _DEFAULT is not None:
        _DEFAULT.synchronize()
    _DEFAULT = None


def is_initialized() -> bool:
    return _DEFAULT is not None


def default() -> Communicator:
    """The communicator made by :func:`init`; ValueError before it."""
    if _DEFAULT is None:
        raise ValueError("squinchcomm is not initialized: call squinchcomm.init() "
                         "(or squinchcomm.torch.init()) first")
    return _DEFAULT


def rank() -> int:
    return default().rank


def size() -> int:
    return default().size


def local_rank() -> int:
    return default().local_rank


def local_size() -> int:
    return default().local_size


def cross_rank() -> int:
    return default().cross_rank


def cross_size() -> int:
    return default().cross_size
