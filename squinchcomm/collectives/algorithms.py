"""The algorithms of the collectives, written once over any transport.

Each algorithm is a generator: every ``yield`` hands a transport
:class:`~squinchcomm.transport.base.Work` to the engine, which waits for it
and resumes the generator; the value it returns is the result. Inputs and
outputs are internal :class:`~squinchcomm.codec._arrays.Flat` buffers (NumPy
on the host, CuPy on a GPU); ``n`` is the element count.

The compressed allreduce (ARCHITECTURE.md section 4):

1. (optional) error feedback: add this tensor's residual from the last step;
2. encode the tensor; shards are 8-element-block aligned, so shard r's
   payload is a contiguous slice of the tensor's payload;
3. all-to-all of encoded shards: rank r receives shard r from every rank;
4. decode-accumulate the N shards in fp32 (the reduce-scatter result);
5. re-encode the reduced shard (optional second error-feedback residual),
   fused with step 4;
6. all-gather the encoded shards; every rank decodes the same bytes, so the
   results are bit-identical on every rank.

Large tensors run these steps in block-aligned chunks so that one chunk's
exchange overlaps the codec work on the next (:func:`compressed_allreduce`).
The reduce-scatter is steps 1-4 over any split of the tensor; the
hierarchical allreduce reduce-scatters inside a node uncompressed, runs
steps 1-6 across nodes on one slice per local rank, and all-gathers the
slices inside the node.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from squinchcomm import codec
from squinchcomm.codec import _arrays
from squinchcomm.codec.cast import array_module, as_f32, store
from squinchcomm.collectives.error_feedback import ErrorFeedback
from squinchcomm.transport.base import Transport

__all__ = ["Plan", "shard_bounds", "chunk_bounds", "allreduce", "compressed_allreduce",
           "hierarchical_allreduce", "reduce_scatter", "allgather", "broadcast", "alltoall"]

_INTEGER = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def shard_bounds(n: int, world: int) -> list[int]:
    """Block-aligned shard boundaries: shard r is elements [b[r], b[r+1]).

    Every boundary but the last is a multiple of 8, so the payloads of the
    shards, concatenated, are the payload of the whole tensor.
    """
    blocks = -(-n // codec.BLOCK)
    per = -(-blocks // world)
    return [min(n, r * per * codec.BLOCK) for r in range(world + 1)]


def chunk_bounds(n: int, per: int) -> list[int]:
    """Boundaries of the pipelined allreduce's chunks: ``per`` elements each
    (rounded up to whole 8-blocks), the last one shorter; one chunk when
    ``per`` is 0 or covers ``n``."""
    if per <= 0 or n <= per:
        return [0, n]
    per = -(-per // codec.BLOCK) * codec.BLOCK
    return list(range(0, n, per)) + [n]


@dataclass
class Plan:
    """One collective's resolved options (made by the Communicator).

    Attributes:
        wire: the wire codec (``collectives.wire.get_wire``); None: uncompressed.
        scale: the factor after the sum (1/N for an average, times postscale).
        prescale: the factor before the sum.
        ef: the error-feedback store, or None (no error feedback).
        ef_name: the tensor's residual name (with ``ef``).
        cid: the call id, equal on every rank (seeds unnamed calls).
        seed: the base seed of stochastic rounding.
        pipeline: elements per chunk of the compressed allreduce (0: one piece).
        timings: a dict accumulating seconds per stage, or None.
        rounding: Squinch's rounding (None for the other wires), for the
            metadata check.
        op: the transport's reduction of the uncompressed path: "sum" (sums
            and averages), "min", "max" or "product".
        postscale: the caller's factor after the reduction (in ``scale``
            too); integers follow Horovod's arithmetic when it is not 1.
    """

    wire: Any
    scale: float = 1.0
    prescale: float = 1.0
    ef: ErrorFeedback | None = None
    ef_name: str | None = None
    cid: int = 0
    seed: int = 0
    pipeline: int = 0
    timings: dict | None = None
    rounding: str | None = None
    op: str = "sum"
    postscale: float = 1.0

    def residuals(self, kind: str, n: int, shard: int, like, world: int):
        """(first-stage residual, second-stage residual, step), or (None, None, cid)."""
        if self.ef is None:
            return None, None, self.cid
        entry = self.ef.get(f"{kind}/{world}/{self.ef_name}", n, shard, like, world)
        entry["step"] += 1
        return entry["residual"], entry["shard_residual"], entry["step"]

    def seed_for(self, step: int, rank, stage: int) -> int:
        """The stochastic-rounding seed of one stage (equal where ranks must agree)."""
        digest = hashlib.blake2b(f"{self.seed}/{self.ef_name}/{step}/{rank}/{stage}".encode(),
                                 digest_size=8).digest()
        return int.from_bytes(digest, "little")


class _Clock:
    """Accumulates wall time per stage into ``timings`` (no-op when None). The
    exchange stages include the time spent waiting for the slowest peer; GPU
    stages synchronize the stream first so the split is honest."""

    def __init__(self, timings: dict | None, xp):
        self.timings, self.xp = timings, xp
        self.t = time.perf_counter() if timings is not None else 0.0

    def lap(self, stage: str):
        if self.timings is None:
            return
        if self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.t
        self.t = now


def _part(flat: _arrays.Flat, lo: int, hi: int) -> _arrays.Flat:
    return _arrays.Flat(flat.data[lo:hi], flat.kind, flat.family, flat.device, None)


def _accumulator(kind: str) -> str:
    """The dtype uncompressed sums run in: fp32 for the float kinds, float64
    for float64, int64 for integers (exact)."""
    if kind == "float64":
        return "float64"
    if kind in _INTEGER or kind == "bool":
        return "int64"
    return "float32"


def _widen(x: _arrays.Flat, acc: str, xp, prescale: float = 1.0):
    """A fresh ``acc`` copy of ``x``'s values, times ``prescale`` (integers as
    Horovod scales them: in float64, truncated toward zero)."""
    if acc == "float32":
        buf = as_f32(x.data, xp, x.kind).astype(xp.float32, copy=True)
    elif acc == "int64" and prescale != 1.0:
        return (x.data.astype(xp.float64) * prescale).astype(xp.int64)
    else:
        buf = x.data.astype(acc, copy=True)
    if prescale != 1.0:
        buf *= buf.dtype.type(prescale)
    return buf


def _scale_into(buf, plan: Plan, average_of: int, dst: _arrays.Flat, xp):
    """``dst = buf * plan.scale`` in ``buf``'s dtype. Integers: an average
    without postscale truncates the exact sum toward zero (``average_of``
    ranks); with a postscale they are scaled as Horovod does, in float64 by
    postscale/N and truncated toward zero. Bool results: any rank's True for
    sums and averages (Horovod's logical or), min/max/product as and/or/and."""
    scale = plan.scale
    if dst.kind == "bool":
        dst.data[:] = buf > 0
        return dst
    if buf.dtype.kind in "iu":
        if plan.postscale != 1.0:
            buf = (buf.astype(xp.float64) * scale).astype(xp.int64)
        elif average_of > 1:
            buf = xp.sign(buf) * (xp.abs(buf) // average_of)
        dst.data[:] = buf.astype(dst.data.dtype)
        return dst
    if scale != 1.0:
        buf *= buf.dtype.type(scale)
    if dst.kind in ("float32", "float16", "bfloat16"):
        return store(buf.astype(xp.float32, copy=False), dst, xp)
    dst.data[:] = buf
    return dst


# ----------------------------------------------------------------------------
# Allreduce
# ----------------------------------------------------------------------------
def allreduce(t: Transport, plan: Plan, x: _arrays.Flat, n: int, dst: _arrays.Flat, *,
              local: Transport | None = None, cross: Transport | None = None,
              average_of: int = 0):
    """Reduce ``x`` into ``dst``: the engine's own sum when uncompressed, else
    the compressed (or hierarchical, with ``local``/``cross``) algorithm."""
    xp = array_module(x.data)
    if plan.wire is None:
        # The engine's own reduction, in the accumulator dtype (exact sums of
        # fp16/bf16 in fp32, of float64 in float64, of integers in int64).
        buf = _widen(x, _accumulator(x.kind), xp, plan.prescale)
        yield t.allreduce(buf, plan.op)
        return _scale_into(buf, plan, average_of, dst, xp)
    if plan.prescale != 1.0:
        x = _arrays.Flat(as_f32(x.data, xp, x.kind) * xp.float32(plan.prescale), "float32",
                         x.family, x.device, None)
    if local is not None:
        return (yield from hierarchical_allreduce(local, cross, plan, x, n, dst))
    return (yield from compressed_allreduce(t, plan, x, n, dst))


def compressed_allreduce(t: Transport, plan: Plan, x: _arrays.Flat, n: int, dst: _arrays.Flat,
                         payload_out=None):
    """Steps 1-6 of the module docstring over transport ``t``, pipelined.

    With ``payload_out`` (``wire.nbytes(n)`` bytes) step 6 gathers the
    result's payload into it and does not decode (``dst`` unused): the
    hierarchical allreduce shares payloads inside the node instead of fp32.

    The tensor is cut into block-aligned chunks of ``plan.pipeline``
    elements; the exchanges of a chunk are started without waiting, so chunk
    k's all-to-all is on the wire while chunk k+1 is encoded and chunk k-1 is
    reduced and decoded. The order of exchanges (all-to-all k+1, then
    all-gather k) is the same on every rank. Chunk and shard boundaries are
    multiples of 8 and rounding draws from global indices, so every block and
    every sum is the same as in one piece: the result does not depend on the
    chunk size.
    """
    wire = plan.wire
    xp = array_module(x.data)
    world, rank = t.size, t.rank
    chunks = []  # (start, stop, shard bounds inside the chunk, payload bytes per shard)
    edges = chunk_bounds(n, plan.pipeline)
    starts = [wire.nbytes(lo) for lo in edges]  # chunks are block-aligned: payload offsets
    for lo, hi in zip(edges, edges[1:]):
        b = shard_bounds(hi - lo, world)
        chunks.append((lo, hi, b, [wire.nbytes(b[r + 1] - b[r]) for r in range(world)]))
    mine = [b[rank + 1] - b[rank] for _, _, b, _ in chunks]  # this rank's shard per chunk
    at = np.cumsum([0] + mine)  # where each chunk's shard sits in the shard residual
    res1, res2, step = plan.residuals("allreduce", n, int(at[-1]), x.data, world)
    # Stage 2 reduces every element exactly once, wherever its shard lies: one
    # seed for all ranks keeps its rounding independent of the partition.
    seed1, seed2 = plan.seed_for(step, rank, 1), plan.seed_for(step, "all", 2)
    clock = _Clock(plan.timings, xp)
    exchanges = {}  # chunk -> (Work, the buffers it reads and writes)

    def send(k):
        # Steps 1-3: encode chunk k, start the all-to-all of its shards.
        lo, hi, _, nb = chunks[k]
        payload = xp.empty(sum(nb), xp.uint8)  # (sum_r bytes(shard r),)
        wire.encode(_part(x, lo, hi), payload, None if res1 is None else res1[lo:hi], seed1,
                    offset=lo)
        clock.lap("encode")
        recv = xp.empty(world * nb[rank], xp.uint8)  # (world * bytes(my shard),)
        exchanges[k] = (t.alltoallv(payload, nb, recv, [nb[rank]] * world), payload, recv)

    def reduce(k):
        # Steps 4-5 for chunk k's shard, then start the all-gather of step 6.
        lo, _, b, nb = chunks[k]
        work, _, recv = exchanges.pop(k)
        yield work
        clock.lap("alltoall")
        reduced = xp.empty(nb[rank], xp.uint8)
        wire.reduce_encode(recv.reshape(world, nb[rank]), mine[k], plan.scale, reduced,
                           None if res2 is None else res2[at[k]:at[k + 1]], seed2, lo + b[rank])
        clock.lap("reduce_encode")
        gathered = (xp.empty(sum(nb), xp.uint8) if payload_out is None  # (sum_r bytes(shard r),)
                    else payload_out[starts[k]:starts[k] + sum(nb)])
        exchanges[-1 - k] = (t.allgatherv(reduced, gathered, nb), reduced, gathered)

    def finish(k):
        # Step 6: decode chunk k; every rank decodes the same bytes.
        lo, hi, _, _ = chunks[k]
        work, _, gathered = exchanges.pop(-1 - k)
        yield work
        clock.lap("allgather")
        if payload_out is None:
            wire.decode(gathered, hi - lo, _part(dst, lo, hi))
            clock.lap("decode")

    for k in range(len(chunks) + 2):
        if k < len(chunks):
            send(k)
        if 0 <= k - 1 < len(chunks):
            yield from reduce(k - 1)
        if 0 <= k - 2 < len(chunks):
            yield from finish(k - 2)
    return dst


def hierarchical_allreduce(local: Transport, cross: Transport, plan: Plan, x: _arrays.Flat,
                           n: int, dst: _arrays.Flat):
    """Reduce-scatter inside the node uncompressed; each local rank allreduces
    its block-aligned slice across nodes, compressed; share the slices'
    payloads in the node and decode them all."""
    xp = array_module(x.data)
    # Step 1: local rank l gets slice l of the node's fp32 sum (an uncompressed
    # reduce-scatter: an all-to-all of the slices, summed in local rank order,
    # half the node-local bytes of a whole-tensor allreduce).
    lb = shard_bounds(n, local.size)
    lo, hi = lb[local.rank], lb[local.rank + 1]
    node_slice = yield from reduce_scatter(local, Plan(wire=None), x, n, lb)  # (hi - lo,)
    # Step 2: local rank l allreduces slice l across the nodes, compressed.
    piece = _arrays.Flat(node_slice, "float32", x.family, x.device, None)
    if plan.ef_name is not None:
        plan = Plan(**{**plan.__dict__, "ef_name": f"{plan.ef_name}/node-slice{local.rank}"})
    wire = plan.wire
    counts = [wire.nbytes(lb[r + 1] - lb[r]) for r in range(local.size)]  # payload per slice
    payload = xp.empty(sum(counts), xp.uint8)  # the whole tensor's payload (slices block-aligned)
    at = sum(counts[:local.rank])
    yield from compressed_allreduce(cross, plan, piece, hi - lo, None,
                                    payload_out=payload[at:at + counts[local.rank]])
    # Step 3: every local rank gets every slice's payload (0.75 B per element
    # for Squinch instead of 4 in fp32) and decodes the whole tensor: the same
    # bytes on every rank of every node, so the same result everywhere.
    full = xp.empty(sum(counts), xp.uint8)
    yield local.allgatherv(payload[at:at + counts[local.rank]], full, counts)
    if dst.kind == "float32":
        wire.decode(full, n, dst)
        return dst
    out = xp.empty(n, xp.float32)
    wire.decode(full, n, _arrays.Flat(out, "float32", x.family, x.device, None))
    return store(out, dst, xp)


# ----------------------------------------------------------------------------
# Reduce-scatter, allgather, broadcast, alltoall
# ----------------------------------------------------------------------------
def reduce_scatter(t: Transport, plan: Plan, x: _arrays.Flat, n: int, bounds: list[int],
                   average_of: int = 0):
    """Steps 1-4: reduce ``x`` and return this rank's part
    ``[bounds[rank], bounds[rank+1])`` (fp32 for float kinds; float64 or
    int64 uncompressed for the others).

    Every rank's part is encoded on its own from its first element, so a
    split that is not block-aligned (Horovod's row splits) still quantizes
    each element once; with block-aligned bounds the bytes are those of the
    whole tensor's payload.
    """
    xp = array_module(x.data)
    world, rank = t.size, t.rank
    counts = [bounds[r + 1] - bounds[r] for r in range(world)]
    mine = counts[rank]
    if plan.wire is None:
        # Steps 2-4 uncompressed: all-to-all of the parts in the accumulator dtype
        # (fp32 input is sent as it is: the transport only reads it).
        acc = _accumulator(x.kind)
        buf = (x.data if x.kind == acc == "float32" and plan.prescale == 1.0
               else _widen(x, acc, xp, plan.prescale))  # (n,)
        recv = xp.empty(world * mine, buf.dtype)  # (world * mine,)
        yield t.alltoallv(buf, counts, recv, [mine] * world)
        rows = recv.reshape(world, mine)
        shard = rows[0].copy()
        for row in rows[1:]:  # in rank order: the same sum everywhere
            shard += row
        out = _arrays.Flat(xp.empty(mine, buf.dtype), str(buf.dtype), "cupy" if xp is not np
                           else "numpy", x.device, None)
        return _scale_into(shard, plan, average_of, out, xp).data
    wire = plan.wire
    if plan.prescale != 1.0:
        x = _arrays.Flat(as_f32(x.data, xp, x.kind) * xp.float32(plan.prescale), "float32",
                         x.family, x.device, None)
    # Step 1: this tensor's residual (the whole tensor; no second stage).
    res1, _, step = plan.residuals("reduce_scatter", n, 0, x.data, world)
    seed = plan.seed_for(step, rank, 1)
    # Pipelined like the allreduce: every part is cut into chunks of
    # plan.pipeline elements, multiples of 8 from the part's own start, so the
    # blocks (and the bytes) are those of the part in one piece; chunk k's
    # all-to-all is on the wire while chunk k+1 is encoded and chunk k-1
    # decoded, in the same order on every rank.
    pieces = [chunk_bounds(c, plan.pipeline) for c in counts]  # per part, from its start
    chunks = max(len(e) - 1 for e in pieces)
    shard = xp.zeros(mine, xp.float32)
    exchanges = {}

    def piece(r, k):  # (start, stop) of part r's chunk k, relative to the part
        e = pieces[r]
        return (e[k], e[k + 1]) if k + 1 < len(e) else (e[-1], e[-1])

    def send(k):
        # Step 2: encode chunk k of every rank's part, from the part's own blocks.
        spans = [piece(r, k) for r in range(world)]
        nbytes = [wire.nbytes(b - a) for a, b in spans]
        pos = np.cumsum([0] + nbytes)
        payload = xp.empty(int(pos[-1]), xp.uint8)  # (sum_r bytes(chunk k of part r),)
        for r, (a, b) in enumerate(spans):
            lo = bounds[r] + a
            if b > a:
                wire.encode(_part(x, lo, lo + b - a), payload[pos[r]:pos[r + 1]],
                            None if res1 is None else res1[lo:lo + b - a], seed, offset=lo)
        # Step 3: rank r receives chunk k of part r from every rank.
        recv = xp.empty(world * nbytes[rank], xp.uint8)  # (world * bytes(my chunk),)
        exchanges[k] = (t.alltoallv(payload, nbytes, recv, [nbytes[rank]] * world), payload,
                        recv, nbytes[rank], spans[rank])

    def finish(k):
        # Step 4: decode-accumulate chunk k of this rank's part in fp32, in rank order.
        work, _, recv, nb, (a, b) = exchanges.pop(k)
        yield work
        if b > a:
            wire.decode_accumulate(recv.reshape(world, nb), b - a, shard[a:b], plan.scale)

    for k in range(chunks + 1):
        if k < chunks:
            send(k)
        if k >= 1:
            yield from finish(k - 1)
    return shard


def allgather(t: Transport, plan: Plan, x: _arrays.Flat, counts: list[int]):
    """Concatenate every rank's ``x`` (``counts[r]`` elements) in rank order;
    returns the flat result in ``x``'s storage dtype."""
    xp = array_module(x.data)
    if plan.wire is None:
        recv = xp.empty(sum(counts), x.data.dtype)
        yield t.allgatherv(x.data, recv, counts)
        return recv
    wire = plan.wire
    nbytes = [wire.nbytes(c) for c in counts]
    payload = xp.empty(nbytes[t.rank], xp.uint8)
    wire.encode(x, payload, None, plan.seed_for(plan.cid, t.rank, 3))
    gathered = xp.empty(sum(nbytes), xp.uint8)
    yield t.allgatherv(payload, gathered, nbytes)
    out = xp.empty(sum(counts), x.data.dtype)
    pos, el = np.cumsum([0] + nbytes), np.cumsum([0] + counts)
    for r in range(t.size):  # every rank decodes the same bytes
        wire.decode(gathered[pos[r]:pos[r + 1]], counts[r],
                    _arrays.Flat(out[el[r]:el[r + 1]], x.kind, x.family, x.device, None))
    return out


def broadcast(t: Transport, plan: Plan, x: _arrays.Flat, n: int, root: int):
    """Copy ``x`` from ``root`` in place; compressed, every rank (the root
    too) decodes the root's payload, so all ranks hold the same values."""
    if plan.wire is None:
        yield t.broadcast(x.data, root)
        return x
    xp = array_module(x.data)
    payload = xp.empty(plan.wire.nbytes(n), xp.uint8)
    if t.rank == root:
        plan.wire.encode(x, payload, None, plan.seed_for(plan.cid, root, 4))
    yield t.broadcast(payload, root)
    plan.wire.decode(payload, n, x)
    return x


def alltoall(t: Transport, plan: Plan, x: _arrays.Flat, splits: list[int],
             recv_splits: list[int]):
    """Send ``splits[r]`` elements to rank r; returns the received flat array.
    Compressed, each split is encoded on its own and decoded on arrival."""
    xp = array_module(x.data)
    recv = xp.empty(sum(recv_splits), x.data.dtype)
    if plan.wire is None:
        yield t.alltoallv(x.data, splits, recv, recv_splits)
        return recv
    wire = plan.wire
    send_b = [wire.nbytes(c) for c in splits]
    recv_b = [wire.nbytes(c) for c in recv_splits]
    payload = xp.empty(sum(send_b), xp.uint8)
    el, pos = np.cumsum([0] + splits), np.cumsum([0] + send_b)
    for r in range(t.size):  # each split on its own: block boundaries differ
        wire.encode(_part(x, el[r], el[r + 1]), payload[pos[r]:pos[r + 1]], None,
                    plan.seed_for(plan.cid, r, 5))
    got = xp.empty(sum(recv_b), xp.uint8)
    yield t.alltoallv(payload, send_b, got, recv_b)
    el, pos = np.cumsum([0] + recv_splits), np.cumsum([0] + recv_b)
    for r in range(t.size):
        wire.decode(got[pos[r]:pos[r + 1]], recv_splits[r],
                    _arrays.Flat(recv[el[r]:el[r + 1]], x.kind, x.family, x.device, None))
    return recv
