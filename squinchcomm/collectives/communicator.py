"""The Communicator: validation, topology and the public collectives.

Each public method validates its arguments at once (a ``ValueError`` naming
the fix), resolves its options into a :class:`~.algorithms.Plan`, and submits
one operation to the group's :class:`~.engine.Engine`: first the cross-rank
metadata check, then the algorithm. ``*_async`` methods return the
:class:`~.engine.Handle`; the others wait for it.

Example (under ``mpirun -n 4``):
    >>> import numpy as np, squinchcomm
    >>> comm = squinchcomm.Communicator()                 # MPI COMM_WORLD
    >>> g = np.random.default_rng(comm.rank).standard_normal(1000).astype(np.float32)
    >>> avg = comm.allreduce(g, op="average", compression="squinch")
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np

from squinchcomm import __version__, codec, config
from squinchcomm.codec import _arrays
from squinchcomm.collectives import algorithms as alg
from squinchcomm.collectives.engine import Handle, engine_for
from squinchcomm.collectives.error_feedback import ErrorFeedback
from squinchcomm.collectives.policy import CHOICES, PROBE_BYTES, LinkModel, log, probe
from squinchcomm.collectives.wire import get_wire, wire_bytes
from squinchcomm.errors import MismatchError
from squinchcomm.transport.base import Transport

__all__ = ["Communicator", "OPS", "EXACT_OPS", "check_agreement"]

OPS = ("average", "sum", "min", "max", "product")
#: Reductions that run uncompressed and exact: quantizing their inputs would
#: change which value wins (min/max) or compound the error (product).
EXACT_OPS = ("min", "max", "product")
#: dtypes the compressors take; the others travel uncompressed.
_FLOAT_KINDS = _arrays.KINDS


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
        compression: default compression, "none" | "fp16" | "bf16" | "squinch"
            | "auto" (per message size, the fastest of none, bf16 and Squinch
            from a model of this job's link and codec measured by a short
            probe at construction: :mod:`squinchcomm.collectives.policy`).
        rounding: Squinch rounding, "nearest" | "stochastic".
        error_feedback: default for named allreduces.
        min_compress_bytes: smaller tensors go uncompressed (latency dominates).
        check_metadata: verify before each collective that every rank called
            the same collective with the same shape, dtype, compression, op
            and name (one small allgather).
        hierarchical: reduce uncompressed inside a node, compress across nodes.
        node_size: ranks per node (consecutive ranks); default: detect.
        timeout: seconds to wait for peers before TransportError.
        seed: base seed of stochastic rounding.
        pipeline_bytes: a compressed allreduce of more than this many fp32
            bytes runs in chunks of this size, the exchange of one chunk
            overlapping the codec work of the next; 0 turns it off. The
            result does not depend on it (chunks are block-aligned).
        link_model: the :class:`~squinchcomm.collectives.policy.LinkModel`
            that ``auto`` uses, given instead of probed (the same on every
            rank; ``LinkModel.from_rates`` states one).

    Every collective also takes per-call options (compression, rounding,
    hierarchical, error_feedback, check_metadata, seed) that override these
    defaults for that call only. Operations run in submission order on the
    group's engine thread (:mod:`squinchcomm.collectives.engine`), shared
    with every other Communicator over the same process group or MPI
    communicator, and progress without being polled.
    """

    def __init__(self, transport=None, *, compression: str | None = None,
                 rounding: str | None = None, error_feedback: bool | None = None,
                 min_compress_bytes: int | None = None, check_metadata: bool | None = None,
                 hierarchical: bool | None = None, node_size: int | None = None,
                 timeout: float | None = None, seed: int = 0,
                 pipeline_bytes: int | None = None, link_model: LinkModel | None = None):
        self.timeout = config.timeout() if timeout is None else float(timeout)
        if not self.timeout > 0:  # NaN included
            raise ValueError(f"timeout={timeout!r}: pass the seconds to wait for peers (> 0), "
                             "or None for SQUINCHCOMM_TIMEOUT (default 300)")
        self.compression = _choice("compression", compression if compression is not None else
                                   config.env_choice("COMPRESSION", CHOICES, "squinch"),
                                   CHOICES)
        self.rounding = _choice("rounding", rounding if rounding is not None else
                                config.env_choice("ROUNDING", codec.ROUNDINGS, "nearest"),
                                codec.ROUNDINGS)
        self.error_feedback_default = (config.env_bool("ERROR_FEEDBACK", False)
                                       if error_feedback is None else bool(error_feedback))
        self.min_compress_bytes = (config.env_bytes("MIN_COMPRESS_BYTES", 65536)
                                   if min_compress_bytes is None else int(min_compress_bytes))
        self.check_metadata = (config.env_bool("CHECK_METADATA", True)
                               if check_metadata is None else bool(check_metadata))
        self.pipeline_bytes = (config.env_bytes("PIPELINE_BYTES", 16 << 20)
                               if pipeline_bytes is None else int(pipeline_bytes))
        if self.pipeline_bytes < 0:
            raise ValueError(f"pipeline_bytes={pipeline_bytes!r}: pass 0 (no pipelining) or a "
                             "positive chunk size in bytes of fp32")
        self.seed = int(seed)
        self.error_feedback = ErrorFeedback()
        #: Set to a dict to accumulate seconds per stage of the compressed
        #: allreduce (encode, alltoall, reduce_encode, allgather, decode).
        self.timings: dict | None = None
        self._calls = 0
        self._calls_lock = threading.Lock()
        hierarchical = (config.env_bool("HIERARCHICAL", False) if hierarchical is None
                        else bool(hierarchical))
        node_size = config.env_int("NODE_SIZE", 0) if node_size is None else int(node_size)
        # Options are validated first: a rank with a bad one fails here, alone.
        self.transport = _as_transport(transport, self.timeout)
        self.engine = engine_for(self.transport)
        self._build_groups(node_size, hierarchical)
        self.hierarchical = hierarchical and self._can_split()
        #: The model ``compression="auto"`` picks from (None until measured or given).
        self.link_model: LinkModel | None = None
        self._model_lock = threading.RLock()
        if link_model is not None:
            self.set_link_model(link_model)
        elif self.compression == "auto":
            self.measure_link()

    # ------------------------------------------------------------ auto
    def measure_link(self, probe_bytes=None, repeats: int = 5) -> LinkModel:
        """Measure the link and codecs that ``compression="auto"`` chooses by
        (a short probe: :func:`squinchcomm.collectives.policy.probe`), keep
        the model and log it once (rank 0, logger ``squinchcomm``).
        Collective: every rank calls it at the same point; every rank gets
        the same model. Call it again to re-measure (after the network or
        the job's load changed).

        Args:
            probe_bytes: fp32 message sizes to time (default 256 KiB, 1 MiB,
                4 MiB, raised to ``min_compress_bytes``: smaller messages go
                uncompressed whatever the model says).
            repeats: timed calls per method and size (the fastest counts; one
                more warms up).
        """
        if probe_bytes is None:
            floor = max(self.min_compress_bytes, 1)
            probe_bytes = [max(b, floor << i) for i, b in enumerate(PROBE_BYTES)]
        with self._model_lock:
            model = probe(self, probe_bytes, repeats)
            self.link_model = model
        if self.rank == 0:
            log.info("%s", model.describe())
        return model

    def set_link_model(self, model: LinkModel):
        """Use a given model for ``auto`` (every rank must pass the same)."""
        if not isinstance(model, LinkModel):
            raise ValueError(f"link_model={model!r}: pass a squinchcomm.collectives.policy."
                             "LinkModel (LinkModel.from_rates states one)")
        if model.world != self.size:
            raise ValueError(f"link_model is for {model.world} ranks but this communicator has "
                             f"{self.size}: measure_link() or state one for {self.size}")
        self.link_model = model

    def _auto(self, n: int) -> str:
        """What ``auto`` sends ``n`` elements in; the first call on a communicator
        built without ``auto`` measures the link (collective, in program order)."""
        with self._model_lock:  # one probe, even when two threads ask at once
            if self.link_model is None:
                self.measure_link()
        return self.link_model.choose(n)

    # ------------------------------------------------------------ topology
    def _settings(self, node_size: int, hierarchical: bool) -> dict:
        """What shapes the exchange and must be equal on every rank: a rank
        with another pipeline chunk, threshold or check setting would send
        messages the others do not expect."""
        return {"version": __version__, "compression": self.compression,
                "rounding": self.rounding, "error_feedback": self.error_feedback_default,
                "min_compress_bytes": self.min_compress_bytes,
                "check_metadata": self.check_metadata, "pipeline_bytes": self.pipeline_bytes,
                "hierarchical": hierarchical, "node_size": node_size}

    def _build_groups(self, node_size: int, hierarchical: bool):
        """Agree on the settings, then split the transport into this node's
        ranks and one rank per node. Collective; runs on the engine thread,
        behind any operation in flight."""
        t = self.transport
        settings = self._settings(node_size, hierarchical)

        def build():
            check_agreement("Communicator()", t.allgather_object(settings, self.timeout),
                            list(settings), ". Create the communicator with the same options "
                            "and SQUINCHCOMM_* variables on every rank")
            if node_size > 0:
                if t.size % node_size:
                    raise ValueError(f"node_size={node_size} does not divide the world size {t.size}")
                local = t.split(t.rank // node_size, t.rank)
            else:
                local = t.node_split()
            locals_ = t.allgather_object((local.rank, local.size), self.timeout)
            if len({s for _, s in locals_}) != 1:
                raise ValueError(f"nodes have different rank counts {sorted({s for _, s in locals_})}: "
                                 "hierarchical mode needs equal nodes (set node_size=)")
            return local, t.split(local.rank, t.rank)
            yield  # a generator: the engine runs it like any operation

        self.local, self.cross = self.engine.submit(build(), what="Communicator() setup",
                                                    timeout=self.timeout).wait()

    def subset(self, ranks) -> "Communicator | None":
        """A Communicator over ``ranks`` (ranks of this one), with this one's
        settings: Horovod's process sets. Collective: every rank of this
        communicator calls it with the same ranks; the members get the new
        communicator (its rank i is ``sorted(ranks)[i]``), the others None.
        The split runs on this communicator's engine, in order with its
        operations; the subset gets its own engine."""
        members = sorted({int(r) for r in ranks})
        if not members or members[0] < 0 or members[-1] >= self.size:
            raise ValueError(f"ranks={list(ranks)}: pass a non-empty list of ranks in "
                             f"0..{self.size - 1}")
        t, inside = self.transport, self.rank in members

        def split():
            check_agreement("subset", t.allgather_object({"ranks": members}, self.timeout),
                            ["ranks"], ". Every rank must pass the same ranks")
            return t.split(0 if inside else 1, t.rank)
            yield  # a generator: the engine runs it like any operation

        sub = self.engine.submit(split(), what="process set split", timeout=self.timeout).wait()
        if not inside:
            return None
        return Communicator(sub, compression=self.compression, rounding=self.rounding,
                            error_feedback=self.error_feedback_default,
                            min_compress_bytes=self.min_compress_bytes,
                            check_metadata=self.check_metadata, hierarchical=self.hierarchical,
                            timeout=self.timeout, seed=self.seed,
                            pipeline_bytes=self.pipeline_bytes)  # auto: its own probe

    def _can_split(self) -> bool:
        return self.local.size > 1 and self.cross.size > 1

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

    # ------------------------------------------------------------ allreduce
    def allreduce(self, x, *, op: str = "average", compression: str | None = None,
                  name: str | None = None, out=None, error_feedback=None,
                  prescale: float = 1.0, postscale: float = 1.0, rounding: str | None = None,
                  hierarchical: bool | None = None, check_metadata: bool | None = None,
                  seed: int | None = None):
        """Reduce ``x`` over all ranks; every rank gets the bit-identical
        result, in ``x``'s type, dtype and shape (or in ``out``, which may be
        ``x`` itself).

        Args:
            x: NumPy or CuPy array or torch tensor. float32/float16/bfloat16
                use ``compression``; float64 and integers are summed exactly,
                uncompressed (integer averages truncate toward zero).
            op: "average" (default), "sum", or one of :data:`EXACT_OPS`
                ("min", "max", "product"), which always run uncompressed
                (float16/bfloat16 reduced in float32, integers in int64).
            compression: overrides the communicator's default (not with
                the exact ops: ValueError).
            name: identifies the tensor (error feedback, mismatch messages).
            out: optional output of x's dtype, size and device.
            error_feedback: True/False overrides the default (needs ``name``);
                an :class:`ErrorFeedback` turns it on with that store.
            prescale / postscale: factors applied before / after the reduction.
            rounding, hierarchical, check_metadata, seed: override the
                communicator's defaults for this call.
        """
        return self.allreduce_async(x, op=op, compression=compression, name=name, out=out,
                                    error_feedback=error_feedback, prescale=prescale,
                                    postscale=postscale, rounding=rounding,
                                    hierarchical=hierarchical, check_metadata=check_metadata,
                                    seed=seed).wait()

    def allreduce_async(self, x, *, op: str = "average", compression: str | None = None,
                        name: str | None = None, out=None, error_feedback=None,
                        prescale: float = 1.0, postscale: float = 1.0,
                        rounding: str | None = None, hierarchical: bool | None = None,
                        check_metadata: bool | None = None, seed: int | None = None) -> Handle:
        """Start :meth:`allreduce`; returns a :class:`Handle` (``wait()`` gives
        the result). Arguments are validated now; a mismatch between ranks is
        raised by ``wait()`` on every rank."""
        call, op, comp, hier, meta = self._describe(x, op, compression, name, error_feedback,
                                                    rounding, hierarchical, postscale)
        plan = self._plan(comp, rounding, error_feedback, name, seed,
                          scale=(1.0 / self.size if op == "average" else 1.0) * float(postscale),
                          prescale=float(prescale), postscale=float(postscale),
                          op=op if op in EXACT_OPS else "sum")
        self._check_exact(call, prescale, postscale)
        dst = self._output(out, call)

        def run():
            yield from self._check(meta, check_metadata)
            yield from self._allreduce(plan, call, dst, op, hier)
            return out if out is not None else _reshape(_arrays.wrap(dst), call.shape)

        return self._submit(run(), "allreduce", name, call.flat, keep=(call, dst))

    def _describe(self, x, op, compression, name, error_feedback, rounding, hierarchical,
                  postscale):
        call = self._input(x)
        op = _choice("op", op, OPS)
        if op in EXACT_OPS:
            if compression not in (None, "none"):
                raise ValueError(f"op={op!r} runs uncompressed (quantized inputs would change "
                                 f"its result): drop compression={compression!r} or pass 'none'")
            compression = "none"
        comp = self._compression(compression, call)
        hier = self._hierarchical(hierarchical, comp)
        rounding = _choice("rounding", rounding or self.rounding, codec.ROUNDINGS)
        ef = self._ef_store(error_feedback, comp, name) is not None
        meta = self._meta("allreduce", call, name=name, op=op, compression=comp, ef=ef,
                          hierarchical=hier, rounding=rounding if comp == "squinch" else None,
                          postscale=float(postscale))
        return call, op, comp, hier, meta

    def _allreduce(self, plan: alg.Plan, call: _Call, dst: _arrays.Flat, op: str, hier: bool):
        """(in the operation) The allreduce itself, for a caller and for a
        joined rank answering it with zeros."""
        sub = {"local": self.local, "cross": self.cross} if hier else {}
        yield from alg.allreduce(self.transport, plan, _arrays.internal(call.flat), call.n,
                                 _arrays.internal(dst), **sub,
                                 average_of=self.size if op == "average" else 0)

    # ------------------------------------------------------------ reduce-scatter
    def reduce_scatter(self, x, **kwargs):
        """Reduce ``x``; return this rank's part of the flattened result and
        its element range: ``(shard, (start, stop))``.

        Args (keyword):
            op, compression, name, error_feedback, prescale, postscale,
                rounding, check_metadata, seed: as :meth:`allreduce`.
            counts: elements of every rank's part (one per rank, summing to
                ``x.size``); default: block-aligned shards. Horovod's row
                split is ``counts = rows_r * row_size``.

        The shard is float32 for float inputs (Squinch quantizes once here, no
        re-encode; sums in fp32), float64 for float64 and int64 for integers.
        """
        return self.reduce_scatter_async(x, **kwargs).wait()

    def reduce_scatter_async(self, x, *, op: str = "average", compression: str | None = None,
                             name: str | None = None, error_feedback=None, counts=None,
                             prescale: float = 1.0, postscale: float = 1.0,
                             rounding: str | None = None, check_metadata: bool | None = None,
                             seed: int | None = None) -> Handle:
        """Start :meth:`reduce_scatter`; returns a :class:`Handle`."""
        call = self._input(x)
        op = _choice("op", op, ("average", "sum"))
        comp = self._compression(compression, call)
        if counts is None:
            bounds = alg.shard_bounds(call.n, self.size)
        else:
            counts = _counts("counts", counts, self.size, call.n)
            bounds = [int(b) for b in np.cumsum([0] + counts)]
        plan = self._plan(comp, rounding, error_feedback, name, seed,
                          scale=(1.0 / self.size if op == "average" else 1.0) * float(postscale),
                          prescale=float(prescale), postscale=float(postscale))
        self._check_exact(call, prescale, postscale)
        meta = self._meta("reduce_scatter", call, name=name, op=op, compression=comp,
                          ef=plan.ef is not None, bounds=bounds, rounding=plan.rounding)
        lo, hi = bounds[self.rank], bounds[self.rank + 1]

        def run():
            yield from self._check(meta, check_metadata)
            shard = yield from alg.reduce_scatter(self.transport, plan, _arrays.internal(call.flat),
                                                  call.n, bounds,
                                                  average_of=self.size if op == "average" else 0)
            kind = _arrays.normalize_dtype(shard.dtype)
            return _arrays.wrap(_arrays.Flat(shard, kind, call.flat.family, call.flat.device,
                                             None)), (lo, hi)

        return self._submit(run(), "reduce_scatter", name, call.flat, keep=(call,))

    # ------------------------------------------------------------ allgather
    def allgather(self, x, *, compression: str | None = None, name: str | None = None,
                  check_metadata: bool | None = None):
        """Concatenate every rank's ``x`` along the first axis (sizes may differ
        in that axis only); exact for any dtype, or compressed (float kinds);
        the result is in ``x``'s type."""
        return self.allgather_async(x, compression=compression, name=name,
                                    check_metadata=check_metadata).wait()

    def allgather_async(self, x, *, compression: str | None = None, name: str | None = None,
                        check_metadata: bool | None = None) -> Handle:
        """Start :meth:`allgather`; returns a :class:`Handle`."""
        call = self._input(x)
        comp = self._raw_compression(compression, call)
        rows = call.shape[0] if call.shape else 1
        tail = tuple(call.shape[1:])
        plan = self._plan(comp, None, False, None, None)
        meta = self._meta("allgather", call, name=name, compression=comp, rows=rows, tail=tail)

        def run():
            metas = yield from self._check(meta, check_metadata, ignore=("shape", "rows"),
                                           exchange=True)
            per_row = int(np.prod(tail, dtype=np.int64))
            counts = [m["rows"] * per_row for m in metas]
            flat = yield from alg.allgather(self.transport, plan, _arrays.internal(call.flat),
                                            counts)
            out = _arrays.Flat(flat, call.flat.kind, call.flat.family, call.flat.device, None)
            return _reshape(_arrays.wrap(out), (sum(m["rows"] for m in metas),) + tail)

        return self._submit(run(), "allgather", name, call.flat, keep=(call,))

    # ------------------------------------------------------------ broadcast
    def broadcast(self, x, root: int = 0, *, compression: str = "none", name: str | None = None,
                  check_metadata: bool | None = None):
        """Copy ``x`` from ``root`` to every rank, in place; return ``x``.
        Uncompressed by default (parameters must arrive exact; any dtype);
        with compression the root sends the payload and every rank, the root
        too, decodes the same bytes, so all ranks hold identical values."""
        return self.broadcast_async(x, root, compression=compression, name=name,
                                    check_metadata=check_metadata).wait()

    def broadcast_async(self, x, root: int = 0, *, compression: str = "none",
                        name: str | None = None, check_metadata: bool | None = None) -> Handle:
        """Start :meth:`broadcast`; returns a :class:`Handle`."""
        call = self._input(x, writable=True)
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"root={root!r} is not a rank of this {self.size}-rank communicator")
        root = int(root)
        comp = self._raw_compression(compression, call)
        plan = self._plan(comp, None, False, None, None)
        meta = self._meta("broadcast", call, name=name, root=root, compression=comp)

        def run():
            yield from self._check(meta, check_metadata)
            yield from alg.broadcast(self.transport, plan, _arrays.internal(call.flat), call.n,
                                     root)
            return x

        return self._submit(run(), "broadcast", name, call.flat, keep=(call,))

    # ------------------------------------------------------------ alltoall
    def alltoall(self, x, splits=None, *, compression: str = "none", name: str | None = None,
                 check_metadata: bool | None = None):
        """Send ``splits[r]`` consecutive elements of flat ``x`` to rank r (equal
        splits by default); return (received flat array, received splits).
        With compression each split is encoded on its own and decoded on arrival."""
        return self.alltoall_async(x, splits, compression=compression, name=name,
                                   check_metadata=check_metadata).wait()

    def alltoall_async(self, x, splits=None, *, compression: str = "none",
                       name: str | None = None, check_metadata: bool | None = None) -> Handle:
        """Start :meth:`alltoall`; returns a :class:`Handle`."""
        call = self._input(x)
        if splits is None:
            if call.n % self.size:
                raise ValueError(f"{call.n} elements do not split evenly over {self.size} ranks: "
                                 "pass splits=")
            splits = [call.n // self.size] * self.size
        splits = _counts("splits", splits, self.size, call.n)
        comp = self._raw_compression(compression, call)
        plan = self._plan(comp, None, False, None, None)
        meta = self._meta("alltoall", call, name=name, splits=splits, compression=comp)

        def run():
            metas = yield from self._check(meta, check_metadata, ignore=("shape", "splits"),
                                           exchange=True)
            recv_splits = [m["splits"][self.rank] for m in metas]
            flat = yield from alg.alltoall(self.transport, plan, _arrays.internal(call.flat),
                                           splits, recv_splits)
            return _arrays.wrap(_arrays.Flat(flat, call.flat.kind, call.flat.family,
                                             call.flat.device, None)), recv_splits

        return self._submit(run(), "alltoall", name, call.flat, keep=(call,))

    # ------------------------------------------------------------ control
    def barrier(self):
        """Wait for every rank (TransportError after the timeout). With the
        metadata check on, the barrier is the check's exchange, so a rank
        that called another collective (or :meth:`join`) is seen."""
        def run():
            if self.check_metadata:
                yield from self._check({"collective": "barrier"}, True)
            else:
                yield self.transport.barrier()

        self._submit(run(), "barrier", None, None).wait()

    def join(self) -> int:
        """Horovod's join: this rank has run out of data. Until every rank
        has joined, it answers the other ranks' allreduces (op sum or
        average, any dtype and compression) with zeros and their barriers;
        an average still divides by the group size, joined ranks included.
        Returns the rank that joined last (the highest of those that joined
        together), on every rank.

        The other ranks may call only allreduce and barrier meanwhile (any
        other collective raises the same MismatchError on every rank). A
        joined rank learns their calls from the metadata check, so the check
        must be on (the default), and it waits at most ``timeout`` seconds
        for each of their calls (TransportError after that).
        """
        if not self.check_metadata:
            raise ValueError("join() needs the metadata check (check_metadata=True, the default "
                             "and SQUINCHCOMM_CHECK_METADATA=1): a joined rank learns the other "
                             "ranks' collectives from it")

        def run():
            rounds = 0  # Step 1: one exchange per collective of the others
            while True:
                metas = self._exchange({"collective": "join", "rounds": rounds})
                rounds += 1
                if all(m.get("collective") == "join" for m in metas):
                    # Step 3: everyone joined; the last are those in their first round
                    return max(r for r, m in enumerate(metas) if m["rounds"] == 0)
                full, _ = _joined(metas)
                live = next(m for m in metas if m.get("collective") != "join")
                check_agreement(live["collective"], full, list(live), _AGREE_HINT)
                if live["collective"] == "allreduce":
                    # Step 2: answer the allreduce with zeros, as the others run it
                    yield from self._allreduce_zeros(live)

        return self._submit(run(), "join", None, None).wait()

    def _allreduce_zeros(self, meta: dict):
        """(in the operation, joined rank) Take part in the allreduce that
        ``meta`` describes with zeros of its shape, dtype and device."""
        kind = meta["dtype"]
        if meta["device"] == "gpu":
            import cupy as xp
        else:
            xp = np
        dtype = _arrays._numpy_bfloat16() if kind == "bfloat16" else np.dtype(kind)
        call = self._input(xp.zeros(meta["shape"], dtype=dtype))
        op = meta["op"]
        plan = self._plan(meta["compression"], meta["rounding"], meta["ef"], meta.get("name"), None,
                          scale=(1.0 / self.size if op == "average" else 1.0) * meta["postscale"],
                          postscale=meta["postscale"])
        yield from self._allreduce(plan, call, self._output(None, call), op, meta["hierarchical"])

    def allgather_object(self, obj) -> list:
        """Return every rank's picklable ``obj`` in rank order (in the engine's
        order, behind the operations already submitted)."""
        def run():
            return self.transport.allgather_object(obj, self.timeout)
            yield  # a generator: the engine runs it like any operation

        return self._submit(run(), "allgather_object", None, None).wait()

    def synchronize(self, timeout: float | None = None):
        """Wait until every operation submitted so far has finished."""
        if not self.engine.drain(timeout):
            from squinchcomm.errors import TransportError

            raise TransportError(f"operations still running after {timeout:g} s")

    def state_dict(self) -> dict:
        """This rank's collective state: the call counter (it seeds the
        stochastic rounding of unnamed calls) and the error-feedback residuals.
        Save one per rank to resume bit-exactly."""
        return {"calls": self._calls, "error_feedback": self.error_feedback.state_dict()}

    def load_state_dict(self, state: dict):
        """Restore :meth:`state_dict` (same rank, same world size)."""
        self.error_feedback.reset()
        self.error_feedback.load_state_dict(state["error_feedback"], world=self.size)
        with self._calls_lock:
            self._calls = int(state["calls"])

    # ------------------------------------------------------------ helpers
    def _submit(self, op, what: str, name, flat: _arrays.Flat | None, keep=()) -> Handle:
        label = f"{what}" + (f" of '{name}'" if name else "") + f" on rank {self.rank}"
        gpu = (flat.family, flat.device) if flat is not None and flat.on_gpu else None
        return self.engine.submit(op, what=label, timeout=self.timeout, gpu=gpu, keep=keep,
                                  name=name)

    def _next_call(self) -> int:
        """A per-communicator call id, equal on every rank (collectives are
        issued in the same order everywhere): seeds rounding of unnamed calls."""
        with self._calls_lock:
            self._calls += 1
            return self._calls

    def _plan(self, comp: str, rounding, error_feedback, name, seed, *, scale: float = 1.0,
              prescale: float = 1.0, postscale: float = 1.0, op: str = "sum") -> alg.Plan:
        rounding = _choice("rounding", rounding or self.rounding, codec.ROUNDINGS)
        ef_store = self._ef_store(error_feedback, comp, name)
        plan = alg.Plan(wire=None if comp == "none" else get_wire(comp, rounding), scale=scale,
                        prescale=prescale, ef=ef_store,
                        ef_name=name if ef_store is not None else None, cid=self._next_call(),
                        seed=self.seed if seed is None else int(seed),
                        pipeline=self.pipeline_bytes // 4, timings=self.timings,
                        rounding=rounding if comp == "squinch" else None, op=op,
                        postscale=postscale)
        return plan

    def _ef_store(self, error_feedback, comp: str, name) -> ErrorFeedback | None:
        if isinstance(error_feedback, ErrorFeedback):
            ef_store = error_feedback
        elif (self.error_feedback_default if error_feedback is None else bool(error_feedback)):
            ef_store = self.error_feedback
        else:
            ef_store = None
        if comp == "none":
            ef_store = None
        if ef_store is not None and name is None:
            raise ValueError("error feedback keeps a residual per tensor: pass name= "
                             "(or error_feedback=False)")
        return ef_store

    def _input(self, x, writable: bool = False) -> _Call:
        flat = _arrays.flat_any(x)
        if writable and flat.family == "numpy" and not flat.data.flags.writeable:
            raise ValueError("the array is read-only; broadcast writes into it")
        return _Call(flat, tuple(x.shape), int(flat.data.size))

    def bytes_sent(self, x, compression: str | None = None, *,
                   collective: str = "allreduce") -> tuple[float, float]:
        """(bytes this rank sends, bytes it would send uncompressed) for one
        ``collective`` of ``x`` with ``compression`` (None: this
        communicator's default), in the ring model of :func:`wire_bytes`;
        uncompressed means in ``x``'s own dtype. The compression is what the
        call would really use: after the dtype, the ``min_compress_bytes``
        threshold and ``auto``'s model (whose first use probes the link, a
        collective)."""
        call = self._input(x)
        dense = (wire_bytes(call.n, self.size, "none", collective=collective)
                 * call.flat.data.dtype.itemsize / 4)
        sent = self._compression(compression, call)
        return (dense if sent == "none" else
                wire_bytes(call.n, self.size, sent, collective=collective)), dense

    def _compression(self, compression, call: _Call) -> str:
        comp = _choice("compression", compression or self.compression, CHOICES)
        if call.flat.kind not in _FLOAT_KINDS:
            if call.flat.kind.startswith("complex"):
                raise ValueError(f"cannot reduce {call.flat.kind} data: reduce its real and "
                                 "imaginary parts as float32 (x.real, x.imag)")
            return "none"  # float64 and integers: exact sums; bool: logical or; uncompressed
        itemsize = 4 if call.flat.kind == "float32" else 2
        if comp != "none" and call.n * itemsize < self.min_compress_bytes:
            return "none"  # small tensors: latency dominates, compression only adds error
        return self._auto(call.n) if comp == "auto" else comp

    def _raw_compression(self, compression, call: _Call) -> str:
        """Compression of a data-moving collective: what was asked for float
        kinds, none (exact bytes) for every other dtype."""
        comp = _choice("compression", compression or "none", CHOICES)
        if call.flat.kind not in _FLOAT_KINDS:
            return "none"
        return self._auto(call.n) if comp == "auto" else comp

    def _hierarchical(self, hierarchical, comp: str) -> bool:
        if comp == "none":
            return False
        if hierarchical is None:
            return self.hierarchical
        return bool(hierarchical) and self._can_split()

    @staticmethod
    def _check_exact(call: _Call, prescale, postscale):
        """Integers are scaled as Horovod scales them (float64, truncated);
        a scaled bool has no meaning."""
        if call.flat.kind == "bool" and (prescale != 1.0 or postscale != 1.0):
            raise ValueError("prescale/postscale of bool data: a logical or has no scale; "
                             "cast to an integer or float dtype first")

    def _output(self, out, call: _Call) -> _arrays.Flat:
        if out is None:
            return _arrays.new_buffer(call.flat, call.flat.kind, call.n)
        return _arrays.flat_buffer(out, "out", call.flat.kind, call.n, call.flat)

    def _meta(self, what: str, call: _Call, **extra) -> dict:
        return {"collective": what, "shape": call.shape, "dtype": call.flat.kind,
                "device": "gpu" if call.flat.on_gpu else "host", **extra}

    def _exchange(self, meta: dict) -> list[dict]:
        """(in the operation) Every rank's description: a digest from each
        (one small fixed-size allgather), and the descriptions themselves only
        when the digests differ (a mismatch, a joined rank, allgather's
        row counts), which every rank sees alike."""
        mine = hashlib.blake2b(repr(meta).encode(), digest_size=16).digest()
        if len(set(self.transport.allgather_digest(mine, self.timeout))) == 1:
            return [meta] * self.size
        return self.transport.allgather_object(meta, self.timeout)

    def _check(self, meta: dict, check_metadata, ignore=(), exchange=False):
        """(in the operation) Gather every rank's call description and raise
        the same ValueError on every rank if they disagree (instead of a hang
        or garbage). Returns all ranks' descriptions; ``exchange`` forces the
        gather even when checks are off (the caller needs the other ranks' sizes)."""
        check = self.check_metadata if check_metadata is None else bool(check_metadata)
        if not check and not exchange:
            if not self.transport.overruns_on_mismatch:
                return None
            # MPI writes past a receive buffer when a peer sends more than it
            # expects: what sizes the messages is agreed even with the check off.
            meta = {k: v for k, v in meta.items() if k in _SIZING}
            check = True
        metas, _ = _joined(self._exchange(meta))
        if check:
            check_agreement(meta["collective"], metas, [k for k in meta if k not in ignore],
                            _AGREE_HINT)
        return metas
        yield  # a generator, so that ``yield from`` runs it inside the operation


# ----------------------------------------------------------------------------
#: The parts of a call's description that size its messages (and what a
#: joined rank needs to answer it): agreed on MPI even with the check off.
_SIZING = ("collective", "op", "shape", "dtype", "device", "compression", "hierarchical",
           "bounds", "rows", "tail", "root", "splits", "ef", "rounding", "postscale")
_AGREE_HINT = (". Every rank must call the same collective with the same shape, dtype, "
               "compression and name")


def _joined(metas: list[dict]) -> tuple[list[dict], list[int]]:
    """The ranks' call descriptions with each joined rank's (see
    :meth:`Communicator.join`) replaced by the first other rank's, and the
    joined ranks. Raises the same MismatchError on every rank when the
    others called something a joined rank cannot answer."""
    joined = [r for r, m in enumerate(metas) if m.get("collective") == "join"]
    live = [(r, m) for r, m in enumerate(metas) if m.get("collective") != "join"]
    if not joined or not live:
        return metas, joined
    for r, m in live:
        what = m.get("collective")
        if not (what == "barrier" or (what == "allreduce" and m.get("op") in ("sum", "average"))):
            detail = what + (f" (op={m['op']})" if what == "allreduce" else "")
            raise MismatchError(f"rank {r} called {detail} while rank(s) "
                                f"{', '.join(map(str, joined))} had joined: until every rank "
                                "has joined, the others may only call allreduce (op sum or "
                                "average; joined ranks add zeros) and barrier")
    first = live[0][1]
    return [first if m.get("collective") == "join" else m for m in metas], joined


def check_agreement(what: str, metas: list[dict], keys, hint: str):
    """Raise the same MismatchError (a ValueError and a RuntimeError) on every
    rank when any of ``keys`` differs between the ranks' descriptions
    ``metas`` (from allgather_object); the message names each rank's value,
    then ``hint``. Ranks that called different collectives are told only
    that (their other keys describe different things), so the message is
    the same whichever rank writes it."""
    if len({m.get("collective") for m in metas}) > 1:
        keys, what = ["collective"], metas[0]["collective"]
    diff = {k: [m.get(k) for m in metas] for k in keys
            if len({repr(m.get(k)) for m in metas}) > 1}
    if diff:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={v!r}" for r, v in enumerate(vals))
                           for k, vals in diff.items())
        raise MismatchError(f"{what}: ranks disagree ({detail}){hint}")


def _counts(what: str, counts, world: int, n: int) -> list[int]:
    counts = [int(v) for v in (counts.tolist() if hasattr(counts, "tolist") else counts)]
    if len(counts) != world or min(counts) < 0 or sum(counts) != n:
        raise ValueError(f"{what}={counts} must have {world} non-negative entries summing to {n}")
    return counts


def _reshape(result, shape):
    return result.reshape(shape) if tuple(result.shape) != tuple(shape) else result


def _choice(what: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{what}={value!r}: choose one of {', '.join(choices)}")
    return value


def _as_transport(obj, timeout: float) -> Transport:
    if isinstance(obj, Transport):
        return obj
    if obj is None:
        from squinchcomm.transport.mpi import MPITransport

        return MPITransport(timeout=timeout)
    module = type(obj).__module__
    if module.startswith("mpi4py"):
        from squinchcomm.transport.mpi import MPITransport

        return MPITransport(obj, timeout=timeout)
    if module.startswith("torch"):
        from squinchcomm.transport.torch_dist import TorchTransport

        return TorchTransport(obj, timeout=timeout)
    raise ValueError(f"cannot communicate over a {type(obj).__name__}: pass a Transport, an "
                     "mpi4py communicator or a torch.distributed process group")
