"""squinchcomm: Squinch 6-bit gradient compression for bandwidth-bound training.

Importing this package imports only the standard library and NumPy; torch,
CuPy, Numba and mpi4py load on first use by the parts that need them.
"""

__version__ = "0.1.0"  # before the imports: submodules record it

from squinchcomm import errors  # noqa: E402
from squinchcomm.collectives import (Communicator, LinkModel, cross_rank, cross_size, init,
                                     is_initialized, local_rank, local_size, rank, shutdown,
                                     size, wire_bytes)
from squinchcomm.threads import share_cores
from squinchcomm.errors import (BackendError, MismatchError, MissingDependencyError,
                                SquinchError, TransportError)

__all__ = ["__version__", "errors", "Communicator", "LinkModel", "init", "shutdown", "is_initialized",
           "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size", "wire_bytes", "share_cores",
           "SquinchError", "MissingDependencyError", "BackendError", "TransportError",
           "MismatchError"]
