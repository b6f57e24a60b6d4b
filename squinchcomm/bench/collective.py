"""Collective bandwidth and error, nccl-tests style: the engines, PyTorch's DDP
hooks and Squinch side by side in one job.

    mpirun -n 4 python -m squinchcomm.bench allreduce -b 1M -e 256M -f 4 -n 10 -w 2
    mpirun -n 4 python -m squinchcomm.bench reduce_scatter --transport torch --json rs.json
    torchrun --nproc-per-node 4 -m squinchcomm.bench allgather --transport torch -d float16

Every method runs in the same job on the same input buffers, interleaved
iteration by iteration (a noisy neighbour slows all methods alike); before
each call the ranks meet in the engine's blocking barrier (untimed). Inputs
are standard normal values from (seed, rank) rounded to ``--dtype``; each
rank computes the exact result in float64 locally, once per size (nccl-tests'
"verifiable").

Methods (``--methods``; default: every one this transport and collective offer)

allreduce, average:
  engine_fp32      the engine's own allreduce of fp32 (Communicator
                   compression="none": MPI Iallreduce / torch all_reduce);
                   fp16/bf16 inputs are summed in fp32. The baseline.
  engine_bf16      torch only: all_reduce (sum, in bf16) of a bf16 copy, then / N.
                   MPI has no bfloat16 datatype.
  ddp_fp16         torch only: PyTorch's DDP hooks, unmodified, on a stand-in
  ddp_bf16         GradBucket over the buffer (squinchcomm.bench.torch_methods):
  powersgd1        fp16_compress_hook, bf16_compress_hook, powerSGD_hook at
  powersgd4        matrix rank 1 / 4 with error feedback and warm start. PowerSGD
                   sees the buffer as 1024 x 1024 weight matrices; its first
                   start_powerSGD_iter (2) uncompressed calls run before the
                   warm-up, so every listed call is compressed (checked).
  squinch          the library's Squinch allreduce (two quantizations);
  squinch_ef       the same with error feedback (a residual kept across calls);
  squinch_hier     hierarchical mode: fp32 reduce inside a node, Squinch across
  squinch_hier_ef  nodes (--node-size, or the nodes the library detects: hosts,
                   or torchrun's GROUP_RANK / LOCAL_WORLD_SIZE); only where
                   nodes have several ranks and there are several nodes;
  fp16, bf16       the library's cast compressions (2 B on the wire, fp32 sums).
  auto             compression="auto": per size the fastest of none, bf16 and
                   squinch by the link model probed once before the sweep
                   (the header prints the model and each size's pick).
reduce_scatter, average (rank r keeps shard r):
  engine_fp32      MPI Reduce_scatter_block / torch reduce_scatter_single
                   (reduce_scatter_tensor before torch 2.13) of fp32, equal
                   shards, then / N;
  squinch, squinch_ef, fp16, bf16, auto   Communicator.reduce_scatter; its shards are
                   block-aligned, each compared with the exact shard it covers.
allgather:
  engine_fp32      MPI Allgather / torch all_gather_single (all_gather_into_tensor
                   before torch 2.13) of the input as it is (its dtype's bytes);
  squinch, fp16, bf16, auto   Communicator.allgather(compression=...).

Out of place by default: the library and the engines read the input buffer
and write one output buffer shared by all methods. ``--inplace`` (allreduce
only) passes the input as ``out=`` and refills it from a pristine copy
before each call, untimed. DDP hooks work in place on their bucket in both
modes, as in DDP: the bucket buffer is refilled before each call, untimed.

Columns (rank 0 prints; the JSON holds every row)

- size: bytes of ``--dtype`` the collective covers (nccl-tests): the tensor
  (allreduce), the whole input (reduce_scatter) or the gathered total
  (allgather); for the last two the count is rounded down to a multiple of N.
- time(us): median over iterations of the slowest rank's time for one call.
- algbw = size / time: effective bandwidth. The numerator is the uncompressed
  bytes for every method, so a compressed method that is faster shows a
  higher algbw.
- busbw = algbw * 2(N-1)/N for allreduce, algbw * (N-1)/N for reduce_scatter
  and allgather (nccl-tests' bus bandwidth: what each link of a ring moving
  the uncompressed data would carry).
- wire(MB/rank): MB (1e6 B) each rank sends per call, in the ring /
  direct-exchange model: 2(N-1)/N * payload for allreduce, (N-1)/N * payload
  for reduce_scatter and allgather, payload = the whole tensor as sent:
  4 B/element for engine_fp32 (MPI and gloo may pick other algorithms at some
  sizes); 2 B for engine_bf16, ddp_fp16/bf16, fp16, bf16; 6 B per 8 elements
  for squinch; the input's item size for allgather's engine_fp32. PowerSGD:
  the P and Q factors plus the gradients it leaves uncompressed, in the
  buffer's dtype, all allreduced (PowerSGD's own count of one compressed
  call). Hierarchical: only the bytes that leave the node, 2(C-1)/C * the
  Squinch payload of this rank's 1/L slice (C nodes of L ranks); the
  node-local fp32 reduce and allgather are not counted.
- relRMS = ||y - exact|| / ||exact||, maxerr = max |y - exact| over the result
  a rank holds (reduce_scatter: its shard); the worst rank.
- ident: every rank's result hashed to the same bytes; "-" for
  reduce_scatter, whose shards differ by design.

Error feedback (squinch_ef, squinch_hier_ef, powersgd1/4): each call also pays
back earlier residuals, so one call's error is not the point; the footer (and
``rel_rms_mean_of_calls``) gives the error of the mean of the timed calls'
results, which error feedback drives towards zero. Above MEAN_SAMPLE (4 Mi)
elements it is measured on a strided sample of the result (every k-th
element, at most 4 Mi of them: a relative precision of about 1e-3 on the
RMS). For the other methods that key repeats the last call's error.

The inputs are Gaussian noise, which has no low-rank structure: PowerSGD's
rank-1/4 approximation of it keeps almost nothing (relRMS near 1; real
gradients, closer to low rank, fare better), while the quantizers' errors
hardly depend on that structure. PowerSGD's numbers here are its speed and
wire volume, not its accuracy on real gradients.

A second table splits the library's compressed allreduces into the stages of
``Communicator.timings`` (ms per call, mean over the timed iterations): rank 0
and the maximum over ranks. ``other`` = rank 0's mean call time minus its
stages (metadata check, allocation, glue; for hierarchical methods also the
node-local reduce and allgather).

Memory per rank: the input and one output buffer shared by all methods, the
exact result in float64, a running-sum sample (at most 16 MB) per
error-feedback method, plus what the methods keep themselves (Squinch
residuals: 1 + 1/N tensors; PowerSGD: one tensor of error each, and a copy
and a new error tensor during a call). Error statistics and result digests
are computed once per method and size, after its last call, in 1 Mi-element
chunks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from squinchcomm import __version__, config
from squinchcomm.bench.common import add_sweep_args, size_sweep, versions
from squinchcomm.codec import oracle
from squinchcomm.collectives import Communicator, shard_bounds, wire_bytes

__all__ = ["main", "run", "allreduce_main", "reduce_scatter_main", "allgather_main",
           "COLLECTIVES", "METHODS", "STAGES", "DTYPES", "Method", "bus_factor"]

COLLECTIVES = ("allreduce", "reduce_scatter", "allgather")
#: --dtype -> bytes per element (bfloat16 is held as uint16 bits)
DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
STAGES = ("encode", "alltoall", "reduce_encode", "allgather", "decode")


@dataclass(frozen=True)
class Method:
    """What a benchmark method is.

    Attributes:
        impl: "engine" (the transport's own collective), "torch_hook"
            (PyTorch's DDP hook) or "squinchcomm" (the library's Communicator).
        compression: what travels: "none" (fp32), "fp16", "bf16", "squinch",
            "powersgd1", "powersgd4"; "input" for the engine's allgather.
        error_feedback: keeps a residual across calls.
        torch_only: needs ``--transport torch``.
        hierarchical: runs on the hierarchical communicator.
    """

    impl: str
    compression: str
    error_feedback: bool = False
    torch_only: bool = False
    hierarchical: bool = False


_LIB = "squinchcomm"
METHODS: dict[str, dict[str, Method]] = {
    "allreduce": {
        "engine_fp32": Method("engine", "none"),
        "engine_bf16": Method("engine", "bf16", torch_only=True),
        "ddp_fp16": Method("torch_hook", "fp16", torch_only=True),
        "ddp_bf16": Method("torch_hook", "bf16", torch_only=True),
        "powersgd1": Method("torch_hook", "powersgd1", True, torch_only=True),
        "powersgd4": Method("torch_hook", "powersgd4", True, torch_only=True),
        "squinch": Method(_LIB, "squinch"),
        "squinch_ef": Method(_LIB, "squinch", True),
        "squinch_hier": Method(_LIB, "squinch", hierarchical=True),
        "squinch_hier_ef": Method(_LIB, "squinch", True, hierarchical=True),
        "fp16": Method(_LIB, "fp16"),
        "bf16": Method(_LIB, "bf16"),
        "auto": Method(_LIB, "auto"),
    },
    "reduce_scatter": {
        "engine_fp32": Method("engine", "none"),
        "squinch": Method(_LIB, "squinch"),
        "squinch_ef": Method(_LIB, "squinch", True),
        "fp16": Method(_LIB, "fp16"),
        "bf16": Method(_LIB, "bf16"),
        "auto": Method(_LIB, "auto"),
    },
    "allgather": {
        "engine_fp32": Method("engine", "input"),
        "squinch": Method(_LIB, "squinch"),
        "fp16": Method(_LIB, "fp16"),
        "bf16": Method(_LIB, "bf16"),
        "auto": Method(_LIB, "auto"),
    },
}
_CHUNK = 1 << 20  # elements per step of the error statistics (bounded temporaries)
#: Most elements of the running sum kept per error-feedback method: above it,
#: the mean of the calls is measured on every k-th element (a strided sample
#: of the whole result) so that the sums stay small next to the tensors.
MEAN_SAMPLE = 1 << 22


def bus_factor(collective: str, world: int) -> float:
    """nccl-tests' busbw / algbw: 2(N-1)/N for allreduce, (N-1)/N otherwise."""
    return (2 if collective == "allreduce" else 1) * (world - 1) / world


def _wire(collective: str, compression: str, n: int, world: int, itemsize: int) -> float:
    """Bytes each rank sends for one call over ``n`` elements (the library's
    :func:`~squinchcomm.wire_bytes`; ``input``: uncompressed in the input dtype)."""
    if compression == "input":
        return wire_bytes(n, world, "none", collective=collective) * itemsize / 4
    return wire_bytes(n, world, compression, collective=collective)


# ---------------------------------------------------------------------------- data
def _input(seed: int, rank: int, n: int, dtype: str) -> np.ndarray:
    """Rank ``rank``'s input: standard normal from (seed, rank), rounded to
    ``dtype`` (bfloat16 as uint16 bits, to nearest even)."""
    z = np.random.default_rng([seed, rank]).standard_normal(n, dtype=np.float32)
    if dtype == "float16":
        return z.astype(np.float16)
    if dtype == "bfloat16":
        return oracle.from_float32(z, "bfloat16")
    return z


def _f32(a: np.ndarray) -> np.ndarray:
    """float32 values of a float32 / float16 / bfloat16-bits (uint16) array."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def _exact(collective: str, seed: int, world: int, n: int, dtype: str) -> np.ndarray:
    """The exact float64 result over all ranks' inputs, computed locally:
    their average (allreduce, reduce_scatter), or their concatenation (allgather)."""
    out = np.zeros(n, np.float64)
    if collective == "allgather":
        per = n // world
        for r in range(world):
            out[r * per:(r + 1) * per] = _f32(_input(seed, r, per, dtype))
        return out
    for r in range(world):
        out += _f32(_input(seed, r, n, dtype))
    out /= world
    return out


def _errors(y: np.ndarray, exact: np.ndarray, scale: float = 1.0) -> tuple[float, float]:
    """(relative RMS error, max absolute error) of ``scale * y`` against
    ``exact``, in chunks (no full-size temporaries); NaN in ``y`` shows as NaN."""
    sq_err = sq_ref = 0.0
    worst = np.float64(0.0)
    for lo in range(0, y.size, _CHUNK):
        e = exact[lo:lo + _CHUNK]
        d = _f32(y[lo:lo + _CHUNK]).astype(np.float64)
        if scale != 1.0:
            d *= scale
        d -= e
        sq_err += float(np.dot(d, d))
        sq_ref += float(np.dot(e, e))
        worst = np.maximum(worst, np.abs(d).max())
    return float(np.sqrt(sq_err)) / (float(np.sqrt(sq_ref)) or 1.0), float(worst)


def _sample_step(n: int) -> int:
    """The stride of the mean-of-calls sample of an ``n``-element result."""
    return -(-n // MEAN_SAMPLE)


def _accumulate(total: np.ndarray, y: np.ndarray) -> None:
    """total += y[::step] (float32) for the ``step`` that fits ``total``."""
    total += _f32(y[::_sample_step(y.size)])


def _digest(y: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(y).view(np.uint8).data, digest_size=16).hexdigest()


# ---------------------------------------------------------------------------- engines
class _MPIEngine:
    """MPI's own blocking collectives, on the library transport's communicator."""

    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm

    def barrier(self) -> None:
        self.comm.Barrier()

    def reduce_scatter(self, x32: np.ndarray, out: np.ndarray) -> None:
        self.comm.Reduce_scatter_block([x32, self.MPI.FLOAT], [out, self.MPI.FLOAT],
                                       op=self.MPI.SUM)

    def allgather(self, x: np.ndarray, out: np.ndarray) -> None:
        self.comm.Allgather([x.view(np.uint8), self.MPI.BYTE], [out.view(np.uint8), self.MPI.BYTE])


# ---------------------------------------------------------------------------- the run
@dataclass
class _Buffers:
    """One size's buffers (storage arrays: float32, float16, or bfloat16 as uint16)."""

    n: int             # elements the collective covers (the row's count)
    x: np.ndarray      # this rank's input (allgather: n / N elements)
    y: np.ndarray      # the output shared by all methods (allreduce, allgather)
    exact: np.ndarray  # (n,) float64


@dataclass
class _Runner:
    """One method at one size: ``call()`` runs one collective and returns
    (result, lo, hi), the result covering exact[lo:hi]."""

    call: Callable[[], tuple]
    refill: bool = False                     # copy the input into the output before each call
    comm: Communicator | None = None         # whose stage timings to record
    wire: Callable[[], float] | None = None  # bytes this rank sends per call


def _returning(fn, result):
    """A call that runs ``fn`` (in place) and returns ``result``."""
    def call():
        fn()
        return result
    return call


class _Bench:
    """Runs every method at every size (collective: every rank calls it)."""

    def __init__(self, collective, comm, comm_hier, engine, dtype, inplace, seed, torch_family):
        self.collective, self.comm, self.comm_hier = collective, comm, comm_hier
        self.engine, self.dtype, self.inplace, self.seed = engine, dtype, inplace, seed
        self.world, self.rank = comm.size, comm.rank
        self.itemsize = DTYPES[dtype]
        # The library gets torch tensors under the torch transport (as a torch user
        # passes them) and for bfloat16 (NumPy has none); NumPy arrays otherwise.
        self.tm = None
        if torch_family:
            from squinchcomm.bench import torch_methods

            self.tm = torch_methods

    def _arg(self, a):
        return self.tm.as_tensor(a) if self.tm is not None else a

    def _np(self, a):
        return self.tm.as_numpy(a) if self.tm is not None else a

    def count(self, size: int) -> int:
        """Elements a ``size``-byte row covers (a multiple of N but for allreduce)."""
        n = max(1, size // self.itemsize)
        if self.collective != "allreduce":
            n = max(1, n // self.world) * self.world
        return n

    def buffers(self, n: int) -> _Buffers:
        per = n // self.world if self.collective == "allgather" else n
        x = _input(self.seed, self.rank, per, self.dtype)
        y = np.empty(n, x.dtype) if self.collective != "reduce_scatter" else x[:0]
        return _Buffers(n, x, y, _exact(self.collective, self.seed, self.world, n, self.dtype))

    # ------------------------------------------------------------ runners
    def runner(self, name: str, m: Method, b: _Buffers) -> _Runner:
        if self.collective == "allreduce":
            r = self._allreduce(name, m, b)
        elif self.collective == "reduce_scatter":
            r = self._reduce_scatter(name, m, b)
        else:
            r = self._allgather(name, m, b)
        if r.wire is None:
            comp = m.compression
            if comp == "auto":  # what auto sends (an uncompressed all-gather: the input's bytes)
                comp = self.comm.link_model.choose(b.n)
                comp = "input" if comp == "none" and self.collective == "allgather" else comp
            wire = _wire(self.collective, comp, b.n, self.world, self.itemsize)
            r.wire = lambda: wire
        return r

    def _allreduce(self, name: str, m: Method, b: _Buffers) -> _Runner:
        whole = (b.y, 0, b.n)
        if m.impl == _LIB or name == "engine_fp32":
            comm = self.comm_hier if m.hierarchical else self.comm
            src, out = self._arg(b.y if self.inplace else b.x), self._arg(b.y)
            ef_name = f"bench/{name}" if m.error_feedback else None

            def call():
                comm.allreduce(src, op="average", compression=m.compression, out=out,
                               error_feedback=m.error_feedback, name=ef_name)
                return whole

            r = _Runner(call, refill=self.inplace, comm=comm)
            if m.hierarchical:
                r.wire = self._hier_wire(b.n)
            return r
        # Through torch: the engine's bf16 allreduce and PyTorch's hooks.
        tm, group = self.tm, self.engine.group
        out = tm.as_tensor(b.y)
        if name == "engine_bf16":
            src = tm.as_tensor(b.y if self.inplace else b.x)
            run = tm.engine_bf16_allreduce(src, out, group, self.world)
            return _Runner(_returning(run, whole), refill=self.inplace)
        if name.startswith("ddp_"):
            run = tm.ddp_cast_hook(m.compression, out, group)
            return _Runner(_returning(run, whole), refill=True)
        psgd = tm.PowerSGD(out, int(name[len("powersgd"):]), group, self.seed)
        psgd.warm_up(lambda: np.copyto(b.y, b.x))
        return _Runner(_returning(psgd, whole), refill=True,
                       wire=lambda: _wire("allreduce", "input", psgd.sent_elements,
                                          self.world, self.itemsize))

    def _hier_wire(self, n: int):
        """Bytes leaving the node per rank: the cross-node Squinch allreduce of
        this rank's slice (the node-local fp32 traffic is not counted)."""
        h = self.comm_hier
        bounds = shard_bounds(n, h.local_size)
        piece = bounds[h.local_rank + 1] - bounds[h.local_rank]
        wire = wire_bytes(piece, h.cross_size, "squinch")
        return lambda: wire

    def _reduce_scatter(self, name: str, m: Method, b: _Buffers) -> _Runner:
        if name == "engine_fp32":
            per = b.n // self.world
            out = np.empty(per, np.float32)
            lo = self.rank * per

            def call():
                # The fp32 upcast of a 2-byte input is part of the call (as in
                # the library's engine path).
                self.engine.reduce_scatter(_f32(b.x), out)
                np.multiply(out, np.float32(1 / self.world), out=out)
                return out, lo, lo + per

            return _Runner(call)
        src, comm = self._arg(b.x), self.comm
        ef_name = f"bench/{name}" if m.error_feedback else None

        def call():
            shard, (lo, hi) = comm.reduce_scatter(src, op="average", compression=m.compression,
                                                  error_feedback=m.error_feedback, name=ef_name)
            return self._np(shard), lo, hi

        return _Runner(call)

    def _allgather(self, name: str, m: Method, b: _Buffers) -> _Runner:
        if name == "engine_fp32":
            def call():
                self.engine.allgather(b.x, b.y)
                return b.y, 0, b.n

            return _Runner(call)
        src, comm = self._arg(b.x), self.comm

        def call():
            return self._np(comm.allgather(src, compression=m.compression)), 0, b.n

        return _Runner(call)

    # ------------------------------------------------------------ one size
    def measure(self, size: int, methods: list[str], iters: int, warmup: int, tick=None):
        """Every method at one size, interleaved per iteration; returns this
        rank's summary per method (times, errors, digest, stages, wire)."""
        table = METHODS[self.collective]
        b = self.buffers(self.count(size))
        runners = {name: self.runner(name, table[name], b) for name in methods}
        times = {name: [] for name in methods}
        stages = {name: {} for name in methods}
        sums: dict[str, np.ndarray] = {}
        mine = {}
        total = warmup + iters
        for it in range(total):
            timed = it >= warmup
            for name in methods:  # interleaved: drift and noise hit every method alike
                r = runners[name]
                if r.refill:
                    np.copyto(b.y, b.x)
                self.engine.barrier()
                if r.comm is not None:
                    r.comm.timings = stages[name] if timed else None
                t0 = time.perf_counter()
                y, lo, hi = r.call()
                dt = time.perf_counter() - t0
                if r.comm is not None:
                    r.comm.timings = None
                if timed:
                    times[name].append(dt)
                    if table[name].error_feedback:
                        samples = len(range(0, hi - lo, _sample_step(hi - lo)))
                        _accumulate(sums.setdefault(name, np.zeros(samples, np.float32)), y)
                if it == total - 1:  # statistics once, from the last call's result
                    exact = b.exact[lo:hi]
                    rel, worst = _errors(y, exact)
                    rel_mean = (_errors(sums[name], exact[::_sample_step(hi - lo)], 1 / iters)[0]
                                if name in sums else rel)
                    mine[name] = dict(times=times[name], rel=rel, max=worst, rel_mean=rel_mean,
                                      digest=_digest(y), wire=r.wire(),
                                      stages={k: v / iters for k, v in stages[name].items()})
                    sums.pop(name, None)
            if tick is not None:
                tick()
        # Residuals are per size: drop them so the next size starts clean (and
        # the memory of this one is returned).
        for comm in (self.comm, self.comm_hier):
            if comm is not None:
                comm.error_feedback.reset()
        return b.n, mine

    def rows(self, n: int, everyone: list[dict], methods: list[str], iters: int):
        """The rows of one size from every rank's summary (the same on every rank)."""
        rows, stage_rows = [], []
        nbytes = n * self.itemsize
        factor = bus_factor(self.collective, self.world)
        for name in methods:
            m = METHODS[self.collective][name]
            per_rank = [e[name] for e in everyone]
            # A call ends when its slowest rank does: per-iteration max, then median.
            slowest = [max(r["times"][i] for r in per_rank) for i in range(iters)]
            t = statistics.median(slowest)
            algbw = nbytes / t / 1e9
            ident = None if self.collective == "reduce_scatter" else \
                len({r["digest"] for r in per_rank}) == 1
            rows.append(dict(
                collective=self.collective, size=nbytes, count=n, type=self.dtype,
                redop="none" if self.collective == "allgather" else "avg", method=name,
                impl=m.impl, compression=m.compression, error_feedback=m.error_feedback,
                time_us=t * 1e6, time_us_rank0=statistics.median(per_rank[0]["times"]) * 1e6,
                algbw=algbw, busbw=algbw * factor,
                wire_mb=max(r["wire"] for r in per_rank) / 1e6,
                rel_rms=max(r["rel"] for r in per_rank), max_err=max(r["max"] for r in per_rank),
                rel_rms_mean_of_calls=max(r["rel_mean"] for r in per_rank), calls=iters,
                bit_identical=ident, times_us=[v * 1e6 for v in slowest]))
            r0 = per_rank[0]["stages"]
            if r0:
                mean0 = statistics.fmean(per_rank[0]["times"])
                stage_rows.append(dict(
                    size=nbytes, method=name,
                    rank0_ms={s: r0.get(s, 0.0) * 1e3 for s in STAGES},
                    max_ms={s: max(r["stages"].get(s, 0.0) for r in per_rank) * 1e3
                            for s in STAGES},
                    call_ms=mean0 * 1e3, other_ms=(mean0 - sum(r0.values())) * 1e3))
        return rows, stage_rows


def run(bench: _Bench, sizes, methods, iters=10, warmup=2, emit=None, tick=None):
    """Measure every method at every size; collective (all ranks call it).

    Args:
        bench: the configured benchmark.
        sizes: byte sizes (of the input dtype).
        methods: names from ``METHODS[collective]``.
        iters / warmup: timed and untimed calls per method and size.
        emit: called as ``emit(rows, stage_rows)`` per size on every rank.
        tick: called after every iteration (the progress bar).

    Returns:
        (rows, stage rows): lists of dicts, identical on every rank.
    """
    rows, stage_rows = [], []
    for size in sizes:
        n, mine = bench.measure(size, methods, iters, warmup, tick)
        everyone = bench.comm.transport.allgather_object(mine, bench.comm.timeout)
        new_rows, new_stages = bench.rows(n, everyone, methods, iters)
        rows += new_rows
        stage_rows += new_stages
        if emit is not None:
            emit(new_rows, new_stages)
    return rows, stage_rows


# ---------------------------------------------------------------------------- setup
def _transport(kind: str):
    """(transport, engine, description) for --transport."""
    if kind == "mpi":
        from squinchcomm.transport.mpi import MPITransport

        tr = MPITransport()
        from mpi4py import MPI

        lib = MPI.Get_library_version().strip("\x00 \n").splitlines()[0].split(",")[0]
        return tr, _MPIEngine(tr.comm), f"mpi (mpi4py, {lib})"
    from squinchcomm.bench.torch_methods import TorchEngine
    from squinchcomm.transport.torch_dist import TorchTransport, init_process_group_from_env

    init_process_group_from_env(backend="gloo")
    tr = TorchTransport()
    return tr, TorchEngine(tr.group), f"torch (torch.distributed {tr.backend})"


def _hierarchical(transport, node_size, rounding, check_metadata):
    """(hierarchical Communicator, None) or (None, why the hierarchical methods
    cannot run). The answer is the same on every rank (it comes from gathered
    node layouts)."""
    try:
        comm = Communicator(transport, min_compress_bytes=0, hierarchical=True,
                            node_size=node_size, error_feedback=False, rounding=rounding,
                            check_metadata=check_metadata)
    except ValueError as exc:
        if node_size:
            raise
        return None, f"{exc}"
    if comm.local_size == 1:
        return None, (f"every node found holds one rank ({comm.cross_size} nodes): nothing "
                      "to reduce inside a node; pass --node-size K to group K consecutive "
                      "ranks into a node")
    if comm.cross_size == 1:
        return None, (f"one node holds all {comm.size} ranks: nothing leaves the node; pass "
                      "--node-size K (a divisor of the world size below it) to simulate "
                      "K-rank nodes")
    return comm, None


def _choose_methods(collective: str, spec: str | None, transport: str) -> list[str]:
    """The methods to run, validated against the collective and transport
    (hierarchical availability is checked once the communicator exists)."""
    table = METHODS[collective]
    if spec is None:
        return [n for n, m in table.items() if transport == "torch" or not m.torch_only]
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in chosen if s not in table]
    if bad or not chosen:
        raise ValueError(f"--methods {spec!r}: {collective} offers {', '.join(table)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--methods {spec!r} names a method twice: list each once")
    if transport == "mpi":
        if "engine_bf16" in chosen:
            raise ValueError("--methods engine_bf16: MPI has no bfloat16 datatype, so there is "
                             "no engine bf16 allreduce over MPI; use --transport torch")
        torch_only = [s for s in chosen if table[s].torch_only]
        if torch_only:
            raise ValueError(f"--methods {','.join(torch_only)}: PyTorch's DDP hooks run over "
                             "torch.distributed; use --transport torch")
    return chosen


def _progress_bar(enabled, total: int, desc: str):
    """A tqdm bar on stderr, or None. ``enabled`` None: only on a terminal, and
    only if tqdm is installed (``--progress`` checks that it is)."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None
    if importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="iter", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------- output
def _header(args, collective, bench, desc, methods, unavailable, layout, threads) -> str:
    v = versions()
    numba_threads = os.environ.get("NUMBA_NUM_THREADS", "unset (one per core)")
    mode = "in-place (out= the input)" if args.inplace else "out-of-place"
    op = "none" if collective == "allgather" else "average"
    lines = [
        f"# squinchcomm {__version__} {collective} benchmark",
        f"# sizes {args.minbytes}..{args.maxbytes} x{args.stepfactor} (bytes of {args.dtype})  "
        f"iters {args.iters}  warmup {args.warmup}  seed {args.seed}  dtype {args.dtype}  "
        f"op {op}  {mode}",
        f"# methods {','.join(methods)}" + ("" if args.methods else "  (default: all available)"),
    ]
    lines += [f"#   not run: {', '.join(names)}: {why}" for why, names in unavailable.items()]
    lines += [
        f"# network {_network()}",
        f"# transport {desc}  world {bench.world}  {layout}",
        f"# rounding {bench.comm.rounding}  min_compress_bytes 0  pipeline_bytes "
        f"{bench.comm.pipeline_bytes}  check_metadata "
        f"{bench.comm.check_metadata}  codec backend {config.codec_backend()}  NUMBA_NUM_THREADS "
        f"{numba_threads}" + (f"  torch threads {threads}" if threads else ""),
        f"# device host memory (CPU {v['cpu']}, {os.cpu_count()} cores)  host {platform.node()} "
        f"{platform.machine()}",
        "# " + "  ".join(f"{k} {val}" for k, val in v.items() if k != "cpu")
        + f"  nccl {_nccl_version()}",
        "# time = median over iterations of the slowest rank (engine barrier before each call, "
        "not timed); methods interleaved per iteration",
        f"# algbw = size / time (uncompressed {args.dtype} bytes: effective bandwidth); busbw = "
        f"algbw * {'2(N-1)/N' if collective == 'allreduce' else '(N-1)/N'}",
        f"# wire = MB (1e6 B) each rank sends per call, ring/direct model "
        f"{'2(N-1)/N' if collective == 'allreduce' else '(N-1)/N'} * payload (see --help); "
        "hierarchical: only cross-node bytes",
        "# relRMS, maxerr: worst rank vs the exact fp64 result; ident: all ranks' results "
        "bit-identical" + (" (- : shards differ by design)" if collective == "reduce_scatter"
                           else ""),
        f"# {'size':>10} {'count':>10} {'type':>8} {'redop':>5} {'method':>15} "
        f"{'time(us)':>10} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'wire(MB/rank)':>13} "
        f"{'relRMS':>9} {'maxerr':>9} {'ident':>5}",
    ]
    return "\n".join(lines)


def _network() -> str:
    """What connects the ranks: bench/shaped_cluster.py describes its links in
    SQUINCHCOMM_BENCH_NETWORK."""
    return os.environ.get("SQUINCHCOMM_BENCH_NETWORK") or "this machine (shared memory / loopback)"


def _nccl_version() -> str:
    """torch's NCCL where a GPU is visible; the benchmark itself moves host memory."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            return ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            pass
    return "not used"


def _row(r) -> str:
    ident = "-" if r["bit_identical"] is None else ("yes" if r["bit_identical"] else "NO")
    return (f"  {r['size']:>10} {r['count']:>10} {r['type']:>8} {r['redop']:>5} "
            f"{r['method']:>15} {r['time_us']:>10.1f} {r['algbw']:>11.3f} {r['busbw']:>11.3f} "
            f"{r['wire_mb']:>13.3f} {r['rel_rms']:>9.2e} {r['max_err']:>9.2e} {ident:>5}")


def _stage_table(stage_rows) -> str:
    lines = ["#",
             "# Per-stage time of the library's compressed allreduces, ms per call (mean over "
             "timed iterations): rank 0 / max over ranks",
             "# exchange stages include waiting for the slowest peer; other = rank 0 call "
             "time - its stages (metadata check, allocation, glue, node-local steps)",
             f"# {'size':>10} {'method':>15} " + " ".join(f"{s:>15}" for s in STAGES)
             + f" {'other':>7} {'call':>8}"]
    for s in stage_rows:
        cells = " ".join(f"{s['rank0_ms'][k]:>7.2f}/{s['max_ms'][k]:<7.2f}" for k in STAGES)
        lines.append(f"# {s['size']:>10} {s['method']:>15} {cells} {s['other_ms']:>7.2f} "
                     f"{s['call_ms']:>8.2f}")
    return "\n".join(lines)


def _footer(rows, methods, rss_mb) -> str:
    lines = ["#"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        line = (f"# {m:>15}: avg busbw {statistics.fmean(r['busbw'] for r in mine):.3f} GB/s, "
                f"worst relRMS {max(r['rel_rms'] for r in mine):.2e}")
        if mine[0]["error_feedback"]:
            line += (f", relRMS of the mean of {mine[0]['calls']} calls "
                     f"{max(r['rel_rms_mean_of_calls'] for r in mine):.2e}")
        lines.append(line)
    checked = [r for r in rows if r["bit_identical"] is not None]
    if checked:
        bad = [f"{r['method']}@{r['size']}" for r in checked if not r["bit_identical"]]
        lines.append("# bit-identical results on every rank: "
                     + ("all rows" if not bad else "NOT for " + ", ".join(bad)))
    lines.append("# peak RSS per rank (MB): " + " ".join(f"{v:.0f}" for v in rss_mb))
    if not os.environ.get("SQUINCHCOMM_BENCH_NETWORK"):  # set by bench/shaped_cluster.py
        lines.append("# one machine: the exchange runs through shared memory/loopback, so "
                     "compression cannot win on time here; see the stage table for where time "
                     "goes")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def _parser(collective: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m squinchcomm.bench {collective}",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p, unit="bytes of --dtype")
    p.add_argument("-d", "--dtype", default="float32", choices=list(DTYPES),
                   help="input dtype (default float32)")
    p.add_argument("--transport", default="mpi", choices=["mpi", "torch"],
                   help="mpi (COMM_WORLD) or torch (gloo, from torchrun's or mpirun's "
                        "environment); default mpi")
    p.add_argument("--methods", default=None,
                   help=f"comma list of {', '.join(METHODS[collective])} (default: all "
                        "available on the transport)")
    p.add_argument("--inplace", action="store_true",
                   help="allreduce only: out= the input buffer, refilled (untimed) before "
                        "each call (default out-of-place)")
    p.add_argument("--node-size", type=int, default=None,
                   help="ranks per node for the hierarchical methods (default: detect)")
    p.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"],
                   help="Squinch rounding (default nearest)")
    p.add_argument("--no-check-metadata", dest="check_metadata", action="store_false",
                   default=None, help="skip the library's per-call metadata allgather "
                                      "(default: SQUINCHCOMM_CHECK_METADATA, on)")
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument("--json", metavar="FILE", help="rank 0 writes parameters and rows as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on rank 0's stderr (default: only when it is a terminal)")
    return p


def main(argv=None, collective: str = "allreduce") -> dict:
    """Run the benchmark of ``collective`` (every rank calls it); returns the
    result dict. Bad arguments exit with status 2 on every rank alike."""
    if collective not in COLLECTIVES:
        raise ValueError(f"collective={collective!r}: choose one of {', '.join(COLLECTIVES)}")
    p = _parser(collective)
    args = p.parse_args(argv)
    # Validate before any collective, so every rank fails the same way.
    try:
        sizes = size_sweep(args.minbytes, args.maxbytes, args.stepfactor)
        if args.iters < 1 or args.warmup < 0:
            raise ValueError(f"-n {args.iters} -w {args.warmup}: pass at least one timed "
                             "iteration and a non-negative warm-up count")
        if args.inplace and collective != "allreduce":
            raise ValueError(f"--inplace: only allreduce takes out= (Communicator.{collective} "
                             "returns a new array); drop --inplace")
        if args.node_size is not None and args.node_size < 1:
            raise ValueError(f"--node-size {args.node_size}: pass a positive number of ranks")
        methods = _choose_methods(collective, args.methods, args.transport)
        if args.progress and importlib.util.find_spec("tqdm") is None:
            raise ValueError("--progress needs tqdm: pip install 'squinchcomm[bench]' "
                             "(or pip install tqdm)")
    except ValueError as exc:
        p.error(str(exc))

    # The engines and groups are left to the exit handler (see squinchcomm.bench.__main__).
    transport, engine, desc = _transport(args.transport)
    table = METHODS[collective]
    comm_hier, unavailable = None, {}
    try:
        if args.node_size and transport.size % args.node_size:
            raise ValueError(f"--node-size {args.node_size} does not divide the world size "
                             f"{transport.size}")
        if any(table[m].hierarchical for m in methods):
            comm_hier, why = _hierarchical(transport, args.node_size, args.rounding,
                                           args.check_metadata)
            hier = [m for m in methods if table[m].hierarchical]
            if why is not None and args.methods is not None:
                raise ValueError(f"--methods {','.join(hier)}: {why}")
            if why is not None:
                unavailable[why] = hier
                methods = [m for m in methods if m not in hier]
    except ValueError as exc:
        # Every rank found the same error; meet first, so that no rank is still
        # inside a collective (or torch's store, hosted by rank 0) when one exits.
        engine.barrier()
        p.error(str(exc))

    # Built after the hierarchical one, so the codec's share of the cores follows
    # the real node layout (the last Communicator sets it). min_compress_bytes=0:
    # the compressed path at every size; hierarchical off: flat Squinch.
    comm = Communicator(transport, min_compress_bytes=0, hierarchical=False, error_feedback=False,
                        rounding=args.rounding, check_metadata=args.check_metadata)
    torch_family = args.transport == "torch" or args.dtype == "bfloat16"
    threads = None
    if torch_family:
        from squinchcomm.bench.torch_methods import share_cores

        threads = share_cores(comm.local_size)
    bench = _Bench(collective, comm, comm_hier, engine, args.dtype, args.inplace, args.seed,
                   torch_family)
    # "auto" probes once, here, with the codec threads the timed calls use.
    auto = comm.measure_link() if any(METHODS[collective][m].compression == "auto"
                                      for m in methods) else None
    nodes = comm_hier or comm
    layout = (f"nodes {nodes.cross_size} x {nodes.local_size} ranks "
              f"({'--node-size' if comm_hier is not None and args.node_size else 'detected'})")
    root = comm.rank == 0
    if root:
        print(_header(args, collective, bench, desc, methods, unavailable, layout, threads),
              flush=True)
        if auto is not None:
            print(f"# auto: {auto.describe()}; chose "
                  + ", ".join(f"{size} {auto.choose(bench.count(size))}" for size in sizes),
                  flush=True)
    bar = _progress_bar(args.progress, len(sizes) * (args.warmup + args.iters),
                        collective) if root else None

    def emit(rows, _stage_rows):
        if root:
            for r in rows:
                text = _row(r)
                if bar is not None:
                    bar.write(text, file=sys.stdout)
                else:
                    print(text, flush=True)

    rows, stage_rows = run(bench, sizes, methods, args.iters, args.warmup, emit,
                           tick=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    rss_mb = [kb / 1024 for kb in transport.allgather_object(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, comm.timeout)]  # KB on Linux
    doc = {"collective": collective, "args": vars(args), "versions": versions(),
           "transport": desc, "network": _network(), "world_size": comm.size, "layout": layout,
           "methods": methods,
           "not_run": {", ".join(v): k for k, v in unavailable.items()},
           "numba_num_threads": os.environ.get("NUMBA_NUM_THREADS"), "torch_threads": threads,
           "check_metadata": comm.check_metadata, "pipeline_bytes": comm.pipeline_bytes,
           "peak_rss_mb": rss_mb, "rows": rows,
           "stages": stage_rows, "auto_model": None if auto is None else auto.to_dict()}
    if root:
        if stage_rows:
            print(_stage_table(stage_rows), flush=True)
        print(_footer(rows, methods, rss_mb), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(doc, fh, indent=1)
    comm.barrier()  # nobody tears the transport down while rank 0 still writes
    return doc


def allreduce_main(argv=None) -> dict:
    """``python -m squinchcomm.bench allreduce``."""
    return main(argv, "allreduce")


def reduce_scatter_main(argv=None) -> dict:
    """``python -m squinchcomm.bench reduce_scatter``."""
    return main(argv, "reduce_scatter")


def allgather_main(argv=None) -> dict:
    """``python -m squinchcomm.bench allgather``."""
    return main(argv, "allgather")
