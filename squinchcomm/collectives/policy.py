"""``compression="auto"``: pick none, bf16 or Squinch per message size from a
model of this job's link and codec speed.

A compressed allreduce pays when the wire time it saves is longer than the
codec time it adds; which one wins depends on the link, the cores, the world
size and the message size, and users who turn compression on over a fast
network lose time (the most common complaint about gradient compression).
``auto`` models the time of one allreduce of ``n`` fp32 elements for each
candidate method ``m`` as

    T_none(n)    = a_none + W_none(n)
    T_m(n)       = a_m + max(C_m(n), W_m(n)) + min(C_m(n), W_m(n)) / K(n)   (bf16, squinch)
    W_m(n)       = wire_bytes(n, world, m) / B          (squinchcomm.wire_bytes)
    C_m(n)       = c_m * n                              (codec seconds per element)
    K(n)         = ceil(4 n / pipeline_bytes)           (the compressed path's chunks)

and sends each message in the method with the smallest time (a lossier
method only when it is at least 2% faster): up to the largest probed size
the probe's measured times (interpolated), above it the formula. The
parameters (the latencies ``a_m``, the link rate ``B`` in bytes per second
that one rank reaches, the codec costs ``c_m``) are either given
(:meth:`LinkModel.from_rates`) or measured by :func:`probe`, a short
collective run once when a :class:`~squinchcomm.Communicator` is built with
``compression="auto"`` (or at its first ``auto`` call):

1. Step 1: every method runs 5 allreduces of each probe size (default
   256 KiB, 1 MiB and 4 MiB of fp32, and 16 MiB where 4 MiB uncompressed
   took under 0.1 s; interleaved, after a barrier, one warm-up round),
   through the communicator itself, so the times include its engine, its
   metadata check, its codec threads sharing the cores with the other ranks,
   and its hierarchy if it has one.
2. Step 2: each rank keeps its fastest repeat; the slowest rank's times are
   taken (a collective is as slow as its slowest rank), so every rank holds
   the same numbers.
3. Step 3: each method's times are fitted to ``a + b n`` (least squares of
   the relative residuals);
   ``B`` comes from the uncompressed slope, ``c_m`` is what is left of
   ``b_m`` after its wire time (never negative). Probe sizes stay within
   one pipeline chunk (16 MiB by default), so the fitted slope is codec plus
   wire and the model extrapolates the pipelining to larger messages.

Every rank fits the same floats in the same order, so every rank picks the
same method for the same size; the metadata check compares the resolved
method anyway. The model is logged once (logger ``squinchcomm``, rank 0)
and re-measured by :meth:`Communicator.measure_link`.

Reduce-scatter and all-gather with ``auto`` use the allreduce model at the
same size: both are one of its two passes, so the methods rank the same.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from squinchcomm.collectives.algorithms import chunk_bounds
from squinchcomm.collectives.wire import COMPRESSIONS, wire_bytes

__all__ = ["CHOICES", "CANDIDATES", "MARGIN", "PROBE_BYTES", "EXTEND_BELOW_S", "LinkModel", "probe",
           "pipeline_chunks", "overlapped_seconds"]

#: What ``compression=`` accepts: the wire formats and "auto".
CHOICES = COMPRESSIONS + ("auto",)
#: The methods "auto" chooses between (fp16 sends the bytes of bf16 with a
#: narrower range, so it is never the better pick).
CANDIDATES = ("none", "bf16", "squinch")
#: How much faster (relative) a lossier method must be modelled to be chosen:
#: near a crossover the methods cost the same, and the exact one is better.
MARGIN = 0.02
#: The probe adds a 4x larger size where the largest uncompressed call took
#: less than this many seconds.
EXTEND_BELOW_S = 0.1
#: fp32 bytes of the probe's messages.
PROBE_BYTES = (256 << 10, 1 << 20, 4 << 20)

log = logging.getLogger("squinchcomm")


def pipeline_chunks(n: int, pipeline_bytes: int) -> int:
    """K, the chunks the compressed allreduce pipelines ``n`` fp32 elements in:
    ceil(4n / pipeline_bytes) block-aligned chunks, 1 when ``pipeline_bytes`` is 0."""
    if pipeline_bytes < 0:
        raise ValueError(f"pipeline_bytes={pipeline_bytes}: pass 0 (no pipelining) or a "
                         "positive chunk size in fp32 bytes, like 16M")
    return len(chunk_bounds(int(n), pipeline_bytes // 4)) - 1


def overlapped_seconds(codec_s: float, wire_s: float, chunks: int) -> float:
    """Codec and wire overlapped over ``chunks`` pipeline chunks: only the shorter
    stage of one chunk is not hidden, max(C, W) + min(C, W) / K."""
    return max(codec_s, wire_s) + min(codec_s, wire_s) / chunks


@dataclass(frozen=True)
class LinkModel:
    """Modelled seconds per allreduce, per method, for one communicator.

    Attributes:
        world: ranks of the communicator.
        bytes_per_s: the link rate one rank sends at (effective, > 0).
        latency: seconds per call of each method in :data:`CANDIDATES`.
        codec_s_per_elem: compute seconds per element of each method (none: 0).
        pipeline_bytes: the communicator's pipeline chunk (0: no pipelining).
        source: "probe" (measured) or "given".
        probe: the measured times, {method: [[bytes, seconds], ...]}.
    """

    world: int
    bytes_per_s: float
    latency: dict
    codec_s_per_elem: dict
    pipeline_bytes: int = 16 << 20
    source: str = "given"
    probe: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = set(CANDIDATES) - set(self.latency) | set(CANDIDATES) - set(self.codec_s_per_elem)
        if missing:
            raise ValueError(f"LinkModel needs latency and codec_s_per_elem for {sorted(missing)}")
        values = [self.bytes_per_s, *self.latency.values(), *self.codec_s_per_elem.values()]
        if not self.bytes_per_s > 0 or not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"LinkModel: bytes_per_s must be > 0 and every latency and codec "
                             f"cost finite and >= 0, got {self}")

    @classmethod
    def from_rates(cls, world: int, bandwidth_bps: float, *, latency_s: float = 1e-4,
                   squinch_gbps: float = 1.0, bf16_gbps: float = 4.0,
                   pipeline_bytes: int = 16 << 20) -> "LinkModel":
        """A stated model: the link in bits/s, the codecs in GB/s of fp32 input.

        Args:
            world: ranks.
            bandwidth_bps: link rate per rank and direction, bits per second.
            latency_s: seconds per call, the same for every method.
            squinch_gbps: Squinch codec throughput per call (encode, reduce,
                decode), the ``codecGB/s`` of ``python -m squinchcomm.bench pipeline``.
            bf16_gbps: the same for the bf16 cast.
            pipeline_bytes: the communicator's pipeline chunk.
        """
        return cls(world=int(world), bytes_per_s=bandwidth_bps / 8,
                   latency={m: float(latency_s) for m in CANDIDATES},
                   codec_s_per_elem={"none": 0.0, "bf16": 4 / (bf16_gbps * 1e9),
                                     "squinch": 4 / (squinch_gbps * 1e9)},
                   pipeline_bytes=int(pipeline_bytes))

    def time(self, method: str, n: int) -> float:
        """Modelled seconds of one allreduce of ``n`` elements in ``method``:
        within the probed sizes the measured times themselves (linear between
        probe sizes, the smallest one's below it: there latency decides, which
        a fitted line gets wrong by more than the methods differ), above them
        the fitted formula (it knows the pipelining)."""
        points = self.probe.get(method)
        if points and 4 * n <= points[-1][0]:
            return float(np.interp(4 * n, [b for b, _ in points], [t for _, t in points]))
        wire = wire_bytes(int(n), self.world, method) / self.bytes_per_s
        if method == "none":
            return self.latency[method] + wire
        return self.latency[method] + overlapped_seconds(
            self.codec_s_per_elem[method] * n, wire, pipeline_chunks(n, self.pipeline_bytes))

    def choose(self, n: int) -> str:
        """The method with the smallest modelled time for ``n`` elements; a
        lossier method (later in :data:`CANDIDATES`) must be modelled at least
        :data:`MARGIN` faster than the less lossy one it replaces."""
        if self.world <= 1:
            return "none"
        best, best_t = CANDIDATES[0], self.time(CANDIDATES[0], n)
        for m in CANDIDATES[1:]:
            t = self.time(m, n)
            if t < best_t * (1 - MARGIN):
                best, best_t = m, t
        return best

    def ranges(self, lo: int = 4 << 10, hi: int = 1 << 30) -> list[tuple[int, str]]:
        """[(first fp32 byte size, method)] over powers of two from ``lo`` to ``hi``."""
        out, size = [], lo
        while size <= hi:
            m = self.choose(size // 4)
            if not out or out[-1][1] != m:
                out.append((size, m))
            size *= 2
        return out

    def describe(self) -> str:
        """One line: the fitted link and codecs and which method covers which sizes."""
        spans = ", ".join(f"{m} from {_size(b)}" for b, m in self.ranges())
        codec = ", ".join(f"{m} {4 / c / 1e9:.2f} GB/s" if c else f"{m} free"
                          for m, c in self.codec_s_per_elem.items() if m != "none")
        return (f"compression='auto' ({self.source}, {self.world} ranks): link "
                f"{8 * self.bytes_per_s / 1e9:.3g} Gbit/s per rank, latency "
                f"{1e3 * self.latency['none']:.2f} ms; codec {codec}; {spans}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LinkModel":
        return cls(**d)


def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):g} {unit}"
    return f"{nbytes} B"


def _fit(sizes: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """``seconds = a + b * sizes`` by least squares of the *relative* residuals
    (weights 1/seconds: the small sizes, where latency decides, count as much
    as the large ones), with a, b >= 0."""
    w = 1.0 / np.maximum(seconds, 1e-9)
    b, a = np.polyfit(sizes, seconds, 1, w=w)
    if b <= 0:  # flat or noisy: all latency
        return float(np.mean(seconds)), 0.0
    if a < 0:  # through the origin, relative residuals: b = mean(seconds / sizes)
        return 0.0, float(np.mean(seconds / sizes))
    return float(a), float(b)


def _measure(comm, sizes: list[int], repeats: int, xp) -> np.ndarray:
    """Steps 1-2 for ``sizes``: seconds per (method, size), the same on every rank."""
    data = {n: xp.asarray(np.random.default_rng([comm.rank, n]).standard_normal(n, np.float32))
            for n in sizes}
    times = np.zeros((len(CANDIDATES), len(sizes), repeats))
    for r in range(repeats + 1):
        for i, m in enumerate(CANDIDATES):
            for j, n in enumerate(sizes):
                comm.barrier()
                t0 = time.perf_counter()
                comm.allreduce(data[n], compression=m, name=f"squinchcomm-probe-{m}-{n}",
                               error_feedback=False)
                if xp is not np:  # the result is ordered on the stream: wait for the device
                    xp.cuda.get_current_stream().synchronize()
                if r:  # round 0 warms the codec, the buffers and the connections
                    times[i, j, r - 1] = time.perf_counter() - t0
    # Step 2: each rank's fastest repeat (noise only ever adds time), then the
    # slowest rank's (a collective is as slow as its slowest rank): identical
    # numbers on every rank.
    return np.max(comm.allgather_object(np.min(times, axis=2).tolist()), axis=0)


def probe(comm, probe_bytes=PROBE_BYTES, repeats: int = 5) -> LinkModel:
    """Measure ``comm``'s link and codecs (collective: every rank calls it).

    Returns the same :class:`LinkModel` on every rank (Steps 1-3 of the
    module docstring). Costs ``(repeats + 1)`` allreduces of each size in
    each method; where the largest uncompressed probe takes under
    :data:`EXTEND_BELOW_S` (a fast link, where the methods are close and the
    slopes decide), one more size, 4 times the largest (at most one pipeline
    chunk). About 3 s at 200 Mbit/s over 4 ranks, 1-2 s on loopback.
    """
    if comm.size == 1:  # nothing travels: uncompressed is exact and free
        return LinkModel(world=1, bytes_per_s=1e15, latency=dict.fromkeys(CANDIDATES, 0.0),
                         codec_s_per_elem=dict.fromkeys(CANDIDATES, 0.0),
                         pipeline_bytes=comm.pipeline_bytes, source="single rank")
    sizes = sorted({max(8, int(b) // 4) for b in probe_bytes})
    if len(sizes) < 2:
        raise ValueError(f"probe_bytes={probe_bytes!r}: pass at least two different sizes")
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r}: pass at least 1")
    xp = np
    if comm.transport.name == "nccl":  # a GPU job: probe with device buffers
        import cupy as xp
    # Steps 1-2: time each method at each size, interleaved, after a barrier.
    seconds = _measure(comm, sizes, repeats, xp)
    extra = 4 * sizes[-1] if not comm.pipeline_bytes else min(4 * sizes[-1],
                                                               comm.pipeline_bytes // 4)
    if seconds[0, -1] < EXTEND_BELOW_S and extra > sizes[-1]:  # the same test on every rank
        seconds = np.hstack([seconds, _measure(comm, [extra], repeats, xp)])
        sizes.append(extra)
    # Step 3: a + b n per method; the link from the uncompressed slope.
    n_arr = np.asarray(sizes, np.float64)
    fits = {m: _fit(n_arr, seconds[i]) for i, m in enumerate(CANDIDATES)}
    per_elem_wire = {m: wire_bytes(1 << 20, comm.size, m) / (1 << 20) for m in CANDIDATES}
    b_none = fits["none"][1]
    bytes_per_s = per_elem_wire["none"] / b_none if b_none > 0 else math.inf
    if not math.isfinite(bytes_per_s):  # no measurable wire: compression cannot pay
        bytes_per_s = 1e15
    codec = {m: max(fits[m][1] - per_elem_wire[m] / bytes_per_s, 0.0) for m in CANDIDATES}
    codec["none"] = 0.0
    return LinkModel(world=comm.size, bytes_per_s=bytes_per_s,
                     latency={m: fits[m][0] for m in CANDIDATES}, codec_s_per_elem=codec,
                     pipeline_bytes=comm.pipeline_bytes, source="probe",
                     probe={m: [[4 * n, float(seconds[i, j])] for j, n in enumerate(sizes)]
                            for i, m in enumerate(CANDIDATES)})
