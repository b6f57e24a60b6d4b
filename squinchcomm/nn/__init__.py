"""Companion techniques from the family Squinch comes from (PyTorch modules).

Leaves of the package: the core (codec, collectives, transports) never imports
them. Each module is standalone:

- :mod:`squinchcomm.nn.zreg`: Attention Z-Reg, a virtual c * sum(Z^2) loss on
  logit rows injected as a gradient in backward (forward unchanged);
- :mod:`squinchcomm.nn.clamp`: Dynamic Clamping, fake quantization whose clamp
  limit follows the data (straight-through estimator);
- :mod:`squinchcomm.nn.visibility`: visibility-mask attention from per-key
  ``[start, limit)`` query ranges, O(N) mask memory;
- :mod:`squinchcomm.nn.distill`: Gumbel top-k distillation storage with
  unbiased importance weights, sharded files, a teacher dump per (step, rank)
  of a data-parallel run and a student loss.
"""

from squinchcomm.errors import require

require("torch", "torch", "squinchcomm.nn")  # a clear error naming the extra
