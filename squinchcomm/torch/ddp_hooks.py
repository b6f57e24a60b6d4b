"""DDP communication hooks: Squinch (and fp16/bf16) compressed gradient allreduce.

Drop these into an existing ``DistributedDataParallel`` trainer; nothing else
in the training loop changes::

    from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook

    model = DistributedDataParallel(model)
    model.register_comm_hook(SquinchHookState(), squinch_hook)

For each gradient bucket the hook takes the bucket's flat buffer (fp32, fp16
or bf16; CPU tensors through gloo, CUDA tensors through the library's CuPy
path over NCCL), runs the library's compressed allreduce (average) over
``TorchTransport(process_group)`` on the library's engine thread and returns
a ``torch.futures.Future`` that completes with the averaged buffer (written
in place) when it is done, so the exchange overlaps the rest of the backward
pass as DDP's own hooks do. For CUDA buckets the stream that was current
when DDP called the hook waits for the result before DDP reads it.

The state (:class:`SquinchHookState`) is the hook's only memory, in the
spirit of PyTorch's ``PowerSGDState``:

1. the :class:`~squinchcomm.collectives.Communicator`, built lazily on the
   first bucket, so the state can be created before or after DDP wraps the
   model and before the process group exists;
2. the per-rank error-feedback residuals, keyed by a stable identity of the
   bucket (its index, size and parameter shapes), equal on every rank. DDP
   rebuilds its buckets after the first iteration (by gradient-ready order),
   so indices and sizes change once: a bucket with a new identity starts
   from a zero residual. What the first layout's residuals still owed (one
   step's quantization error) is not carried over; they are dropped once
   they have gone unused for two iterations. The grace iteration matters
   after a restart: the restored residuals belong to the rebuilt layout,
   which a fresh DDP only reaches at its second iteration, where they apply;
3. :meth:`SquinchHookState.state_dict` / :meth:`~SquinchHookState.load_state_dict`
   to save the residuals with the checkpoint (per rank), and
   ``pickle`` support that leaves the process group and communicator behind.

Differences from PyTorch's hooks: :func:`bf16_hook` works on gloo (PyTorch's
``bf16_compress_hook`` refuses it), and both cast hooks accumulate in fp32.

Example (under ``torchrun --nproc-per-node 2``)::

    >>> import torch, torch.distributed as dist                   # doctest: +SKIP
    >>> from torch.nn.parallel import DistributedDataParallel as DDP
    >>> from squinchcomm.torch.ddp_hooks import SquinchHookState, squinch_hook
    >>> dist.init_process_group("gloo")
    >>> ddp = DDP(torch.nn.Linear(1000, 1000))
    >>> state = SquinchHookState(error_feedback=True)
    >>> ddp.register_comm_hook(state, squinch_hook)
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook checks the
# hooks' annotations as objects (dist.GradBucket, Future[Tensor]), not strings.
import hashlib
import weakref

import torch
import torch.distributed as dist

from squinchcomm.collectives import CHOICES, Communicator
from squinchcomm.codec import ROUNDINGS

__all__ = ["SquinchHookState", "squinch_hook", "fp16_hook", "bf16_hook"]

_STATE_VERSION = 2  # 2: residual names number the parameters


class SquinchHookState:
    """The state of :func:`squinch_hook`, :func:`fp16_hook` and :func:`bf16_hook`.

    Args:
        process_group: the torch.distributed group DDP reduces over; None is
            the default (world) group. Not pickled: after unpickling, the
            state uses the default group unless you set ``process_group``.
        compression: what :func:`squinch_hook` sends, "squinch" | "fp16" |
            "bf16" | "none" (``none``: the engine's own fp32 allreduce) |
            "auto" (per bucket size the fastest of none, bf16 and Squinch,
            from the link model probed when the communicator is built, at
            the first bucket: :mod:`squinchcomm.collectives.policy`).
        rounding: Squinch rounding, "nearest" | "stochastic" (unbiased).
        error_feedback: keep each bucket's quantization error (both stages)
            and add it to the next step's gradient.
        hierarchical: reduce uncompressed inside a node, compress across nodes.
        min_compress_bytes: buckets smaller than this go uncompressed; None
            reads ``SQUINCHCOMM_MIN_COMPRESS_BYTES`` (default 65536).
        timeout: seconds to wait for peers before ``TransportError``; None
            reads ``SQUINCHCOMM_TIMEOUT`` (default 300).
        check_metadata: verify per bucket that every rank passes the same
            bucket (one small allgather); None reads
            ``SQUINCHCOMM_CHECK_METADATA`` (default on).
        start_step: iterations reduced uncompressed before compression starts
            (a warm-up, PowerSGD's ``start_powerSGD_iter``).
        uncompressed_params: parameters always reduced uncompressed
            (embeddings, norms, biases): a collection of parameters, or a
            predicate ``parameter -> bool``; a bucket holding some of them
            makes two exchanges, one uncompressed. Not pickled.
        link_model: the :class:`~squinchcomm.LinkModel` ``auto`` uses, stated
            instead of probed (the same on every rank).

    Example:
        >>> state = SquinchHookState(compression="squinch", error_feedback=True)
        >>> import pickle; state2 = pickle.loads(pickle.dumps(state))
    """

    def __init__(self, process_group=None, compression: str = "squinch",
                 rounding: str = "nearest", error_feedback: bool = True,
                 hierarchical: bool = False, min_compress_bytes: int | None = None,
                 timeout: float | None = None, check_metadata: bool | None = None,
                 start_step: int = 0, uncompressed_params=None, link_model=None):
        # Validate here, not at the first bucket: a typo should fail before training starts.
        if compression not in CHOICES:
            raise ValueError(f"compression={compression!r}: choose one of {', '.join(CHOICES)}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r}: choose one of {', '.join(ROUNDINGS)}")
        if min_compress_bytes is not None and int(min_compress_bytes) < 0:
            raise ValueError(f"min_compress_bytes={min_compress_bytes!r}: pass a size >= 0 in "
                             "bytes, or None for the SQUINCHCOMM_MIN_COMPRESS_BYTES default")
        if timeout is not None and not float(timeout) > 0:
            raise ValueError(f"timeout={timeout!r}: pass a positive number of seconds or None")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step={start_step!r}: pass the number of uncompressed "
                             "iterations before compression starts (an int >= 0)")
        self.start_step = start_step
        if uncompressed_params is None or callable(uncompressed_params):
            self.uncompressed_params = uncompressed_params
        else:
            ids = {id(p) for p in uncompressed_params}
            self.uncompressed_params = lambda p: id(p) in ids
        self.process_group = process_group
        self.compression = compression
        self.rounding = rounding
        self.error_feedback = bool(error_feedback)
        self.hierarchical = bool(hierarchical)
        self.min_compress_bytes = None if min_compress_bytes is None else int(min_compress_bytes)
        self.timeout = None if timeout is None else float(timeout)
        self.check_metadata = check_metadata
        self.link_model = link_model
        self._comm: Communicator | None = None
        # What the hook did (the integrations check it after the first step):
        # buckets reduced, and this rank's bytes on the wire against what the
        # same buffers cost uncompressed (the ring model of wire_bytes).
        self.buckets_reduced = 0
        self.wire_bytes = 0.0
        self.uncompressed_bytes = 0.0
        # Iterations completed, and the iteration each residual name was last used in.
        self._iteration = 0
        self._last_seen: dict[str, int] = {}
        # id(parameter) -> (weak reference, its number in the residual names).
        self._numbers: dict[int, tuple] = {}
        # A state_dict loaded before the communicator exists, applied when it is built.
        self._pending: dict | None = None

    # ------------------------------------------------------------ communicator
    @property
    def communicator(self) -> Communicator:
        """The communicator, built on first use over ``TorchTransport(process_group)``.

        Building it is collective (it exchanges node ids), so every rank of the
        group must reach the first use together; the first bucket does.
        """
        if self._comm is None:
            from squinchcomm.transport.torch_dist import TorchTransport

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("torch.distributed is not initialized: call "
                                 "torch.distributed.init_process_group() before the first "
                                 "backward pass")
            self._comm = Communicator(
                TorchTransport(self.process_group, timeout=self.timeout),
                compression=self.compression, rounding=self.rounding,
                error_feedback=self.error_feedback, hierarchical=self.hierarchical,
                min_compress_bytes=self.min_compress_bytes, timeout=self.timeout,
                check_metadata=self.check_metadata, link_model=self.link_model)
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._apply(pending)
        return self._comm

    # ------------------------------------------------------------ residual bookkeeping
    def _name(self, bucket: dist.GradBucket, compression: str) -> str:
        """A residual name equal on every rank, the same in a resumed process,
        and different for two layouts that put the same parameters in another
        order (DDP rebuilds its buckets after the first iteration: a residual
        must never be added to other parameters' gradients). Parameters are
        numbered in the order this process's hook first meets them, which DDP
        makes the same in every run of the same model (buckets are reduced in
        index order)."""
        ids = []
        for p in bucket.parameters():
            seen = self._numbers.get(id(p))
            if seen is None or seen[0]() is not p:  # new, or an id reused by another tensor
                seen = self._numbers[id(p)] = (weakref.ref(p), len(self._numbers))
            ids.append(seen[1])
        layout = ";".join(f"{i}:{'x'.join(map(str, p.shape))}"
                          for i, p in zip(ids, bucket.parameters()))
        digest = hashlib.blake2b(layout.encode(), digest_size=6).hexdigest()
        buf = bucket.buffer()
        # No "/" inside: the communicator appends "/..." in hierarchical mode.
        return f"ddp-{compression}-b{bucket.index()}-n{buf.numel()}-{digest}"

    def _retire(self):
        """At the end of an iteration, drop the residuals of buckets unused for two
        iterations (a rebuilt layout; one grace iteration for restored residuals)."""
        stale = {n for n, it in self._last_seen.items() if it < self._iteration - 1}
        if stale and self._comm is not None:
            ef = self._comm.error_feedback
            for key in list(ef.state):
                # Keys are "allreduce/<world>/<name>[/node-sliceK]" (hierarchical).
                if any(key.endswith("/" + s) or f"/{s}/" in key for s in stale):
                    ef.reset(key)
        for n in stale:
            del self._last_seen[n]
        self._iteration += 1

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Return this rank's residuals (host copies) and counters, picklable.

        Save one per rank with the model checkpoint; restore it with
        :meth:`load_state_dict` on the same rank of a job of the same size.

        Returns:
            A dict of plain Python / NumPy values.
        """
        if self._comm is None:
            if self._pending is not None:
                return dict(self._pending)
            return {"version": _STATE_VERSION, "world": None, "residuals": {}, "names": [],
                    "calls": 0}
        self._comm.synchronize()  # no bucket in flight: the residuals are settled
        # The call counter seeds stochastic rounding of calls without a residual.
        comm_state = self._comm.state_dict()
        return {"version": _STATE_VERSION, "world": self._comm.size,
                "residuals": comm_state["error_feedback"], "names": sorted(self._last_seen),
                "calls": comm_state["calls"]}

    def load_state_dict(self, state: dict) -> None:
        """Restore residuals saved by :meth:`state_dict` on this rank.

        Args:
            state: what :meth:`state_dict` returned (on this rank).

        Raises:
            ValueError: the state comes from a job of another world size.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("not a SquinchHookState.state_dict() of this version: pass what "
                             "state_dict() returned on this rank (a state saved by an earlier "
                             "squinchcomm names its residuals otherwise: skip load_state_dict() "
                             "to start them from zero)")
        if self._comm is None:
            self._pending = dict(state)  # checked and applied when the communicator is built
        else:
            self._apply(state)

    def _apply(self, state: dict):
        comm = self._comm
        if state["world"] is not None and state["world"] != comm.size:
            raise ValueError(f"the hook state was saved at world size {state['world']}, this job "
                             f"has {comm.size}: residuals are per rank and per shard, so they do "
                             "not carry over; skip load_state_dict() to start them from zero")
        comm.load_state_dict({"calls": state["calls"], "error_feedback": state["residuals"]})
        # Restored residuals count as used now: they get the grace iteration.
        self._last_seen = {n: self._iteration for n in state["names"]}

    def __getstate__(self) -> dict:
        """Pickle everything but the process group and the communicator."""
        out = {k: v for k, v in self.__dict__.items()
               if k not in ("process_group", "_comm", "_pending", "_last_seen",
                            "uncompressed_params", "_numbers")}
        out["saved"] = self.state_dict()
        return out

    def __setstate__(self, state: dict) -> None:
        saved = state.pop("saved")
        self.__dict__.update(state)
        self.process_group = None  # the default group; set another before the first step
        self.uncompressed_params = None
        self._comm = None
        self._last_seen = {}
        self._numbers = {}
        self._pending = saved if saved["world"] is not None else None

    def __repr__(self):
        return (f"SquinchHookState(compression={self.compression!r}, rounding={self.rounding!r}, "
                f"error_feedback={self.error_feedback}, hierarchical={self.hierarchical}, "
                f"built={self._comm is not None})")


# ----------------------------------------------------------------------------
# Hooks: thin public wrappers over one generic helper.
# ----------------------------------------------------------------------------
def _compressed_hook(state: SquinchHookState, bucket: dist.GradBucket,
                     compression: str) -> torch.futures.Future[torch.Tensor]:
    """Start averaging ``bucket``'s buffer in place with ``compression``; return
    the future that completes with it."""
    if not isinstance(state, SquinchHookState):
        raise ValueError(f"the hook state is a {type(state).__name__}: register the hook as "
                         "ddp.register_comm_hook(SquinchHookState(), hook)")
    buf = bucket.buffer()  # flat (numel,) grads of this bucket, fp32/fp16/bf16
    comm = state.communicator
    if state._iteration < state.start_step:  # the warm-up: uncompressed
        compression = "none"
    name = state._name(bucket, compression)
    state._last_seen[name] = state._iteration
    # Step 1: the opted-out parameters' slices, (offset, numel, uncompressed)
    segments, at = [], 0
    for p in bucket.parameters():
        opted_out = state.uncompressed_params is not None and bool(state.uncompressed_params(p))
        segments.append((at, p.numel(), opted_out))
        at += p.numel()
    plain = [s for s in segments if s[2]]
    if compression == "none" or not plain or len(plain) == len(segments):
        # In place (out=buf): DDP copies the future's tensor into the grads, and
        # with gradient_as_bucket_view the buffer already is the grads.
        parts = [(buf, "none" if plain else compression, name, None)]
    else:  # Step 2: two exchanges, the opted-out slices uncompressed
        parts = [(torch.cat([buf[o:o + n] for o, n, pl in segments if pl == flag]), comp,
                  part_name, [(o, n) for o, n, pl in segments if pl == flag])
                 for flag, comp, part_name in ((False, compression, name),
                                               (True, "none", name + ".plain"))]
    handles = [comm.allreduce_async(t, op="average", compression=comp, name=part_name, out=t,
                                    error_feedback=state.error_feedback)
               for t, comp, part_name, _ in parts]
    state.buckets_reduced += 1
    for t, comp, _, _ in parts:
        sent, dense = comm.bytes_sent(t, comp)
        state.wire_bytes += sent
        state.uncompressed_bytes += dense
    if bucket.is_last():  # buckets are launched in index order: the iteration is over
        state._retire()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def done(_):  # on the engine's thread, once the last exchange is done (engine order)
        error = next((h.exception() for h in handles if h.exception() is not None), None)
        if error is not None:
            fut.set_exception(error)
            return
        for t, _, _, spots in parts:  # Step 3: the slices back into the bucket
            if spots is not None:
                at = 0
                for o, n in spots:
                    buf[o:o + n].copy_(t[at:at + n])
                    at += n
        fut.set_result(buf)

    handles[-1].add_done_callback(done)
    return fut


def squinch_hook(state: SquinchHookState,
                 bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a DDP gradient bucket with Squinch 6-bit compression (``state.compression``).

    Two quantizations at any world size, fp32 accumulation; every rank gets
    bit-identical gradients, so parameters stay identical across ranks.

    Args:
        state: a :class:`SquinchHookState`.
        bucket: the ``torch.distributed.GradBucket`` DDP hands the hook.

    Returns:
        The ``torch.futures.Future`` of the averaged buffer.

    Example:
        >>> ddp.register_comm_hook(SquinchHookState(), squinch_hook)  # doctest: +SKIP
    """
    return _compressed_hook(state, bucket, state.compression)


def fp16_hook(state: SquinchHookState,
              bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a DDP gradient bucket sent as fp16 (fp32 accumulation), for comparisons.

    Same state and algorithm as :func:`squinch_hook` with ``compression="fp16"``.

    Args:
        state: a :class:`SquinchHookState` (its ``compression`` is ignored).
        bucket: the ``torch.distributed.GradBucket``.

    Returns:
        The ``torch.futures.Future`` of the averaged buffer.

    Example:
        >>> ddp.register_comm_hook(SquinchHookState(), fp16_hook)  # doctest: +SKIP
    """
    return _compressed_hook(state, bucket, "fp16")


def bf16_hook(state: SquinchHookState,
              bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a DDP gradient bucket sent as bf16 (fp32 accumulation); works on gloo.

    Same state and algorithm as :func:`squinch_hook` with ``compression="bf16"``.

    Args:
        state: a :class:`SquinchHookState` (its ``compression`` is ignored).
        bucket: the ``torch.distributed.GradBucket``.

    Returns:
        The ``torch.futures.Future`` of the averaged buffer.

    Example:
        >>> ddp.register_comm_hook(SquinchHookState(), bf16_hook)  # doctest: +SKIP
    """
    return _compressed_hook(state, bucket, "bf16")
