"""Wire codecs of the collectives, and the bytes they put on the wire.

A wire codec turns float data into the bytes one rank sends and back, with
the operations the algorithms need (``encode``, ``reduce_encode``,
``decode_accumulate``, ``decode``, ``nbytes``). Squinch is
:class:`SquinchWire`; fp16/bf16 are :class:`squinchcomm.codec.cast.CastWire`.
:func:`wire_bytes` is the one formula for what a collective sends per rank,
used by the benchmarks, the parity experiment, the report and the examples.
"""

from __future__ import annotations

from squinchcomm import codec
from squinchcomm.codec import _arrays
from squinchcomm.codec.cast import CastWire

__all__ = ["COMPRESSIONS", "SquinchWire", "get_wire", "payload_bytes", "wire_bytes"]

COMPRESSIONS = ("none", "fp16", "bf16", "squinch")


class SquinchWire:
    """Squinch blocks on the wire (6 bytes per 8 elements), fp32 sums."""

    name = "squinch"

    def __init__(self, rounding: str):
        self.rounding = rounding

    nbytes = staticmethod(codec.encoded_nbytes)

    def encode(self, x: _arrays.Flat, out, residual, seed, offset=0):
        codec.encode(x, out=out, residual=residual, rounding=self.rounding, seed=seed,
                     offset=offset)

    def reduce_encode(self, stack, n, scale, out, residual, seed, offset):
        codec.reduce_encode(stack, n, scale=scale, out=out, residual=residual,
                            rounding=self.rounding, seed=seed, offset=offset)

    def decode_accumulate(self, stack, n, out, scale):
        codec.decode_accumulate(stack, n, out, scale=scale)

    def decode(self, payload, n, out: _arrays.Flat):
        codec.decode(payload, n, out=out)


def get_wire(compression: str, rounding: str = "nearest"):
    """The wire codec of ``compression`` ("squinch", "fp16" or "bf16")."""
    if compression == "squinch":
        return SquinchWire(rounding)
    if compression in ("fp16", "bf16"):
        return CastWire("float16" if compression == "fp16" else "bfloat16")
    raise ValueError(f"compression={compression!r} has no wire codec: choose squinch, fp16 or bf16")


def payload_bytes(n: int, compression: str) -> int:
    """Bytes of ``n`` elements in ``compression``'s wire format (none: fp32)."""
    if compression == "squinch":
        return codec.encoded_nbytes(n)
    if compression in ("fp16", "bf16"):
        return 2 * n
    if compression in ("none", "fp32"):
        return 4 * n
    raise ValueError(f"compression={compression!r}: choose one of {', '.join(COMPRESSIONS)}")


def wire_bytes(n: int, world: int, compression: str = "squinch", *,
               collective: str = "allreduce", hierarchical: bool = False,
               local_size: int = 1) -> float:
    """Bytes each rank sends for one collective over ``n`` elements (ring model).

    The compressed allreduce sends ``2(N-1)/N`` payloads per rank (all-to-all
    then all-gather of ``N`` shards), the fp32 ring allreduce the same in fp32;
    a reduce-scatter or an all-gather sends ``(N-1)/N``. Hierarchical mode
    counts only the bytes that cross nodes: each of the ``local_size`` ranks
    of a node allreduces a ``1/local_size`` slice over the ``world /
    local_size`` nodes.

    Args:
        n: elements of the tensor.
        world: ranks taking part.
        compression: "none" (fp32), "fp16", "bf16" or "squinch".
        collective: "allreduce", "reduce_scatter" or "allgather".
        hierarchical: count the cross-node bytes of the hierarchical allreduce.
        local_size: ranks per node (hierarchical only).

    Example:
        >>> wire_bytes(8_000_000, 4, "squinch") / wire_bytes(8_000_000, 4, "none")
        0.1875
    """
    if collective not in ("allreduce", "reduce_scatter", "allgather"):
        raise ValueError(f"collective={collective!r}: choose allreduce, reduce_scatter or allgather")
    if hierarchical:
        if local_size < 1 or world % local_size:
            raise ValueError(f"local_size={local_size} does not divide world={world}")
        world, n = world // local_size, -(-n // local_size)
    if world <= 1:
        return 0.0
    passes = 2 if collective == "allreduce" else 1
    return passes * (world - 1) / world * payload_bytes(n, compression)
