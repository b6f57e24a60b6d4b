"""``hvd.DistributedOptimizer``: gradient allreduce overlapped with backward.

How it works, step by step:

1. At construction, the trainable parameters are cut into static buckets in
   reverse registration order (gradients of the last layers arrive first,
   as in DDP), one dtype and device per bucket, closed when the next
   parameter would exceed ``fusion_threshold`` bytes. Each bucket has a
   stable name (``bucket{i}.{dtype}``), so its error-feedback residual stays
   attached to the same elements step after step.
2. A ``register_post_accumulate_grad_hook`` on every parameter counts the
   backward passes; when a parameter has accumulated
   ``backward_passes_per_step`` gradients it is ready, and when all of a
   bucket's parameters are ready the bucket's gradients are copied into its
   flat buffer and an asynchronous allreduce starts. Buckets start strictly
   in index order, so every rank issues the same collectives in the same
   order even when some parameters get no gradient on some ranks.
3. The allreduces run on the communicator's engine thread while backward
   goes on computing the next buckets' gradients (nothing polls them).
4. ``step()`` (or ``synchronize()``) starts the buckets not started yet
   (missing gradients count as zeros, like Horovod), waits for all, copies
   the results into ``p.grad`` and then runs the wrapped optimizer's step.

Example::

    import squinchcomm.torch as hvd
    hvd.init()
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=hvd.Compression.squinch)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from squinchcomm import collectives, config
from squinchcomm.collectives import ErrorFeedback
from squinchcomm.torch import _ops
from squinchcomm.torch.compression import Compression, as_compression

__all__ = ["DistributedOptimizer", "DEFAULT_FUSION_THRESHOLD", "DEFAULT_FIRST_BUCKET_BYTES"]

#: Bucket size cap in bytes when neither ``fusion_threshold`` nor
#: ``SQUINCHCOMM_FUSION_THRESHOLD`` is given (Horovod's default fusion buffer).
DEFAULT_FUSION_THRESHOLD = 64 * 1024 * 1024
#: First-bucket cap when neither ``first_bucket_bytes`` nor
#: ``SQUINCHCOMM_FIRST_BUCKET_BYTES`` is given (DDP's first bucket).
DEFAULT_FIRST_BUCKET_BYTES = 1024 * 1024
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Bucket:
    """Parameters reduced together through one flat buffer."""

    def __init__(self, index: int, dtype: torch.dtype, device: torch.device):
        self.index, self.dtype, self.device = index, dtype, device
        self.name = f"bucket{index}.{str(dtype).replace('torch.', '')}"
        self.params: list[torch.Tensor] = []
        self.offsets: list[int] = []
        self.numel = 0
        self.buffer: torch.Tensor | None = None  # allocated on first use, then reused
        self.ready = 0
        self.handle = None  # the allreduce in flight (squinchcomm.collectives.Handle)
        self.sparse: dict = {}  # id(param) -> its sparse allreduce in flight (sparse gradients)
        self.first = False  # the first bucket of its dtype and device (first_bucket_bytes cap)
        self.plain = False  # holds the parameters opted out of compression

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def add(self, p: torch.Tensor):
        self.params.append(p)
        self.offsets.append(self.numel)
        self.numel += p.numel()


class _DistributedOptimizer:
    """Mixin placed before the wrapped optimizer's class (see :func:`DistributedOptimizer`)."""

    # ------------------------------------------------------------ setup
    def _sq_setup(self, named_parameters, compression, backward_passes_per_step, op,
                  gradient_predivide_factor, fusion_threshold, communicator, sparse_as_dense,
                  first_bucket_bytes=None, last_bucket_bytes=None, per_group=False,
                  uncompressed_params=None):
        base = communicator if communicator is not None else _ops.communicator()
        self._sq_compression = as_compression(compression)
        op_name = _ops._op(None, op)
        if op_name not in ("average", "sum"):
            raise ValueError(f"op={op_name}: DistributedOptimizer averages or sums gradients; "
                             "pass op=hvd.Average or hvd.Sum")
        if gradient_predivide_factor != 1.0 and op_name != "average":
            raise ValueError("gradient_predivide_factor is only defined for op=hvd.Average: "
                             "drop it or use op=hvd.Average")
        if int(backward_passes_per_step) < 1:
            raise ValueError(f"backward_passes_per_step={backward_passes_per_step}: pass an "
                             "integer >= 1")
        self._sq_op = op_name
        self._sq_bpps = int(backward_passes_per_step)
        # Horovod: prescale by 1/f, then the average divides by size and multiplies by f.
        f = float(gradient_predivide_factor)
        self._sq_prescale, self._sq_postscale = (1.0 / f, f) if op_name == "average" else (1.0, 1.0)
        self._sq_sparse_as_dense = bool(sparse_as_dense)
        threshold = (config.env_bytes("FUSION_THRESHOLD", DEFAULT_FUSION_THRESHOLD)
                     if fusion_threshold is None else int(fusion_threshold))
        if threshold < 0:
            raise ValueError(f"fusion_threshold={fusion_threshold}: pass bytes >= 0 (0: one "
                             "bucket per parameter)")
        first = (config.env_bytes("FIRST_BUCKET_BYTES", DEFAULT_FIRST_BUCKET_BYTES)
                 if first_bucket_bytes is None else int(first_bucket_bytes))
        if first < 0:
            raise ValueError(f"first_bucket_bytes={first_bucket_bytes}: pass bytes >= 0 (0: the "
                             "first bucket holds one parameter)")
        first = min(first, threshold)
        last = (config.env_bytes("LAST_BUCKET_BYTES", None)
                if last_bucket_bytes is None else int(last_bucket_bytes))
        if last is not None and last < 0:
            raise ValueError(f"last_bucket_bytes={last_bucket_bytes}: pass bytes >= 0 (0: the "
                             "last bucket holds one parameter)")

        params, seen = [], set()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        self._sq_names = self._sq_name_params(named_parameters, params)
        # Horovod's attribute, read by user code: parameter -> name.
        self._parameter_names = {p: self._sq_names[id(p)] for p in params}
        trainable = [p for p in params if p.requires_grad]
        for p in trainable:
            if p.dtype not in _DTYPES:
                raise ValueError(f"parameter '{self._sq_names[id(p)]}' is {p.dtype}: "
                                 "DistributedOptimizer reduces float32/float16/bfloat16 "
                                 "parameters; cast the model (model.float())")

        # Step 1: static buckets in reverse registration order; the first of each
        # dtype and device small (its allreduce starts early in backward), and
        # the last one (the first layers: what backward finishes with, the only
        # exchange nothing overlaps) under its own cap.
        # (device, dtype[, group]) -> parameters in registration order; the sharded
        # variant keeps each bucket inside one parameter group (its shard joins it).
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        plain = _opted_out(uncompressed_params, self._sq_names, trainable)

        def key_of(p):  # opted-out parameters share buckets only with each other
            return ((p.device, p.dtype) + ((group_of[id(p)],) if per_group else ())
                    + ((id(p) in plain,) if plain else ()))

        by_key: dict[tuple, list] = {}
        for p in trainable:
            by_key.setdefault(key_of(p), []).append(p)
        tail = ({} if last is None or last >= threshold  # no cap of its own
                else {key: _prefix(ps, last) for key, ps in by_key.items()})
        tail_ids = {id(p) for t in tail.values() for p in t}
        self._sq_buckets: list[_Bucket] = []
        open_buckets: dict[tuple, _Bucket] = {}
        for p in reversed(trainable):
            if id(p) in tail_ids:
                continue
            key = key_of(p)
            b = open_buckets.get(key)
            cap = first if b is not None and b.first else threshold
            if b is not None and b.params and b.nbytes + p.numel() * p.element_size() > cap:
                b = None
            if b is None:
                b = _Bucket(len(self._sq_buckets), p.dtype, p.device)
                b.first = key not in open_buckets
                b.plain = id(p) in plain
                self._sq_buckets.append(b)
                open_buckets[key] = b
            b.add(p)
        for key, t in tail.items():
            b = _Bucket(len(self._sq_buckets), key[1], key[0])
            b.plain = id(t[0]) in plain
            self._sq_buckets.append(b)
            for p in reversed(t):
                b.add(p)
        self._sq_slot = {id(p): (b, i) for b in self._sq_buckets for i, p in enumerate(b.params)}
        self._sq_delay = {id(p): self._sq_bpps for p in trainable}
        self._sq_next = 0  # the next bucket to start (buckets start in index order)

        # The bucket layout is checked once now; with the check on (the default)
        # each bucket's allreduce is checked too (a 16-byte digest exchange),
        # which is also what lets a joined rank (hvd.join) answer it.
        if base.check_metadata:
            # Shapes too: (8, 4) on one rank and (4, 8) on another have equal sizes.
            layout = [(b.name, b.numel, b.plain, [(self._sq_names[id(p)], tuple(p.shape))
                                                  for p in b.params]) for b in self._sq_buckets]
            mine = {"buckets": layout, "op": op_name, "bpps": self._sq_bpps,
                    "compression": repr(self._sq_compression)}
            collectives.check_agreement("DistributedOptimizer", base.allgather_object(mine),
                                        list(mine), "; wrap the same model and optimizer with "
                                        "the same options on every rank")
        self._sq_comm = base
        # The buckets' residuals are this optimizer's own (saved with its state_dict).
        self._sq_ef = ErrorFeedback()
        comp = self._sq_compression
        ef_on = base.error_feedback_default if comp.error_feedback is None else comp.error_feedback
        self._sq_steps = 0  # optimizer steps taken (compression starts at comp.start_step)
        self._sq_options = {"op": op_name, "compression": comp.name, "rounding": comp.rounding,
                            "hierarchical": comp.hierarchical,
                            "error_feedback": self._sq_ef if ef_on else False,
                            "prescale": self._sq_prescale, "postscale": self._sq_postscale}

        self._sq_should_synchronize = True
        self._sq_synchronized = False
        self._sq_hooks = [p.register_post_accumulate_grad_hook(self._sq_hook) for p in trainable]

    @staticmethod
    def _sq_name_params(named_parameters, params) -> dict[int, str]:
        if named_parameters is None:
            return {id(p): f"allreduce.noname.{i}" for i, p in enumerate(params)}
        named = list(named_parameters)
        bad = [x for x in named if not (isinstance(x, tuple) and len(x) == 2
                                        and isinstance(x[0], str) and torch.is_tensor(x[1]))]
        if bad:
            raise ValueError("named_parameters must be (name, parameter) pairs, e.g. "
                             f"model.named_parameters(); got {type(bad[0]).__name__} entries")
        names = [n for n, _ in named]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"parameter names must be unique; duplicated: {', '.join(dups)}. "
                             "Pass model.named_parameters() (or prefix each model's names)")
        by_id = {id(p): n for n, p in named}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            shapes = ", ".join(f"#{i} shape {tuple(params[i].shape)}" for i in missing[:8])
            raise ValueError(f"named_parameters does not name {len(missing)} of the optimizer's "
                             f"parameters ({shapes}{', ...' if len(missing) > 8 else ''}): pass "
                             "named_parameters covering every parameter the optimizer holds "
                             "(model.named_parameters() of the same model)")
        return by_id

    # ------------------------------------------------------------ hooks
    def _sq_hook(self, p: torch.Tensor):
        # Step 2: count this parameter's backward passes; start ready buckets in order.
        self._sq_synchronized = False
        key = id(p)
        if self._sq_delay[key] <= 0:
            raise ValueError(f"parameter '{self._sq_names[key]}' got more than "
                             f"backward_passes_per_step={self._sq_bpps} gradients before step(): "
                             "increase backward_passes_per_step or call step() in between")
        self._sq_delay[key] -= 1
        if self._sq_delay[key] == 0:
            bucket, _ = self._sq_slot[key]
            bucket.ready += 1
            while (self._sq_next < len(self._sq_buckets) and
                   self._sq_buckets[self._sq_next].ready == len(self._sq_buckets[self._sq_next].params)):
                self._sq_start(self._sq_buckets[self._sq_next])
                self._sq_next += 1

    def _sq_start(self, b: _Bucket):
        """Copy the bucket's gradients into its buffer and start its allreduce."""
        self._sq_fill(b)
        # Step 3: submitted in index order, the same on every rank; the engine
        # runs it while backward goes on.
        b.handle = self._sq_comm.allreduce_async(b.buffer, out=b.buffer, name=b.name,
                                                 **self._sq_bucket_options(b))

    def _sq_bucket_options(self, b: _Bucket) -> dict:
        """The reduction's options for bucket ``b`` now: uncompressed for the
        opted-out parameters and during the warm-up (``start_step``)."""
        if b.plain or self._sq_steps < self._sq_compression.start_step:
            return {**self._sq_options, "compression": "none", "error_feedback": False}
        return self._sq_options

    def _sq_fill(self, b: _Bucket, release: bool = False):
        """The bucket's gradients into its flat buffer (zeros for a parameter
        without one); ``release``: drop each ``p.grad`` once copied."""
        with torch.no_grad():
            if b.buffer is None:
                b.buffer = torch.empty(b.numel, dtype=b.dtype, device=b.device)
            for p, off in zip(b.params, b.offsets):
                g = p.grad
                n = p.numel()
                if g is None:  # unused on this rank: contribute zeros (all ranks stay in step)
                    b.buffer[off:off + n].zero_()
                    continue
                if g.is_sparse:
                    if not self._sq_sparse_as_dense:
                        # Horovod's sparse path: indices and values allgathered
                        # (exact); its slot in the dense buffer carries zeros.
                        b.buffer[off:off + n].zero_()
                        b.sparse[id(p)] = _ops.sparse_allreduce_async(
                            g, name=f"{b.name}.{self._sq_names[id(p)]}.sparse",
                            op=_ops.Average if self._sq_op == "average" else _ops.Sum)
                        continue
                    g = g.to_dense()
                b.buffer[off:off + n].copy_(g.reshape(-1))
                if release:
                    p.grad = None

    # ------------------------------------------------------------ public API
    def synchronize(self):
        """Finish the gradient allreduce now: ``p.grad`` holds the reduced
        gradients afterwards (e.g. to clip them), then call ``step()`` inside
        :meth:`skip_synchronize`.

        Example:
            >>> loss.backward()                                    # doctest: +SKIP
            >>> optimizer.synchronize()
            >>> torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            >>> with optimizer.skip_synchronize():
            ...     optimizer.step()
        """
        # Step 4: start the rest in index order, wait for all, copy back.
        while self._sq_next < len(self._sq_buckets):
            self._sq_start(self._sq_buckets[self._sq_next])
            self._sq_next += 1
        error = None
        with torch.no_grad():
            for i, b in enumerate(self._sq_buckets):
                handle, b.handle = b.handle, None
                b.ready = 0
                try:
                    failed = self._sq_collect(i, b, handle)
                except Exception as exc:  # wait for the other buckets, then raise the first
                    failed = exc
                error = error or failed
        for key in self._sq_delay:
            self._sq_delay[key] = self._sq_bpps
        self._sq_next = 0
        if error is not None:  # the gradients are not reduced: step() must not run on them
            raise error
        self._sq_synchronized = True

    def _sq_collect(self, i: int, b: _Bucket, handle):
        """Wait for bucket ``b``'s reduction and put the result where the step
        reads it (here ``p.grad``); returns a sparse allreduce's error, if any."""
        sparse, b.sparse = b.sparse, {}
        handle.wait()
        error = None
        for p, off in zip(b.params, b.offsets):
            if id(p) in sparse:
                try:
                    p.grad = sparse[id(p)].wait()
                except Exception as exc:
                    error = error or exc
                continue
            reduced = b.buffer[off:off + p.numel()].view_as(p)
            if p.grad is None or p.grad.is_sparse:
                p.grad = reduced.clone()
            else:
                p.grad.copy_(reduced)
        return error

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Within this context ``step()`` does not synchronize (call
        :meth:`synchronize` yourself first)."""
        self._sq_should_synchronize = False
        try:
            yield
        finally:
            self._sq_should_synchronize = True

    def step(self, closure=None):
        """Reduce the gradients (unless already synchronized) and take the
        wrapped optimizer's step."""
        if self._sq_should_synchronize:
            if self._sq_synchronized:
                # Horovod reduces again here; the gradients are already reduced
                # (identical on every rank), so we skip the second, lossy round.
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "after optimizer.synchronize(): wrap step() in "
                              "`with optimizer.skip_synchronize():`", stacklevel=2)
            else:
                self.synchronize()
        self._sq_synchronized = False
        self._sq_steps += 1
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        """Clear the gradients; ValueError while gradients await their allreduce."""
        pending = any(b.handle is not None for b in self._sq_buckets) or any(
            d != self._sq_bpps for d in self._sq_delay.values())
        if pending:
            raise ValueError("optimizer.zero_grad() was called after loss.backward() but before "
                             "optimizer.step() or optimizer.synchronize(): call zero_grad() "
                             "before backward (or synchronize() first)")
        return super().zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        """The wrapped optimizer's state plus this rank's error-feedback
        residuals under ``"squinchcomm"`` (save one file per rank to resume
        bit-exactly; a rank-0-only checkpoint resumes with fresh residuals)."""
        sd = super().state_dict()
        ef = self._sq_ef.state_dict()
        sd["squinchcomm"] = {
            "rank": self._sq_comm.rank, "size": self._sq_comm.size,
            # torch tensors, not NumPy arrays: torch.load(weights_only=True) accepts them.
            "error_feedback": residuals_to_torch(ef),
        }
        return sd

    def load_state_dict(self, state_dict):
        """Restore the wrapped optimizer's state and, when saved by this rank
        at this world size, the error-feedback residuals (else they restart
        from zero, with a warning)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("squinchcomm", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return  # e.g. from broadcast_optimizer_state: keep this rank's residuals
        ef = self._sq_ef
        ef.reset()
        if extra["rank"] != self._sq_comm.rank or extra["size"] != self._sq_comm.size:
            warnings.warn(f"error-feedback residuals were saved by rank {extra['rank']} of "
                          f"{extra['size']}, this is rank {self._sq_comm.rank} of "
                          f"{self._sq_comm.size}: they restart from zero (save one optimizer "
                          "state per rank to resume exactly)", stacklevel=2)
            return
        ef.load_state_dict(residuals_from_torch(extra["error_feedback"]), world=self._sq_comm.size)

    @property
    def buckets(self) -> list[tuple[str, int]]:
        """The static buckets as (name, elements), in the order they are reduced."""
        return [(b.name, b.numel) for b in self._sq_buckets]

    @property
    def error_feedback(self):
        """This optimizer's :class:`~squinchcomm.collectives.ErrorFeedback` state."""
        return self._sq_ef

    def remove_hooks(self):
        """Unregister the gradient hooks (the optimizer stops reducing)."""
        for h in self._sq_hooks:
            h.remove()
        self._sq_hooks = []


def _opted_out(spec, names: dict, params: list) -> set:
    """ids of the parameters ``uncompressed_params`` names: an iterable of
    names, or a predicate ``(name, parameter) -> bool``."""
    if spec is None:
        return set()
    if callable(spec):
        return {id(p) for p in params if spec(names[id(p)], p)}
    if isinstance(spec, str):
        spec = [spec]
    wanted = set(spec)
    unknown = wanted - {names[id(p)] for p in params}
    if unknown:
        raise ValueError(f"uncompressed_params names {sorted(unknown)}, which are not trainable "
                         "parameters of this optimizer: pass names from named_parameters, or a "
                         "predicate (name, parameter) -> bool")
    return {id(p) for p in params if names[id(p)] in wanted}


def _prefix(params: list, cap: int) -> list:
    """The longest prefix of ``params`` within ``cap`` bytes (at least one)."""
    total = 0
    for i, p in enumerate(params):
        total += p.numel() * p.element_size()
        if i and total > cap:
            return params[:i]
    return params


def _numpy(t):
    return t.detach().cpu().numpy() if torch.is_tensor(t) else t


def residuals_to_torch(state):
    """``state`` (an ``ErrorFeedback.state_dict()``, or any dict or list that
    holds residuals, as the hook states' ``state_dict()`` do) with every NumPy
    array a torch tensor, so a checkpoint loads with
    ``torch.load(weights_only=True)``."""
    if isinstance(state, np.ndarray):
        return torch.from_numpy(state)
    if isinstance(state, dict):
        return {k: residuals_to_torch(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(residuals_to_torch(v) for v in state)
    return state


def residuals_from_torch(saved: dict) -> dict:
    """:func:`residuals_to_torch` undone, for ``ErrorFeedback.load_state_dict``."""
    return {k: {**e, "residual": _numpy(e["residual"]),
                "shard_residual": _numpy(e["shard_residual"])}
            for k, e in saved.items()}


def DistributedOptimizer(optimizer, named_parameters=None, compression=Compression.none,
                         backward_passes_per_step=1, op=_ops.Average,
                         gradient_predivide_factor=1.0, fusion_threshold=None, num_groups=0,
                         groups=None, sparse_as_dense=False, process_set=None,
                         communicator=None, first_bucket_bytes=None, last_bucket_bytes=None,
                         shard_optimizer_state=False, uncompressed_params=None):
    """Wrap ``optimizer`` so that ``step()`` uses gradients averaged over all ranks.

    The result is an instance of a subclass of ``optimizer``'s class sharing
    its param_groups, state and hooks (isinstance checks, LR schedulers and
    GradScaler keep working); the original object should not be used again.

    Args:
        optimizer: a ``torch.optim.Optimizer``.
        named_parameters: ``model.named_parameters()``; names must be unique
            and cover every parameter of the optimizer (None: generated names).
        compression: ``hvd.Compression.none | fp16 | bf16 | squinch`` or
            ``hvd.Compression.squinch_with(error_feedback=..., rounding=...,
            hierarchical=...)``.
        backward_passes_per_step: backward passes accumulated locally before
            each reduction (gradients are summed over the passes).
        op: ``hvd.Average`` or ``hvd.Sum`` (Adasum: ValueError).
        gradient_predivide_factor: divide by f before the sum and by size/f
            after (Average only).
        fusion_threshold: bucket size cap in bytes (default
            ``SQUINCHCOMM_FUSION_THRESHOLD`` or :data:`DEFAULT_FUSION_THRESHOLD`;
            0: one per parameter).
        num_groups, groups: Horovod's explicit grouping; not supported (use
            fusion_threshold); must be left at their defaults.
        sparse_as_dense: densify sparse gradients into the buckets (else, as in
            Horovod, each sparse gradient is allreduced on its own with
            :func:`~squinchcomm.torch.sparse_allreduce_async`: exact,
            uncompressed, and ``p.grad`` stays sparse).
        process_set: a registered ``hvd.ProcessSet``: average over its ranks
            only (only its members may construct the optimizer).
        communicator: the Communicator to use (default: the one from hvd.init()).
        first_bucket_bytes: size cap of the first bucket (the last layers'
            gradients, ready first), as DDP's small first bucket: its
            allreduce starts early in backward (default
            ``SQUINCHCOMM_FIRST_BUCKET_BYTES`` or
            :data:`DEFAULT_FIRST_BUCKET_BYTES`; never above fusion_threshold).
        last_bucket_bytes: size cap of the last bucket (the first layers'
            gradients, ready when backward ends: its exchange is the one that
            nothing overlaps, so a small one shortens the step on a slow
            link; default ``SQUINCHCOMM_LAST_BUCKET_BYTES`` or no cap of
            its own, as in Horovod and DDP).
        uncompressed_params: parameters reduced uncompressed whatever the
            compression (embeddings, norms, biases, beyond the size threshold):
            names from ``named_parameters``, or a predicate ``(name,
            parameter) -> bool``; they get buckets of their own.
        shard_optimizer_state: ZeRO stage 1/2 (:mod:`squinchcomm.torch.zero`):
            gradients are reduce-scattered (compressed), each rank keeps and
            steps the optimizer state of its shard only (memory 1/N), and the
            updated parameters are all-gathered uncompressed. Clip with
            ``optimizer.clip_grad_norm_``; save one ``state_dict()`` per rank.

    Returns:
        The wrapped optimizer.

    Example:
        >>> opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                named_parameters=model.named_parameters(),
        ...                                compression=hvd.Compression.squinch)  # doctest: +SKIP
    """
    if isinstance(optimizer, _DistributedOptimizer):
        raise ValueError("this optimizer is already a DistributedOptimizer: wrap the plain one once")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if num_groups or groups is not None:
        raise ValueError("num_groups/groups are not supported: buckets are built by size; "
                         "set fusion_threshold (bytes) instead")
    if process_set is not None:
        if communicator is not None:
            raise ValueError("pass process_set= or communicator=, not both")
        communicator = _ops._check_process_set(process_set)
    if shard_optimizer_state:
        from squinchcomm.torch.zero import _ShardedOptimizer as mixin
        from squinchcomm.torch.zero import check_shardable

        check_shardable(optimizer, as_compression(compression))
    else:
        mixin = _DistributedOptimizer
    cls = type(optimizer.__class__.__name__, (mixin, optimizer.__class__),
               {"__module__": optimizer.__class__.__module__})
    wrapped = cls.__new__(cls)
    # Share the original's param_groups, state, defaults and hooks (no re-construction:
    # works for optimizers whose __init__ needs arguments, and keeps loaded state).
    wrapped.__dict__.update(optimizer.__dict__)
    if shard_optimizer_state:  # the sharded variant rewrites its param groups: own copies
        wrapped.param_groups = [dict(g, params=list(g["params"])) for g in optimizer.param_groups]
    wrapped._sq_setup(named_parameters, compression, backward_passes_per_step, op,
                      gradient_predivide_factor, fusion_threshold, communicator, sparse_as_dense,
                      first_bucket_bytes, last_bucket_bytes, per_group=bool(shard_optimizer_state),
                      uncompressed_params=uncompressed_params)
    if shard_optimizer_state:
        wrapped._sq_shard_setup()
    return wrapped
