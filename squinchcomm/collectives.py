"""Compressed collectives, written once over any transport.

The Squinch allreduce (ARCHITECTURE.md section 4) in six steps:

1. (optional) error feedback: add this tensor's residual from the last step;
2. encode the whole tensor; shards are 8-element-block aligned, so shard r's
   payload is a contiguous slice of the tensor's payload;
3. all-to-all of encoded shards: rank r receives shard r from every rank;
4. decode-accumulate the N shards in fp32 (the reduce-scatter result);
5. re-encode the reduced shard (optional second error-feedback residual),
   fused with step 4;
6. all-gather the encoded shards; every rank decodes the same bytes, so the
   results are bit-identical on every rank.

Large tensors run these steps in chunks (``pipeline_bytes``, 16 MiB of fp32 by
default) so that one chunk's exchange overlaps the codec work on the next.

fp16/bf16 compression runs the same algorithm with a cast codec (Horovod's
fp16 compression on the wire, fp32 accumulation); ``none`` uses the engine's
own allreduce. Every operation is a generator of transport ``Work`` driven by
a :class:`Handle`, so blocking and non-blocking calls share one code path.

Example (under ``mpirun -n 4``):
    >>> import numpy as np, squinchcomm
    >>> comm = squinchcomm.Communicator()                 # MPI COMM_WORLD
    >>> g = np.random.default_rng(comm.rank).standard_normal(1000).astype(np.float32)
    >>> avg = comm.allreduce(g, op="average", compression="squinch")
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Generator

import numpy as np

from squinchcomm import codec, config
from squinchcomm.codec import _arrays, baselines
from squinchcomm.transport.base import Transport, Work

__all__ = ["Communicator", "Handle", "ErrorFeedback", "COMPRESSIONS", "OPS", "shard_bounds",
           "check_agreement",
           "init", "shutdown", "is_initialized", "default", "rank", "size", "local_rank",
           "local_size", "cross_rank", "cross_size"]

COMPRESSIONS = ("none", "fp16", "bf16", "squinch")
OPS = ("average", "sum")


def shard_bounds(n: int, world: int) -> list[int]:
    """Block-aligned shard boundaries: shard r is elements [b[r], b[r+1]).

    Every boundary but the last is a multiple of 8, so the payloads of the
    shards, concatenated, are the payload of the whole tensor.
    """
    blocks = -(-n // codec.BLOCK)
    per = -(-blocks // world)
    return [min(n, r * per * codec.BLOCK) for r in range(world + 1)]


def _chunk_bounds(n: int, per: int) -> list[int]:
    """Boundaries of the pipelined allreduce's chunks: ``per`` elements each
    (rounded up to whole 8-blocks), the last one shorter; one chunk when
    ``per`` is 0 or covers ``n``."""
    if per <= 0 or n <= per:
        return [0, n]
    per = -(-per // codec.BLOCK) * codec.BLOCK
    return list(range(0, n, per)) + [n]


# ----------------------------------------------------------------------------
# Codecs on the wire: Squinch, and fp16/bf16 casts with fp32 accumulation.
# Inputs and outputs are internal Flats (NumPy/CuPy data + kind); payloads
# and residuals are plain NumPy/CuPy arrays.
# ----------------------------------------------------------------------------
class _SquinchWire:
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


class _CastWire:
    """fp16/bf16 on the wire (2 bytes per element, uint16 bits), sums in fp32.

    Host arrays run the fused, parallel Numba kernels of ``codec.cpu``; CuPy
    arrays, and host arrays under ``SQUINCHCOMM_CODEC_BACKEND=oracle``, run
    the array-module code below, which is the reference the kernels are
    tested against bit for bit (tests/test_cast_wire.py).
    """

    def __init__(self, kind: str):
        self.name, self.kind = kind, kind

    @staticmethod
    def nbytes(n):
        return 2 * n

    @staticmethod
    def _kernels(xp):
        """``codec.cpu`` when the Numba kernels serve this call, else None."""
        if xp is not np or config.codec_backend() != "numba":
            return None
        from squinchcomm.errors import require

        require("numba", "cpu", "fp16/bf16 compression on the CPU (or set "
                "SQUINCHCOMM_CODEC_BACKEND=oracle)")
        from squinchcomm.codec import cpu

        return cpu

    def _values(self, payload, xp):
        return _as_f32(payload.view(xp.uint16), xp, self.kind)

    def encode(self, x: _arrays.Flat, out, residual, seed, offset=0):
        xp = _xp(x.data)
        kernels = self._kernels(xp)
        if kernels is not None:
            kernels.cast_encode(x.data, x.kind, self.kind, out.view(np.uint16), residual)
            return
        v = _as_f32(x.data, xp, x.kind)
        if residual is not None:
            v = v + residual
        out.view(xp.uint16)[:] = _from_f32(v, self.kind, xp)
        if residual is not None:
            residual[:] = v - self._values(out, xp)

    def _sum(self, stack, n, scale, xp):
        total = xp.zeros(n, xp.float32)
        for row in stack:  # in rank order from +0: the same sum on every rank
            total += self._values(row, xp)
        return total * xp.float32(scale)

    def reduce_encode(self, stack, n, scale, out, residual, seed, offset):
        xp = _xp(stack)
        kernels = self._kernels(xp)
        if kernels is not None:
            kernels.cast_reduce_encode(stack.view(np.uint16), out.view(np.uint16), scale,
                                       self.kind, residual)
            return
        self.encode(_arrays.Flat(self._sum(stack, n, scale, xp), "float32",
                                 "numpy" if xp is np else "cupy", None, None), out, residual, seed)

    def decode_accumulate(self, stack, n, out, scale):
        xp = _xp(stack)
        kernels = self._kernels(xp)
        if kernels is not None:
            kernels.cast_decode_accumulate(stack.view(np.uint16), out, scale, self.kind)
            return
        out += self._sum(stack, n, scale, xp)

    def decode(self, payload, n, out: _arrays.Flat):
        xp = _xp(payload)
        kernels = self._kernels(xp)
        if kernels is not None:
            kernels.cast_decode(payload.view(np.uint16), out.data, out.kind, self.kind)
            return
        _store(self._values(payload, xp), out, xp)


def _xp(a):
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


def _as_f32(data, xp, kind: str):
    """float32 values of flat ``data`` of ``kind`` (fp16/bf16 as uint16 bits);
    the array itself when it already is float32."""
    if kind == "float32":
        return data
    if kind == "float16":
        return data.view(xp.float16).astype(xp.float32)
    return (data.astype(xp.uint32) << 16).view(xp.float32)


def _from_f32(v, kind: str, xp):
    """float32 -> ``kind`` bits (uint16), rounded to nearest even (the casts
    of :mod:`squinchcomm.codec.baselines`, for NumPy and CuPy alike)."""
    enc = baselines.encode_fp16 if kind == "float16" else baselines.encode_bf16
    return enc(v).view(xp.uint16)


def _store(buf32, dst: _arrays.Flat, xp):
    """Write float32 values into ``dst`` (float32, or fp16/bf16 bits)."""
    dst.data[:] = buf32 if dst.kind == "float32" else _from_f32(buf32, dst.kind, xp)
    return dst


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


# ----------------------------------------------------------------------------
# Error feedback state
# ----------------------------------------------------------------------------
class ErrorFeedback:
    """Per-rank error-feedback residuals, keyed by tensor name.

    ``state[name]`` holds the first-stage residual (the whole tensor) and
    the second-stage residual (this rank's shard), plus the step count that
    seeds stochastic rounding. Save it with the model: without it a restored
    run loses the error it still owed.
    """

    def __init__(self):
        self.state: dict[str, dict[str, Any]] = {}

    def get(self, name: str, n: int, shard: int, like, world: int):
        """The residual entry of ``name``, created as zeros beside ``like``."""
        entry = self.state.get(name)
        if entry is None:
            xp = _xp(like)
            entry = {"residual": xp.zeros(n, xp.float32), "shard_residual": xp.zeros(shard, xp.float32),
                     "world": world, "step": 0}
            self.state[name] = entry
        elif _xp(entry["residual"]) is not _xp(like):
            # Restored from a host checkpoint while the tensor lives on the GPU (or back).
            xp = _xp(like)
            for key in ("residual", "shard_residual"):
                entry[key] = xp.asarray(entry[key]) if xp is not np else _host(entry[key])
        if entry["residual"].size != n or entry["shard_residual"].size != shard:
            raise ValueError(f"tensor '{name}' has {n} elements now but its error-feedback "
                             f"residual has {entry['residual'].size} (world {entry['world']}): "
                             "use a new name for a differently shaped tensor, or reset()")
        return entry

    def reset(self, name: str | None = None):
        """Forget one tensor's residual, or all of them."""
        if name is None:
            self.state.clear()
        else:
            self.state.pop(name, None)

    def state_dict(self) -> dict:
        """Host copies of every residual, picklable (torch.save / np.savez)."""
        out = {}
        for name, e in self.state.items():
            out[name] = {"residual": _host(e["residual"]), "shard_residual": _host(e["shard_residual"]),
                         "world": e["world"], "step": e["step"]}
        return out

    def load_state_dict(self, state: dict, world: int | None = None):
        """Restore residuals saved by :meth:`state_dict` on the same rank."""
        for name, e in state.items():
            if world is not None and e["world"] != world:
                raise ValueError(f"error-feedback state of '{name}' was saved at world size "
                                 f"{e['world']}, this job has {world}: the shard residuals do "
                                 "not fit; reset() and start the residuals from zero instead")
            self.state[name] = {"residual": np.array(e["residual"], np.float32),
                                "shard_residual": np.array(e["shard_residual"], np.float32),
                                "world": e["world"], "step": int(e["step"])}


def _host(a):
    return a.copy() if isinstance(a, np.ndarray) else a.get()


# ----------------------------------------------------------------------------
# Handles
# ----------------------------------------------------------------------------
class Handle:
    """A collective in flight: ``wait()`` returns its result, ``test()`` polls.

    Operations of one communicator run strictly in the order they were
    submitted, which is the same on every rank; a later operation starts only
    when every earlier one has finished. Without that, ranks that poll at
    different moments would start the exchanges of different operations in
    different orders and the engine would pair the wrong messages. Progress
    happens inside ``test()`` and ``wait()`` (of any handle of the
    communicator); the handle keeps every buffer it uses alive until done.
    """

    def __init__(self, comm: "Communicator", gen: Generator[Work, None, Any]):
        self._comm, self._gen = comm, gen
        self._work: Work | None = None
        self._started = self._done = False
        self._result, self._error = None, None

    def _step(self):
        try:
            self._work = self._gen.send(None) if self._started else next(self._gen)
            self._started = True
        except StopIteration as stop:
            self._done, self._result, self._work = True, stop.value, None
        except BaseException as exc:  # kept for wait(); later operations may still run
            self._done, self._error, self._work = True, exc, None

    def _poll(self) -> bool:
        """Advance without blocking (only ever called on the oldest operation)."""
        if not self._started:
            self._step()
        while not self._done and self._work.test():
            self._step()
        return self._done

    def _block(self):
        """Run to completion (only ever called on the oldest operation)."""
        if not self._started:
            self._step()
        while not self._done:
            try:
                self._work.wait(self._comm.timeout)
            except BaseException as exc:
                self._done, self._error, self._work = True, exc, None
                return
            self._step()

    def test(self) -> bool:
        """Advance without blocking; True when the result is ready."""
        if not self._done:
            self._comm._progress()
        return self._done

    def wait(self):
        """Block until done (TransportError after the timeout); return the result."""
        if not self._done:
            self._comm._progress(until=self)
        if self._error is not None:
            raise self._error
        return self._result


# ----------------------------------------------------------------------------
# The communicator
# ----------------------------------------------------------------------------
@dataclass
class _Call:
    """One collective's validated input."""

    flat: _arrays.Flat
    shape: tuple
    n: int


class Communicator:
    """Collectives over one transport, with Squinch compression.

    Args:
        transport: a :class:`~squinchcomm.transport.base.Transport`, an mpi4py
            communicator, a torch.distributed process group, or None for MPI's
            COMM_WORLD.
        compression: default compression, "none" | "fp16" | "bf16" | "squinch".
        rounding: Squinch rounding, "nearest" | "stochastic".
        error_feedback: default for named allreduces.
        min_compress_bytes: smaller tensors go uncompressed (latency dominates).
        check_metadata: verify before each collective that every rank passed the
            same shape, dtype, compression, op and name (one small allgather).
        hierarchical: reduce uncompressed inside a node, compress across nodes.
        node_size: ranks per node (consecutive ranks); default: detect.
        timeout: seconds to wait for peers before TransportError.
        seed: base seed of stochastic rounding.
        pipeline_bytes: a compressed allreduce of more than this many fp32
            bytes runs in chunks of this size, the exchange of one chunk
            overlapping the codec work of the next; 0 turns it off. The
            result does not depend on it (chunks are block-aligned).

    Operations run in submission order (see :class:`Handle`). That order is
    per communicator: two communicators over one transport must not have
    operations in flight at the same time (give each its own transport, e.g.
    ``transport.split(0, rank)``, or finish one's handles first).
    """

    def __init__(self, transport=None, *, compression: str | None = None,
                 rounding: str | None = None, error_feedback: bool | None = None,
                 min_compress_bytes: int | None = None, check_metadata: bool | None = None,
                 hierarchical: bool | None = None, node_size: int | None = None,
                 timeout: float | None = None, seed: int = 0,
                 pipeline_bytes: int | None = None):
        self.transport = _as_transport(transport)
        self.compression = _choice("compression", compression if compression is not None else
                                   config.env_choice("COMPRESSION", COMPRESSIONS, "squinch"),
                                   COMPRESSIONS)
        self.rounding = _choice("rounding", rounding if rounding is not None else
                                config.env_choice("ROUNDING", codec.ROUNDINGS, "nearest"),
                                codec.ROUNDINGS)
        self.error_feedback_default = (config.env_bool("ERROR_FEEDBACK", False)
                                       if error_feedback is None else bool(error_feedback))
        self.min_compress_bytes = (config.env_int("MIN_COMPRESS_BYTES", 65536)
                                   if min_compress_bytes is None else int(min_compress_bytes))
        self.check_metadata = (config.env_bool("CHECK_METADATA", True)
                               if check_metadata is None else bool(check_metadata))
        self.pipeline_bytes = (config.env_int("PIPELINE_BYTES", 16 << 20)
                               if pipeline_bytes is None else int(pipeline_bytes))
        if self.pipeline_bytes < 0:
            raise ValueError(f"pipeline_bytes={pipeline_bytes!r}: pass 0 (no pipelining) or a "
                             "positive chunk size in bytes of fp32")
        self.timeout = config.timeout() if timeout is None else float(timeout)
        self.seed = int(seed)
        self.error_feedback = ErrorFeedback()
        self._queue: collections.deque[Handle] = collections.deque()  # in flight, in order
        #: Set to a dict to accumulate seconds per stage of the compressed
        #: allreduce (encode, alltoall, reduce_encode, allgather, decode).
        self.timings: dict | None = None
        self._calls = 0
        hierarchical = (config.env_bool("HIERARCHICAL", False) if hierarchical is None
                        else bool(hierarchical))
        node_size = config.env_int("NODE_SIZE", 0) if node_size is None else int(node_size)
        self._build_groups(node_size)
        self.hierarchical = hierarchical and self.local.size > 1 and self.cross.size > 1
        _share_cores(self.local.size)

    # ------------------------------------------------------------ topology
    def _build_groups(self, node_size: int):
        t = self.transport
        if node_size > 0:
            if t.size % node_size:
                raise ValueError(f"node_size={node_size} does not divide the world size {t.size}")
            self.local = t.split(t.rank // node_size, t.rank)
        else:
            self.local = t.node_split()
        locals_ = t.allgather_object((self.local.rank, self.local.size), self.timeout)
        if len({s for _, s in locals_}) != 1:
            raise ValueError(f"nodes have different rank counts {sorted({s for _, s in locals_})}: "
                             "hierarchical mode needs equal nodes (set node_size=)")
        self.cross = t.split(self.local.rank, t.rank)

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def size(self) -> int:
        return self.transport.size

    @property
    def local_rank(self) -> int:
        return self.local.rank

    @property
    def local_size(self) -> int:
        return self.local.size

    @property
    def cross_rank(self) -> int:
        return self.cross.rank

    @property
    def cross_size(self) -> int:
        return self.cross.size

    # ------------------------------------------------------------ public collectives
    def allreduce(self, x, *, op: str = "average", compression: str | None = None,
                  name: str | None = None, out=None, error_feedback: bool | None = None,
                  prescale: float = 1.0, postscale: float = 1.0):
        """Reduce ``x`` over all ranks (sum or average); every rank gets the
        bit-identical result, in ``x``'s type, dtype and shape (or in ``out``,
        which may be ``x`` itself).

        Args:
            x: float32/float16/bfloat16 NumPy or CuPy array or torch tensor.
            op: "average" (default) or "sum".
            compression: overrides the communicator's default.
            name: identifies the tensor (error feedback, mismatch messages).
            out: optional output of x's kind, size and device.
            error_feedback: overrides the default; needs ``name``.
            prescale / postscale: factors applied before / after the reduction.
        """
        return self.allreduce_async(x, op=op, compression=compression, name=name, out=out,
                                    error_feedback=error_feedback, prescale=prescale,
                                    postscale=postscale).wait()

    def allreduce_async(self, x, *, op: str = "average", compression: str | None = None,
                        name: str | None = None, out=None, error_feedback: bool | None = None,
                        prescale: float = 1.0, postscale: float = 1.0) -> Handle:
        """Start :meth:`allreduce`; returns a :class:`Handle` (``wait()`` gives the result).
        Arguments are validated now; the cross-rank metadata check runs when the
        operation starts, so a mismatch is raised by ``wait()``."""
        call = self._input(x)
        op = _choice("op", op, OPS)
        comp = self._compression(compression, call)
        ef_name = self._ef_name(error_feedback, name, comp)
        dst = self._output(out, call)
        scale = (1.0 / self.size if op == "average" else 1.0) * float(postscale)
        cid = self._next_call()

        def run():
            self._check("allreduce", call, name=name, op=op, compression=comp,
                        ef=ef_name is not None)
            yield from self._allreduce(call, _arrays.internal(dst), comp, scale,
                                       float(prescale), ef_name, cid)
            return out if out is not None else _reshape(_arrays.wrap(dst), call.shape)

        return self.submit(run())

    def reduce_scatter(self, x, *, op: str = "average", compression: str | None = None,
                       name: str | None = None, error_feedback: bool | None = None):
        """Reduce ``x``; return this rank's block-aligned shard of the flattened
        result as float32 and its element range: ``(shard, (start, stop))``.
        Squinch quantizes once here (no re-encode)."""
        call = self._input(x)
        op = _choice("op", op, OPS)
        comp = self._compression(compression, call)
        ef_name = self._ef_name(error_feedback, name, comp)
        scale = 1.0 / self.size if op == "average" else 1.0
        cid = self._next_call()

        def run():
            self._check("reduce_scatter", call, name=name, op=op, compression=comp,
                        ef=ef_name is not None)
            shard, bounds = yield from self._reduce_scatter(_arrays.internal(call.flat), call.n,
                                                            comp, scale, ef_name, cid)
            return _arrays.wrap(_arrays.Flat(shard, "float32", call.flat.family,
                                             call.flat.device, None)), bounds

        return self.submit(run()).wait()

    def allgather(self, x, *, compression: str | None = None):
        """Concatenate every rank's ``x`` along the first axis (sizes may differ
        in that axis only), optionally compressed; result in ``x``'s type."""
        call = self._input(x)
        comp = _choice("compression", compression or "none", COMPRESSIONS)
        rows = call.shape[0] if call.shape else 1
        tail = tuple(call.shape[1:])
        cid = self._next_call()

        def run():
            metas = self._check("allgather", call, compression=comp, rows=rows, tail=tail,
                                ignore=("shape", "rows"), exchange=True)
            per_row = int(np.prod(tail, dtype=np.int64))
            counts = [m["rows"] * per_row for m in metas]
            flat = yield from self._allgather(_arrays.internal(call.flat), counts, comp, cid)
            out = _arrays.Flat(flat, call.flat.kind, call.flat.family, call.flat.device, None)
            return _reshape(_arrays.wrap(out), (sum(m["rows"] for m in metas),) + tail)

        return self.submit(run()).wait()

    def broadcast(self, x, root: int = 0, *, compression: str = "none"):
        """Copy ``x`` from ``root`` to every rank, in place. Uncompressed by
        default (parameters must arrive exact); with compression the root
        sends the payload and every rank, the root too, decodes the same
        bytes, so all ranks still hold identical values."""
        call = self._input(x, writable=True)
        if not isinstance(root, int) or not 0 <= root < self.size:
            raise ValueError(f"root={root!r} is not a rank of this {self.size}-rank communicator")
        comp = _choice("compression", compression, COMPRESSIONS)
        cid = self._next_call()

        def run():
            self._check("broadcast", call, root=root, compression=comp)
            if comp == "none":
                yield self.transport.broadcast(call.flat.data, root)
                return x
            wire = self._wire(comp)
            xp = _xp(call.flat.data)
            payload = xp.empty(wire.nbytes(call.n), xp.uint8)
            if self.rank == root:
                wire.encode(_arrays.internal(call.flat), payload, None,
                            self._seed(None, cid, root, 4))
            yield self.transport.broadcast(payload, root)
            wire.decode(payload, call.n, _arrays.internal(call.flat))
            return x

        return self.submit(run()).wait()

    def alltoall(self, x, splits=None, *, compression: str = "none"):
        """Send ``splits[r]`` consecutive elements of flat ``x`` to rank r (equal
        splits by default); return (received flat array, received splits).
        With compression each split is encoded on its own and decoded on arrival."""
        call = self._input(x)
        if splits is None:
            if call.n % self.size:
                raise ValueError(f"{call.n} elements do not split evenly over {self.size} ranks: "
                                 "pass splits=")
            splits = [call.n // self.size] * self.size
        splits = [int(v) for v in splits]
        if len(splits) != self.size or min(splits) < 0 or sum(splits) != call.n:
            raise ValueError(f"splits={splits} must have {self.size} non-negative entries "
                             f"summing to {call.n}")
        comp = _choice("compression", compression, COMPRESSIONS)
        cid = self._next_call()

        def run():
            metas = self._check("alltoall", call, splits=splits, compression=comp,
                                ignore=("shape", "splits"), exchange=True)
            recv_splits = [m["splits"][self.rank] for m in metas]
            xp = _xp(call.flat.data)
            recv = xp.empty(sum(recv_splits), call.flat.data.dtype)
            if comp == "none":
                yield self.transport.alltoallv(call.flat.data, splits, recv, recv_splits)
            else:
                wire, x = self._wire(comp), _arrays.internal(call.flat)
                send_b = [wire.nbytes(c) for c in splits]
                recv_b = [wire.nbytes(c) for c in recv_splits]
                payload = xp.empty(sum(send_b), xp.uint8)
                el, pos = np.cumsum([0] + splits), np.cumsum([0] + send_b)
                for r in range(self.size):  # each split on its own: block boundaries differ
                    part = _arrays.Flat(x.data[el[r]:el[r + 1]], x.kind, x.family, x.device, None)
                    wire.encode(part, payload[pos[r]:pos[r + 1]], None, self._seed(None, cid, r, 5))
                got = xp.empty(sum(recv_b), xp.uint8)
                yield self.transport.alltoallv(payload, send_b, got, recv_b)
                el, pos = np.cumsum([0] + recv_splits), np.cumsum([0] + recv_b)
                for r in range(self.size):
                    part = _arrays.Flat(recv[el[r]:el[r + 1]], x.kind, x.family, x.device, None)
                    wire.decode(got[pos[r]:pos[r + 1]], recv_splits[r], part)
            return _arrays.wrap(_arrays.Flat(recv, call.flat.kind, call.flat.family,
                                             call.flat.device, None)), recv_splits

        return self.submit(run()).wait()

    def barrier(self):
        """Wait for every rank (TransportError after the timeout)."""
        def run():
            yield self.transport.barrier()

        self.submit(run()).wait()

    # ------------------------------------------------------------ ordering
    def submit(self, gen) -> Handle:
        """Queue an operation (a generator yielding transport Works, returning
        its result) behind the ones already in flight and start whatever can
        start without blocking. Layers built on the communicator (the torch
        integration) use it so their operations keep the same global order."""
        handle = Handle(self, gen)
        self._queue.append(handle)
        self._progress()
        return handle

    def _progress(self, until: Handle | None = None):
        """Advance the queued operations oldest first: without blocking, or
        blocking until ``until`` has finished."""
        while self._queue:
            head = self._queue[0]
            if until is None:
                if not head._poll():
                    return
            else:
                head._block()
            self._queue.popleft()
            if head is until:
                return

    # ------------------------------------------------------------ algorithms
    # Generators: each ``yield`` hands a transport Work to the Handle; the
    # value they return is the result.
    def _allreduce(self, call: _Call, dst: _arrays.Flat, comp, scale, prescale, ef_name, cid):
        """Reduce ``call`` into ``dst`` (an internal Flat of the input's kind)."""
        x = _arrays.internal(call.flat)
        xp = _xp(x.data)
        if comp == "none":
            # The engine's own allreduce, in fp32 (exact sums of fp16/bf16 inputs).
            buf = _as_f32(x.data, xp, x.kind).astype(xp.float32, copy=True)
            if prescale != 1.0:
                buf *= xp.float32(prescale)
            yield self.transport.allreduce(buf)
            buf *= xp.float32(scale)
            return _store(buf, dst, xp)
        if prescale != 1.0:
            x = _arrays.Flat(_as_f32(x.data, xp, x.kind) * xp.float32(prescale), "float32",
                             x.family, x.device, None)
        if self.hierarchical:
            return (yield from self._hierarchical(x, call.n, dst, comp, scale, ef_name, cid))
        return (yield from self._compressed(self.transport, x, call.n, dst, comp, scale,
                                            ef_name, cid))

    def _compressed(self, t: Transport, x: _arrays.Flat, n: int, dst: _arrays.Flat, comp,
                    scale, ef_name, cid):
        """Steps 1-6 of the module docstring over transport ``t``, pipelined.

        The tensor is cut into block-aligned chunks of ``pipeline_bytes``; the
        exchanges of a chunk are started without waiting, so chunk k's
        all-to-all is on the wire while chunk k+1 is encoded and chunk k-1 is
        reduced and decoded. Every transport starts its operations in the same
        order on every rank (all-to-all k+1, then all-gather k). Chunk and shard
        boundaries are multiples of 8 and rounding draws from global indices,
        so every block and every sum is the same as in one piece: the result
        does not depend on the chunk size.
        """
        wire = self._wire(comp)
        xp = _xp(x.data)
        world, rank = t.size, t.rank
        chunks = []  # (start, stop, shard bounds inside the chunk, payload bytes per shard)
        edges = _chunk_bounds(n, self.pipeline_bytes // 4)
        for lo, hi in zip(edges, edges[1:]):
            b = shard_bounds(hi - lo, world)
            chunks.append((lo, hi, b, [wire.nbytes(b[r + 1] - b[r]) for r in range(world)]))
        mine = [b[rank + 1] - b[rank] for _, _, b, _ in chunks]  # this rank's shard per chunk
        at = np.cumsum([0] + mine)  # where each chunk's shard sits in the shard residual
        res1, res2, step = self._residuals(ef_name, f"allreduce/{world}", n, int(at[-1]),
                                           x.data, world, cid)
        # Stage 2 reduces every element exactly once, wherever its shard lies: one
        # seed for all ranks keeps its rounding independent of the partition.
        seed1, seed2 = self._seed(ef_name, step, rank, 1), self._seed(ef_name, step, "all", 2)
        clock = _Clock(self.timings, xp)
        exchanges = {}  # chunk -> (Work, the buffers it reads and writes)

        def part(flat, lo, hi):
            return _arrays.Flat(flat.data[lo:hi], flat.kind, flat.family, flat.device, None)

        def send(k):
            """Steps 1-3: encode chunk k, start the all-to-all of its shards."""
            lo, hi, _, nb = chunks[k]
            payload = xp.empty(sum(nb), xp.uint8)
            wire.encode(part(x, lo, hi), payload, None if res1 is None else res1[lo:hi], seed1,
                        offset=lo)
            clock.lap("encode")
            recv = xp.empty(world * nb[rank], xp.uint8)
            exchanges[k] = (t.alltoallv(payload, nb, recv, [nb[rank]] * world), payload, recv)

        def reduce(k):
            """Steps 4-5 for chunk k's shard, then start the all-gather of step 6."""
            lo, _, b, nb = chunks[k]
            work, _, recv = exchanges.pop(k)
            yield work
            clock.lap("alltoall")
            reduced = xp.empty(nb[rank], xp.uint8)
            wire.reduce_encode(recv.reshape(world, nb[rank]), mine[k], scale, reduced,
                               None if res2 is None else res2[at[k]:at[k + 1]], seed2,
                               lo + b[rank])
            clock.lap("reduce_encode")
            gathered = xp.empty(sum(nb), xp.uint8)
            exchanges[-1 - k] = (t.allgatherv(reduced, gathered, nb), reduced, gathered)

        def finish(k):
            """Step 6: decode chunk k; every rank decodes the same bytes."""
            lo, hi, _, _ = chunks[k]
            work, _, gathered = exchanges.pop(-1 - k)
            yield work
            clock.lap("allgather")
            wire.decode(gathered, hi - lo, part(dst, lo, hi))
            clock.lap("decode")

        for k in range(len(chunks) + 2):
            if k < len(chunks):
                send(k)
            if 0 <= k - 1 < len(chunks):
                yield from reduce(k - 1)
            if 0 <= k - 2 < len(chunks):
                yield from finish(k - 2)
        return dst

    def _hierarchical(self, x: _arrays.Flat, n: int, dst: _arrays.Flat, comp, scale, ef_name,
                      cid):
        """Sum inside the node uncompressed; each local rank allreduces one
        block-aligned slice across nodes, compressed; share the slices in the node."""
        xp = _xp(x.data)
        node_sum = _as_f32(x.data, xp, x.kind).astype(xp.float32, copy=True)
        yield self.local.allreduce(node_sum)
        lb = shard_bounds(n, self.local.size)
        lo, hi = lb[self.local.rank], lb[self.local.rank + 1]
        piece = _arrays.Flat(node_sum[lo:hi], "float32", x.family, x.device, None)
        reduced = _arrays.Flat(xp.empty(hi - lo, xp.float32), "float32", x.family, x.device, None)
        name = None if ef_name is None else f"{ef_name}/node-slice{self.local.rank}"
        yield from self._compressed(self.cross, piece, hi - lo, reduced, comp, scale, name, cid)
        full = xp.empty(n, xp.float32)
        yield self.local.allgatherv(reduced.data, full,
                                    [lb[r + 1] - lb[r] for r in range(self.local.size)])
        return _store(full, dst, xp)

    def _reduce_scatter(self, x: _arrays.Flat, n: int, comp, scale, ef_name, cid):
        """Steps 1-4 only; returns (float32 shard, (start, stop))."""
        t = self.transport
        xp = _xp(x.data)
        world, rank = t.size, t.rank
        bounds = shard_bounds(n, world)
        mine = bounds[rank + 1] - bounds[rank]
        if comp == "none":
            counts = [bounds[r + 1] - bounds[r] for r in range(world)]
            recv = xp.empty(world * mine, xp.float32)
            yield t.alltoallv(_as_f32(x.data, xp, x.kind).astype(xp.float32), counts, recv,
                              [mine] * world)
            shard = xp.zeros(mine, xp.float32)
            for row in recv.reshape(world, mine):  # in rank order: the same sum everywhere
                shard += row
            shard *= xp.float32(scale)
            return shard, (bounds[rank], bounds[rank + 1])
        wire = self._wire(comp)
        nbytes = [wire.nbytes(bounds[r + 1] - bounds[r]) for r in range(world)]
        res1, _, step = self._residuals(ef_name, f"reduce_scatter/{world}", n, 0, x.data, world,
                                        cid)
        payload = xp.empty(sum(nbytes), xp.uint8)
        wire.encode(x, payload, res1, self._seed(ef_name, step, rank, 1))
        recv = xp.empty(world * nbytes[rank], xp.uint8)
        yield t.alltoallv(payload, nbytes, recv, [nbytes[rank]] * world)
        shard = xp.zeros(mine, xp.float32)
        wire.decode_accumulate(recv.reshape(world, nbytes[rank]), mine, shard, scale)
        return shard, (bounds[rank], bounds[rank + 1])

    def _allgather(self, x: _arrays.Flat, counts, comp, cid):
        """Returns the flat gathered data (x's storage dtype)."""
        xp = _xp(x.data)
        if comp == "none":
            recv = xp.empty(sum(counts), x.data.dtype)
            yield self.transport.allgatherv(x.data, recv, counts)
            return recv
        wire = self._wire(comp)
        nbytes = [wire.nbytes(c) for c in counts]
        payload = xp.empty(nbytes[self.rank], xp.uint8)
        wire.encode(x, payload, None, self._seed(None, cid, self.rank, 3))
        gathered = xp.empty(sum(nbytes), xp.uint8)
        yield self.transport.allgatherv(payload, gathered, nbytes)
        out = xp.empty(sum(counts), x.data.dtype)
        pos, el = np.cumsum([0] + nbytes), np.cumsum([0] + counts)
        for r in range(self.size):
            part = _arrays.Flat(out[el[r]:el[r + 1]], x.kind, x.family, x.device, None)
            wire.decode(gathered[pos[r]:pos[r + 1]], counts[r], part)
        return out

    # ------------------------------------------------------------ helpers
    def _wire(self, comp: str):
        if comp == "squinch":
            return _SquinchWire(self.rounding)
        return _CastWire("float16" if comp == "fp16" else "bfloat16")

    def _next_call(self) -> int:
        """A per-communicator call id, equal on every rank (collectives are
        issued in the same order everywhere): seeds rounding of unnamed calls."""
        self._calls += 1
        return self._calls

    def _ef_name(self, error_feedback, name, comp):
        ef = self.error_feedback_default if error_feedback is None else bool(error_feedback)
        if not ef or comp == "none":
            return None
        if name is None:
            raise ValueError("error feedback keeps a residual per tensor: pass name= "
                             "(or error_feedback=False)")
        return name

    def _residuals(self, ef_name, kind, n, shard, like, world, cid):
        """(first-stage residual, second-stage residual, step) or (None, None, cid)."""
        if ef_name is None:
            return None, None, cid
        entry = self.error_feedback.get(f"{kind}/{ef_name}", n, shard, like, world)
        entry["step"] += 1
        return entry["residual"], entry["shard_residual"], entry["step"]

    def _seed(self, name, step, rank, stage) -> int:
        digest = hashlib.blake2b(f"{self.seed}/{name}/{step}/{rank}/{stage}".encode(),
                                 digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def _input(self, x, writable: bool = False) -> _Call:
        flat = _arrays.flat_input(x)
        if writable and flat.family == "numpy" and not flat.data.flags.writeable:
            raise ValueError("the array is read-only; broadcast writes into it")
        return _Call(flat, tuple(x.shape), int(flat.data.size))

    def _compression(self, compression, call: _Call) -> str:
        comp = _choice("compression", compression or self.compression, COMPRESSIONS)
        itemsize = 4 if call.flat.kind == "float32" else 2
        if comp != "none" and call.n * itemsize < self.min_compress_bytes:
            return "none"  # small tensors: latency dominates, compression only adds error
        return comp

    def _output(self, out, call: _Call) -> _arrays.Flat:
        if out is None:
            return _arrays.new_buffer(call.flat, call.flat.kind, call.n)
        return _arrays.flat_buffer(out, "out", call.flat.kind, call.n, call.flat)

    def _check(self, what: str, call: _Call, ignore=(), exchange=False, **extra):
        """Gather every rank's call description and raise the same ValueError on
        every rank if they disagree (instead of a hang or garbage). Returns all
        ranks' descriptions; ``exchange`` forces the gather even when checks
        are off (the caller needs the other ranks' sizes)."""
        meta = {"op": what, "shape": call.shape, "dtype": call.flat.kind,
                "device": "gpu" if call.flat.on_gpu else "host", **extra}
        if not self.check_metadata and not exchange:
            return None
        metas = self.transport.allgather_object(meta, self.timeout)
        if not self.check_metadata:
            return metas
        check_agreement(what, metas, [k for k in meta if k not in ignore],
                        ". Every rank must call the same collective with the same shape, "
                        "dtype, compression and name")
        return metas


# ----------------------------------------------------------------------------
def check_agreement(what: str, metas: list[dict], keys, hint: str):
    """Raise the same ValueError on every rank when any of ``keys`` differs
    between the ranks' descriptions ``metas`` (from allgather_object); the
    message names each rank's value, then ``hint``."""
    diff = {k: [m.get(k) for m in metas] for k in keys
            if len({repr(m.get(k)) for m in metas}) > 1}
    if diff:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={v!r}" for r, v in enumerate(vals))
                           for k, vals in diff.items())
        raise ValueError(f"{what}: ranks disagree ({detail}){hint}")


def _share_cores(local_size: int):
    """Give each of the ``local_size`` ranks on this node its share of the cores
    for the CPU codec: Numba's default (every core in every rank) oversubscribes
    a node several times over. An explicit NUMBA_NUM_THREADS or
    SQUINCHCOMM_CODEC_THREADS wins."""
    threads = config.env_int("CODEC_THREADS", 0)
    if not threads:
        if os.environ.get("NUMBA_NUM_THREADS"):
            return
        threads = max(1, (os.cpu_count() or 1) // max(1, local_size))
    try:
        from squinchcomm.codec import cpu
    except ImportError:  # no numba: the codec will say which extra to install
        return
    cpu.set_threads(threads)


def _reshape(result, shape):
    return result.reshape(shape) if tuple(result.shape) != tuple(shape) else result


def _choice(what: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{what}={value!r}: choose one of {', '.join(choices)}")
    return value


def _as_transport(obj) -> Transport:
    if isinstance(obj, Transport):
        return obj
    if obj is None:
        from squinchcomm.transport.mpi import MPITransport

        return MPITransport()
    module = type(obj).__module__
    if module.startswith("mpi4py"):
        from squinchcomm.transport.mpi import MPITransport

        return MPITransport(obj)
    if module.startswith("torch"):
        from squinchcomm.transport.torch_dist import TorchTransport

        return TorchTransport(obj)
    raise ValueError(f"cannot communicate over a {type(obj).__name__}: pass a Transport, an "
                     "mpi4py communicator or a torch.distributed process group")



# ----------------------------------------------------------------------------
# The default communicator: squinchcomm.init(), rank(), size(), ...
# ----------------------------------------------------------------------------
_DEFAULT: Communicator | None = None


def init(transport=None, **options) -> Communicator:
    """Create the default communicator and return it.

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

        if not dist.is_initialized():
            init_process_group_from_env()
        transport = TorchTransport()
    elif transport == "mpi":
        transport = None
    elif isinstance(transport, str):
        raise ValueError(f"transport={transport!r}: use 'mpi', 'torch' or a communicator object")
    _DEFAULT = Communicator(transport, **options)
    return _DEFAULT


def shutdown():
    """Forget the default communicator (the engines stay initialized)."""
    global _DEFAULT
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
