"""squinchcomm: Squinch 6-bit gradient compression for bandwidth-bound training.

Importing this package imports only the standard library and NumPy; torch,
CuPy, Numba and mpi4py load on first use by the parts that need them.
"""

from squinchcomm import errors
from squinchcomm.errors import (BackendError, MissingDependencyError, SquinchError,
                                TransportError)

__version__ = "0.1.0"
__all__ = ["__version__", "errors", "SquinchError", "MissingDependencyError",
           "BackendError", "TransportError"]
