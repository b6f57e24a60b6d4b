"""Squinch-compressed gradient reduction for PyTorch FSDP2 (``fully_shard``).

Sharded data parallelism reduces gradients with a reduce-scatter: every rank
ends with the average of its own shard. Two ways to compress it:

- :func:`compress` makes every FSDP unit's reduce-scatter the library's
  compressed one (:meth:`Communicator.reduce_scatter`: each rank encodes its
  whole gradient once, Squinch/fp16/bf16 on the wire, sums in fp32, no
  re-encode), through ``FSDPModule.set_custom_reduce_scatter``.
- :func:`compress_across_nodes` is HSDP for slow links between nodes: FSDP2
  shards inside a node with its own, uncompressed reduce-scatter, and the
  reduced shards are averaged across nodes by a compressed allreduce
  (``FSDPModule.set_all_reduce_hook``), so only node-to-node traffic is
  compressed.

How a reduction runs, step by step (both ways):

1. FSDP copies the unit's gradients into one flat buffer, rank ``r``'s shard
   contiguous at ``r * shard_numel`` (padded; shard sizes are arbitrary), in
   ``reduce_dtype`` (fp32 or bf16), and calls the reduce-scatter with an op
   (AVG; PREMUL_SUM(1/f) after ``set_gradient_divide_factor(f)``; SUM with
   ``set_force_sum_reduction_for_comms(True)``, then FSDP divides after).
2. The library's reduce-scatter runs on the group's engine (the same engine
   as every other squinchcomm call on that group, so the order of
   collectives is the same on every rank), and the call waits for it: FSDP
   reads the output as soon as the call returns and ignores any returned
   Work. On CUDA the engine orders itself after FSDP's reduce-scatter stream
   and that stream after the result (events), as for every collective.
3. The fp32 result is copied into FSDP's output (cast to ``reduce_dtype``).
4. Across nodes (HSDP): FSDP's all-reduce hook averages the node's reduced
   shard with the same shard on the other nodes (compressed allreduce over
   ``cross_group``) in place; FSDP then applies any post-division and
   accumulates the shard into ``p.grad``.

Averaging contract: with FSDP's default op (AVG) the result is the mean
over every rank of the job, as with uncompressed FSDP/HSDP. The HSDP hook
always averages across nodes: FSDP's own division (AVG, or the post-divide
by the node size under forced SUM) covers the node, the hook the nodes.

Error feedback keeps, per unit and rank, a fp32 residual of the unit's
whole (unsharded) gradient: memory of one fp32 gradient copy per rank,
which is what makes 6-bit gradients track the exact ones over many steps.
Save it with :meth:`FSDPCompression.state_dict` (per rank) beside the
model's checkpoint.

Example::

    from torch.distributed.fsdp import fully_shard
    from squinchcomm.torch import fsdp

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    state = fsdp.compress(model, compression="squinch", error_feedback=True)
    ... train as usual; torch.save(state.state_dict(), f"squinch_rank{rank}.pt")
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from squinchcomm.collectives import CHOICES, Communicator, ErrorFeedback
from squinchcomm.codec import ROUNDINGS

__all__ = ["FSDPCompression", "compress", "compress_across_nodes"]

try:  # the protocol FSDP2 checks for (private in torch 2.13)
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover - older torch: a plain base class
    _ReduceScatterBase = object


class FSDPCompression:
    """What :func:`compress` / :func:`compress_across_nodes` return: the
    options, the communicators (one per process group, built at the first
    reduction, collectively) and the error-feedback residuals of every unit.

    ``state_dict()`` / ``load_state_dict()`` save and restore this rank's
    residuals (the keys name the rank, so a distributed checkpoint that
    gathers them does not merge different ranks' residuals).
    """

    def __init__(self, *, compression: str = "squinch", rounding: str = "nearest",
                 error_feedback: bool = False, min_compress_bytes: int | None = None,
                 timeout: float | None = None, seed: int = 0, start_step: int = 0,
                 link_model=None):
        if compression not in CHOICES:
            raise ValueError(f"compression={compression!r}: choose one of "
                             f"{', '.join(CHOICES)}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r}: choose one of {', '.join(ROUNDINGS)}")
        if min_compress_bytes is not None and int(min_compress_bytes) < 0:
            raise ValueError(f"min_compress_bytes={min_compress_bytes!r}: pass bytes >= 0 or "
                             "None (SQUINCHCOMM_MIN_COMPRESS_BYTES)")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step={start_step!r}: pass the number of uncompressed "
                             "reductions before compression starts (an int >= 0)")
        self.compression, self.rounding, self.start_step = compression, rounding, start_step
        self.error_feedback = bool(error_feedback)
        self.min_compress_bytes = None if min_compress_bytes is None else int(min_compress_bytes)
        self.timeout, self.seed = timeout, int(seed)
        self.link_model = link_model
        self.residuals = ErrorFeedback()
        self.units: list[str] = []
        self._comms: dict = {}
        # What the reduce-scatters did (the integrations check it after the first
        # step): calls, and this rank's bytes against the same inputs uncompressed.
        self.buckets_reduced = 0
        self.wire_bytes = 0.0
        self.uncompressed_bytes = 0.0

    def communicator(self, group) -> Communicator:
        """The communicator over ``group`` (built on first use: collective)."""
        comm = self._comms.get(group)
        if comm is None:
            from squinchcomm.transport.torch_dist import TorchTransport

            comm = Communicator(TorchTransport(group, timeout=self.timeout),
                                compression=self.compression, rounding=self.rounding,
                                min_compress_bytes=self.min_compress_bytes,
                                timeout=self.timeout, seed=self.seed,
                                link_model=self.link_model)
            self._comms[group] = comm
        return comm

    def _options(self, calls: int, plain: bool = False) -> dict:
        """The reduction's compression and error feedback at a unit's
        ``calls``-th reduction (uncompressed during the warm-up, and always
        for a ``plain`` unit)."""
        if plain or calls < self.start_step:
            return {"compression": "none", "error_feedback": False}
        return {"compression": self.compression,
                "error_feedback": self.residuals if self.error_feedback else False}

    def state_dict(self) -> dict:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return {f"rank{rank}": self.residuals.state_dict()}

    def load_state_dict(self, state: dict):
        rank = dist.get_rank() if dist.is_initialized() else 0
        key = f"rank{rank}"
        if key not in state:
            raise ValueError(f"no error-feedback residuals for {key} (the state holds "
                             f"{sorted(state)}): load the file this rank saved")
        self.residuals.reset()
        self.residuals.load_state_dict(state[key])


class _CompressedReduceScatter(_ReduceScatterBase):
    """One FSDP unit's reduce-scatter (FSDP2's ``ReduceScatter`` protocol)."""

    def __init__(self, state: FSDPCompression, name: str):
        self.state, self.name, self.calls = state, name, 0

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group,
                 op, async_op: bool = False):
        world = group.size()
        n = output_tensor.numel()
        if input_tensor.numel() != n * world:
            raise ValueError(f"FSDP unit {self.name}: reduce-scatter input has "
                             f"{input_tensor.numel()} elements, expected {world} x {n}")
        how, prescale = _fsdp_op(op)
        comm = self.state.communicator(group)
        # Step 2: the compressed reduce-scatter, waited for (FSDP reads the output next)
        options = self.state._options(self.calls)
        shard, _ = comm.reduce_scatter(input_tensor.reshape(-1), op=how, prescale=prescale,
                                       counts=[n] * world, name=self.name, **options)
        self.calls += 1
        sent, dense = comm.bytes_sent(input_tensor, options["compression"],
                                      collective="reduce_scatter")
        self.state.buckets_reduced += 1
        self.state.uncompressed_bytes += dense
        self.state.wire_bytes += sent
        # Step 3: into FSDP's buffer, in its reduce dtype
        output_tensor.reshape(-1).copy_(shard)
        return None


def _fsdp_op(op) -> tuple[str, float]:
    """FSDP's reduce op as (squinchcomm op, prescale)."""
    kind = getattr(op, "op", op)  # PREMUL_SUM arrives as a ReduceOp carrying its factor
    if kind == dist.ReduceOp.AVG:
        return "average", 1.0
    if kind == dist.ReduceOp.SUM:
        return "sum", 1.0
    if kind == dist.ReduceOp.PREMUL_SUM:
        return "sum", float(op.factor)
    raise ValueError(f"FSDP asked for reduce op {op}: the compressed reduce-scatter does AVG, "
                     "SUM and PREMUL_SUM (set_gradient_divide_factor)")


def _units(model: torch.nn.Module, uncompressed=None) -> list[tuple[str, torch.nn.Module, bool]]:
    """The FSDP2 units of ``model`` as (name, module, plain): ``plain`` when
    ``uncompressed`` selects the unit (names, or a predicate ``(name, module)
    -> bool``)."""
    from torch.distributed.fsdp import FSDPModule

    units = [(name or "<root>", m) for name, m in model.named_modules()
             if isinstance(m, FSDPModule)]
    if not units:
        raise ValueError("no FSDP2 unit in the model: call "
                         "torch.distributed.fsdp.fully_shard(...) on its blocks and on the "
                         "model first, then compress it")
    if uncompressed is None:
        return [(name, m, False) for name, m in units]
    if callable(uncompressed):
        return [(name, m, bool(uncompressed(name, m))) for name, m in units]
    names = {uncompressed} if isinstance(uncompressed, str) else set(uncompressed)
    unknown = names - {name for name, _ in units}
    if unknown:
        raise ValueError(f"uncompressed names {sorted(unknown)}, which are not FSDP units of "
                         f"the model (its units: {', '.join(name for name, _ in units)})")
    return [(name, m, name in names) for name, m in units]


def _set(unit_name: str, setter, value):
    try:
        setter(value)
    except ValueError as exc:  # several parameter groups (per-parameter meshes)
        raise ValueError(f"FSDP unit '{unit_name}': {exc} The compressed reduction needs one "
                         "mesh per unit: drop shard_placement_fn's per-parameter meshes for "
                         "this unit (or wrap those parameters in a unit of their own)") from exc


def compress(model: torch.nn.Module, *, compression: str = "squinch",
             rounding: str = "nearest", error_feedback: bool = False,
             min_compress_bytes: int | None = None, timeout: float | None = None,
             seed: int = 0, start_step: int = 0, uncompressed=None,
             link_model=None) -> FSDPCompression:
    """Compress the gradient reduce-scatter of every FSDP2 unit of ``model``.

    Call after ``fully_shard`` (every rank, same model). Units smaller than
    ``min_compress_bytes`` go uncompressed (default 64 KiB,
    SQUINCHCOMM_MIN_COMPRESS_BYTES); so do each unit's first ``start_step``
    reductions (a warm-up: one per optimizer step without gradient
    accumulation) and the units ``uncompressed`` selects (names of units as in
    ``named_modules``, ``"<root>"`` for the model, or a predicate ``(name,
    module) -> bool``): those keep FSDP's own reduce-scatter. Returns the
    :class:`FSDPCompression` that holds the communicators and residuals.
    ``compression="auto"`` picks none, bf16 or Squinch per unit size from the
    link model probed when the communicator is built (at the first
    reduction), or from ``link_model`` (a :class:`~squinchcomm.LinkModel`
    for the group's size).
    """
    state = FSDPCompression(compression=compression, rounding=rounding,
                            error_feedback=error_feedback, min_compress_bytes=min_compress_bytes,
                            timeout=timeout, seed=seed, start_step=start_step,
                            link_model=link_model)
    for name, unit, plain in _units(model, uncompressed):
        if not plain:  # a plain unit keeps FSDP's own reduce-scatter
            _set(name, unit.set_custom_reduce_scatter,
                 _CompressedReduceScatter(state, f"fsdp.{name}"))
            state.units.append(name)
    return state


def compress_across_nodes(model: torch.nn.Module, cross_group, *,
                          compression: str = "squinch", rounding: str = "nearest",
                          error_feedback: bool = False, min_compress_bytes: int | None = None,
                          timeout: float | None = None, seed: int = 0, start_step: int = 0,
                          uncompressed=None, link_model=None) -> FSDPCompression:
    """HSDP with compressed node-to-node traffic: ``model`` is sharded by
    ``fully_shard`` over the ranks of one node (a 1-D mesh, FSDP's own
    reduce-scatter), and ``cross_group`` holds this rank and the ranks with
    the same position on every other node; after each unit's reduce-scatter
    its shard is averaged over ``cross_group`` with a compressed allreduce.

    With a 2-D mesh ``mesh = init_device_mesh(dev, (nodes, node_size),
    mesh_dim_names=("node", "shard"))``: ``fully_shard(..., mesh=mesh["shard"])``
    and ``cross_group = mesh["node"].get_group()``. Every node must start
    from the same parameters (the same seed, or a broadcast). ``start_step``
    and ``uncompressed`` as in :func:`compress` (selected units are averaged
    across nodes uncompressed); ``compression="auto"`` and ``link_model`` as
    there, for the cross-node group.
    """
    state = FSDPCompression(compression=compression, rounding=rounding,
                            error_feedback=error_feedback, min_compress_bytes=min_compress_bytes,
                            timeout=timeout, seed=seed, start_step=start_step,
                            link_model=link_model)
    for name, unit, plain in _units(model, uncompressed):
        _set(name, unit.set_all_reduce_hook,
             _cross_node_hook(state, cross_group, f"hsdp.{name}", plain))
        state.units.append(name)
    return state


def _cross_node_hook(state: FSDPCompression, cross_group, name: str, plain: bool):
    calls = [0]

    def hook(reduce_output: torch.Tensor):
        # Step 4: the node's reduced shard, averaged with the other nodes'
        comm = state.communicator(cross_group)
        options = state._options(calls[0], plain)
        calls[0] += 1
        if comm.size == 1:
            return
        out = comm.allreduce(reduce_output, op="average", name=name, **options)
        reduce_output.copy_(out)

    return hook
