"""Models and data of the examples and benchmarks.

- :mod:`squinchcomm.models.corpus`: the byte-level corpus of the Python
  standard library's source (NumPy and the standard library only);
- :mod:`squinchcomm.models.tinygpt`: a small GPT over bytes with the
  companion techniques of :mod:`squinchcomm.nn` as switches (imports torch).

The submodules are not imported here, so the corpus stays usable without
torch: ``from squinchcomm.models import corpus``.
"""

__all__ = ["corpus", "tinygpt"]
