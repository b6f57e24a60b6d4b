"""Compressed collectives, written once over any transport.

The package, layer by layer:

- :mod:`.wire`: the wire codecs (Squinch; fp16/bf16 from
  :mod:`squinchcomm.codec.cast`) and :func:`wire_bytes`, the one formula for
  what a collective puts on the wire;
- :mod:`.error_feedback`: the per-rank residual store;
- :mod:`.engine`: the ordered progress engine (one thread per group) and
  the :class:`Handle` of an operation in flight;
- :mod:`.algorithms`: the algorithms as numbered steps (compressed and
  hierarchical allreduce, reduce-scatter, allgather, broadcast, alltoall);
- :mod:`.policy`: ``compression="auto"``, the link model and its probe;
- :mod:`.communicator`: validation, topology and the public methods;
- :mod:`.default`: ``squinchcomm.init()`` and the default communicator.
"""

from squinchcomm.collectives.algorithms import chunk_bounds, shard_bounds
from squinchcomm.collectives.communicator import OPS, Communicator, check_agreement
from squinchcomm.collectives.default import (cross_rank, cross_size, default, init,
                                             is_initialized, local_rank, local_size, rank,
                                             shutdown, size)
from squinchcomm.collectives.engine import Engine, Handle
from squinchcomm.collectives.error_feedback import ErrorFeedback
from squinchcomm.collectives.policy import CHOICES, LinkModel
from squinchcomm.collectives.wire import COMPRESSIONS, payload_bytes, wire_bytes

__all__ = ["Communicator", "Handle", "Engine", "ErrorFeedback", "COMPRESSIONS", "CHOICES",
           "LinkModel", "OPS",
           "shard_bounds", "chunk_bounds", "check_agreement", "wire_bytes", "payload_bytes",
           "init", "shutdown", "is_initialized", "default", "rank", "size", "local_rank",
           "local_size", "cross_rank", "cross_size"]
