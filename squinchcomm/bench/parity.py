"""Loss parity: does training with Squinch-compressed gradients reach the loss of bf16?

One command, from the repository root (about 75 minutes on a 2-core CPU; the
DiLoCo study, issue 17, is ``--methods`` :data:`DILOCO_STUDY` ``--seeds 0,1,2
--name diloco``)::

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \\
    mpirun -n 4 --oversubscribe -x NUMBA_NUM_THREADS=1 python -m squinchcomm.bench parity
    # writes bench/results/parity.{json,md} and parity_{loss,cosine}.png

    mpirun -n 4 ... python -m squinchcomm.bench parity --quick   # a smoke run, seconds
    mpirun -n 4 ... python -m squinchcomm.bench parity --resume  # finish an interrupted run

The longer run for a GPU machine (one GPU per rank, NCCL; a 6-layer, width-384
model with a 256-byte context for 3000 steps, see :data:`LONG`)::

    mpirun -n 4 python -m squinchcomm.bench parity --device cuda --long --name parity_long

Experiment. A byte-level GPT (:class:`~squinchcomm.models.tinygpt.TinyGPT`) is
trained on the Python standard library's source files
(:mod:`squinchcomm.models.corpus`; held-out split by file) by 4 data-parallel
ranks over one torch.distributed gloo group, once per method and seed, one run
after another in the same job. For a seed, every method starts from the same
weights (``init_seed = seed``) and sees the same batches (rank ``r`` at step
``s`` trains on ``sample_windows(train, batch, seq, seed, s, r)``). AdamW
(0.9, 0.95), linear warm-up then cosine decay of the learning rate to 10%, the
averaged gradient clipped to norm 1: the loss curve flattens by the last step.

Every step, each rank computes its gradient and flattens it into one fp32
buffer (as a fused gradient buffer is sent). The exact fp32 average of the
ranks' gradients is computed with gloo (a reference only: not a method's
traffic); the method under test then averages the same buffer its own way, its
result (bit-identical on every rank, checked at the end by hashing the
parameters) replaces the gradients, and the optimizer steps. Methods:

=================  ==========================================================
``fp32``           the exact average itself (gloo allreduce, fp32)
``bf16``           squinchcomm's ``compression="bf16"``: bf16 on the wire, fp32 sums
``fp16``           PyTorch's ``fp16_compress_hook`` (Horovod-style: divide by N,
                   cast to fp16, sum in fp16, cast back)
``squinch``        squinchcomm's compressed allreduce, nearest rounding
``squinch-sr``     ... stochastic rounding
``squinch-ef``     ... nearest rounding with error feedback (what ``squinch_hook``
                   and the examples use: the primary Squinch method below)
``squinch-sr-ef``  ... stochastic rounding with error feedback
``squinch-hier``   hierarchical: fp32 sums inside a "node" of 2 ranks, Squinch
                   across the 2 nodes (nearest)
``squinch-hier-ef`` the same with error feedback
``powersgd4``      PyTorch's ``powerSGD_hook``, rank 4, error feedback, warm
                   start, on the parameters' own shapes (1-D tensors go
                   uncompressed; the first 2 steps are PyTorch's uncompressed
                   warm-up)
``int4``           int4 block absmax (blocks of 128, fp32 scales,
                   :mod:`squinchcomm.codec.baselines`): every rank's encoded
                   gradient is all-gathered and the decoded gradients summed in
                   rank order (one quantization, no error feedback)
``bf16+zreg``      ``bf16`` with Attention Z-Reg (``--zreg-coef``, mean over rows)
``squinch-ef+zreg`` ``squinch-ef`` with Attention Z-Reg
``fsdp-bf16``      FSDP2 (``fully_shard`` on every block and the model) whose
                   reduce-scatter is squinchcomm's with bf16 on the wire (fp32
                   sums): the sharded baseline
``fsdp-squinch-ef`` FSDP2 with ``squinchcomm.torch.fsdp.compress`` (Squinch,
                   error feedback)
``hsdp-squinch-ef`` FSDP2 inside "nodes" of 2 ranks (its own fp32
                   reduce-scatter), ``fsdp.compress_across_nodes`` across them
``dilocoH-fp32``   DiLoCo (:class:`squinchcomm.torch.DiLoCo`) with H = 10 or 50
                   inner steps per sync: every rank trains alone with the AdamW
                   above (its own gradient clipped), and every H steps the
                   pseudo-gradient is averaged in fp32 and applied by Nesterov
                   SGD (lr 0.7, momentum 0.9) to the global parameters
``dilocoH-bf16``   ... the pseudo-gradient in bf16 on the wire
``dilocoH-squinch-ef`` ... in Squinch with error feedback across syncs
``sdiloco50-squinch-ef`` Streaming DiLoCo: H = 50, 5 fragments synced 10 steps
                   apart, each exchange applied 5 inner steps after it starts
                   (mixing 0.5), Squinch with error feedback
``diloco10-fp32-avg`` a diagnosis outside the study: plain parameter averaging
                   every 10 steps (outer SGD lr 1, no momentum)
=================  ==========================================================

DiLoCo methods are evaluated on their global parameters (identical on every
rank) and send bytes only at syncs: their wire column is the run's total over
its steps. ``--quick`` caps H at 3 (so that its 6 steps sync), the fragments at
H and the delay at H - 1.

The sharded methods reduce inside backward, so no exact average of the same
gradient exists to compare with: their cosine is not measured (n/a). They are
judged against ``fsdp-bf16``, every other Squinch method against ``bf16``.

Reported per method (mean and spread over seeds): the final held-out loss (a
fixed set of ``--eval-windows`` windows of the held-out files, the same for
every run), the paired difference to bf16 at the same seed, the mean and
minimum per-step cosine similarity of the method's averaged gradient to the
exact fp32 average, the bytes each rank put on the wire per step, whether the
parameters stayed bit-identical across ranks, and the wall time. Curves:
training loss (mean over ranks) every step, held-out loss every ``--eval-every``
steps.

Wire bytes per rank per step for an n-element gradient on N ranks, in the ring
model that all of gloo's and squinchcomm's algorithms meet: ``2(N-1)/N`` times
the payload (4n fp32, 2n bf16/fp16, Squinch's encoded size for squinch); for
powersgd4 the P and Q factors and the uncompressed tensors, as PowerSGD counts
them (4 bytes each); for int4 the all-gather's ``(N-1)`` payloads. Hierarchical
methods count only what crosses between nodes (the slow link): ``2(C-1)/C``
times the encoded size of the rank's ``n/L`` slice for C nodes of L ranks; the
fp32 traffic inside the node is reported separately.

Criterion, stated before the runs (``CRITERION``): a Squinch method passes if
the difference between its mean final held-out loss and its baseline's is at
most the seed-to-seed spread of the baseline (max - min over the seeds) and at
most 0.5% of the baseline's mean. The baseline is bf16, fsdp-bf16 for the
FSDP2 methods, and the fp32 DiLoCo of the same H for the DiLoCo methods. The primary method is ``squinch-ef``; every other method is
judged by the same rule and reported, failures included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from squinchcomm import Communicator, __version__
from squinchcomm.bench.common import add_model_args, option, params_digest, versions
from squinchcomm.bench.torch_methods import FlatBucket, PowerSGD, all_gather_single, share_cores
from squinchcomm.codec import baselines
from squinchcomm.collectives import wire_bytes
from squinchcomm.models.corpus import load_corpus, sample_windows
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT, batch_tensors
from squinchcomm.transport.torch_dist import init_process_group_from_env

__all__ = ["main", "METHODS", "CRITERION", "PRIMARY", "DILOCO_STUDY", "judge", "summarize"]

DEFAULT_PROG = "python -m squinchcomm.bench parity"
PRIMARY = "squinch-ef"
CRITERION = ("|mean(final held-out loss of the Squinch method) - mean(baseline)| <= "
             "max(baseline) - min(baseline) over the seeds, and <= 0.5% of mean(baseline); "
             "baseline: bf16 (fsdp-bf16 for FSDP2, dilocoH-fp32 for DiLoCo with H steps)")
RELATIVE_TOLERANCE = 0.005
INT4_BLOCK = 128
NODE_SIZE = 2  # ranks per "node" of the hierarchical methods
# --long: a model and run length for a GPU machine (minutes per run there, not here)
LONG = {"n_layer": 6, "n_embd": 384, "n_head": 6, "seq": 256, "batch": 16, "steps": 3000,
        "warmup": 100, "lr": 1e-3, "eval_every": 100, "eval_windows": 1024}


@dataclass(frozen=True)
class Method:
    """How a method averages the flat gradient (see the module docstring)."""

    kind: str  # "fp32" | "wire" (squinchcomm) | "fp16_hook" | "powersgd" | "int4" | "fsdp" | "diloco"
    compression: str = "none"
    rounding: str = "nearest"
    error_feedback: bool = False
    hierarchical: bool = False
    zreg: bool = False
    baseline: str = "bf16"  # what the criterion compares it with
    sync_every: int = 0  # DiLoCo: inner steps per sync (H)
    fragments: int = 1  # Streaming DiLoCo: fragments
    delay: int = 0  # Streaming DiLoCo: inner steps an exchange runs under
    outer_lr: float = 0.7  # DiLoCo's outer Nesterov SGD
    outer_momentum: float = 0.9


METHODS = {
    "fp32": Method("fp32"),
    "bf16": Method("wire", "bf16"),
    "fp16": Method("fp16_hook"),
    "squinch": Method("wire", "squinch"),
    "squinch-sr": Method("wire", "squinch", "stochastic"),
    "squinch-ef": Method("wire", "squinch", error_feedback=True),
    "squinch-sr-ef": Method("wire", "squinch", "stochastic", error_feedback=True),
    "squinch-hier": Method("wire", "squinch", hierarchical=True),
    "squinch-hier-ef": Method("wire", "squinch", error_feedback=True, hierarchical=True),
    "powersgd4": Method("powersgd"),
    "int4": Method("int4"),
    "bf16+zreg": Method("wire", "bf16", zreg=True),
    "squinch-ef+zreg": Method("wire", "squinch", error_feedback=True, zreg=True),
    "fsdp-bf16": Method("fsdp", "bf16"),
    "fsdp-squinch-ef": Method("fsdp", "squinch", error_feedback=True, baseline="fsdp-bf16"),
    "hsdp-squinch-ef": Method("fsdp", "squinch", error_feedback=True, hierarchical=True,
                              baseline="fsdp-bf16"),
    **{f"diloco{h}-{label}": Method("diloco", comp, error_feedback=ef, sync_every=h,
                                    baseline=f"diloco{h}-fp32")
       for h in (10, 50) for label, comp, ef in (("fp32", "none", False), ("bf16", "bf16", False),
                                                 ("squinch-ef", "squinch", True))},
    "sdiloco50-squinch-ef": Method("diloco", "squinch", error_feedback=True, sync_every=50,
                                   fragments=5, delay=5, baseline="diloco50-fp32"),
    # A diagnosis, not in the study: plain parameter averaging every 10 steps
    # (outer SGD lr 1, no momentum), to separate the outer optimizer's share.
    "diloco10-fp32-avg": Method("diloco", sync_every=10, outer_lr=1.0, outer_momentum=0.0,
                                baseline="diloco10-fp32"),
}
# The default --methods: every per-step method. The DiLoCo study (issue 17) is
# its own run, against the synchronous methods it is compared with:
#   parity --methods <DILOCO_STUDY> --seeds 0,1,2 --name diloco
PER_STEP = [m for m, x in METHODS.items() if x.kind != "diloco"]
DILOCO_STUDY = ",".join(["fp32", "bf16", "squinch-ef"]
                        + [m for m, x in METHODS.items() if x.kind == "diloco"
                           and not m.endswith("-avg")])


# ---------------------------------------------------------------------------- reducers
_BASES: dict[bool, Communicator] = {}


def _base_communicator(hierarchical: bool) -> Communicator:
    """One communicator per layout for the whole job (collective on first use):
    flat, or nodes of :data:`NODE_SIZE` ranks; nothing is left uncompressed."""
    if hierarchical not in _BASES:
        comm = Communicator(dist.group.WORLD, min_compress_bytes=0, check_metadata=False,
                            hierarchical=hierarchical,
                            node_size=NODE_SIZE if hierarchical else None)
        if hierarchical and not comm.hierarchical:
            raise ValueError(f"hierarchical methods need nodes of {NODE_SIZE} ranks and more "
                             f"than one node: run on a multiple of {2 * NODE_SIZE} ranks")
        _BASES[hierarchical] = comm
    return _BASES[hierarchical]


class _Reducer:
    """Averages a flat fp32 gradient buffer in place, one method's way."""

    def __init__(self, method: Method, buffer: torch.Tensor, shapes, seed: int):
        self.method, self.buffer = method, buffer
        n, world = buffer.numel(), dist.get_world_size()
        self.local_bytes = 0.0  # hierarchical: fp32 bytes inside the node per step
        if method.kind == "wire":
            # A fresh error-feedback state and call count per run, over groups built once.
            self.comm, self.seed = _base_communicator(method.hierarchical), seed
            # Every run starts from call 0 with no residuals, whatever ran before it.
            self.comm.load_state_dict({"calls": 0, "error_feedback": {}})
            local = self.comm.local_size if method.hierarchical else 1
            self.wire = wire_bytes(n, world, method.compression,
                                   hierarchical=method.hierarchical, local_size=local)
            if method.hierarchical:  # fp32 reduce-scatter + allgather inside the node
                self.local_bytes = (wire_bytes(n, local, "none", collective="reduce_scatter")
                                    + wire_bytes(n, local, "none", collective="allgather"))
        elif method.kind == "fp16_hook":
            self.bucket = FlatBucket(buffer, shapes)
            self.wire = wire_bytes(n, world, "fp16")
        elif method.kind == "powersgd":
            self.powersgd = PowerSGD(buffer, rank=4, group=dist.group.WORLD, seed=seed,
                                     shapes=shapes)
            self.sent: list[int] = []
        elif method.kind == "int4":
            self.wire = (world - 1) * baselines.payload_nbytes("int4", n, block=INT4_BLOCK)
        else:
            self.wire = wire_bytes(n, world, "none")

    def __call__(self, exact: torch.Tensor) -> None:
        """Average ``self.buffer`` over the ranks in place (``exact``: the fp32 average)."""
        m, buf = self.method, self.buffer
        if m.kind == "fp32":
            buf.copy_(exact)
        elif m.kind == "wire":
            self.comm.allreduce(buf, out=buf, name="grad", compression=m.compression,
                                rounding=m.rounding, error_feedback=m.error_feedback,
                                seed=self.seed)
        elif m.kind == "fp16_hook":
            buf.copy_(default_hooks.fp16_compress_hook(dist.group.WORLD, self.bucket).wait())
        elif m.kind == "powersgd":
            self.powersgd.step()
            self.sent.append(self.powersgd.sent_elements)
        else:
            self._int4()

    def _int4(self) -> None:
        """Encode on the host (a GPU run copies the gradient there: a peer, not a product)."""
        buf, world = self.buffer, dist.get_world_size()
        q = baselines.encode_int4(buf.cpu().numpy(), block=INT4_BLOCK)
        mine = torch.from_numpy(np.concatenate([q.codes.view(np.uint8), q.scales.view(np.uint8)]))
        gathered = torch.empty(world * mine.numel(), dtype=torch.uint8, device=buf.device)
        all_gather_single(gathered, mine.to(buf.device))
        rows = gathered.cpu().numpy().reshape(world, mine.numel())
        total = np.zeros(buf.numel(), np.float32)
        for row in rows:  # rank order: the same sum on every rank
            part = baselines.BlockQuantized(row[:q.codes.nbytes], row[q.codes.nbytes:]
                                            .view(np.float32), q.n, q.block, q.bits)
            total += baselines.decode_int4(part)
        buf.copy_(torch.from_numpy(total / np.float32(world)))

    def wire_bytes(self) -> float:
        """Bytes this rank sent per step (mean over the run)."""
        if self.method.kind == "powersgd":
            world = dist.get_world_size()
            return wire_bytes(round(float(np.mean(self.sent))), world, "none")
        return self.wire


# ---------------------------------------------------------------------------- training
def _lr(step: int, args) -> float:
    """Linear warm-up over ``--warmup`` steps, then cosine decay to 10% at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _held_out(model: TinyGPT, windows: np.ndarray, device) -> float:
    """Mean next-byte loss over ``windows``, split over the ranks (collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = windows[rank::world]
    model.eval()
    with torch.no_grad():
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for i in range(0, len(mine), 16):
            x, y = batch_tensors(mine[i:i + 16], device)
            total[0] += model(x, y)[1].double() * x.numel()
            total[1] += x.numel()
    model.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])


_SETTINGS = ("steps", "warmup", "batch", "seq", "n_layer", "n_embd", "n_head", "lr", "clip",
             "eval_windows", "eval_every", "tail", "corpus_bytes", "device")


def _settings(name: str, args) -> dict:
    """What a run's result depends on besides method and seed (``--resume`` compares it)."""
    out = {k: getattr(args, k) for k in _SETTINGS}
    if METHODS[name].kind == "diloco":
        out["diloco"] = list(diloco_schedule(METHODS[name], args))
    if METHODS[name].zreg:
        out["zreg_coef"] = args.zreg_coef
    return out


def _resumable(path: Path, args) -> list[dict]:
    """The runs of an earlier result file that this invocation would repeat exactly."""
    if not path.exists():
        return []
    wanted = {(m, s) for m in args.methods for s in args.seeds}
    return [{**r, "resumed": True} for r in json.loads(path.read_text())["runs"]
            if (r["method"], r["seed"]) in wanted and r["settings"] == _settings(r["method"], args)]


def train_run(name: str, seed: int, args, data, eval_windows, quick_eval) -> dict:
    """Train one method from one seed (collective); returns its record (rank 0's view)."""
    method = METHODS[name]
    if method.kind in ("fsdp", "diloco"):
        train = _train_sharded if method.kind == "fsdp" else _train_diloco
        return _with_bytes_curve(train(name, seed, args, data, eval_windows, quick_eval))
    return _with_bytes_curve(_train_replicated(name, seed, args, data, eval_windows, quick_eval))


def _with_bytes_curve(record: dict) -> dict:
    """Cumulative wire bytes per rank at each held-out point (every step's
    bytes for the per-step methods; DiLoCo records its own)."""
    record.setdefault("bytes_curve", [step * record["wire_bytes_per_step"]
                                      for step, _ in record["held_out_curve"]])
    return record


def _train_replicated(name: str, seed: int, args, data, eval_windows, quick_eval) -> dict:
    """:func:`train_run` for the methods that average one flat gradient per step."""
    method = METHODS[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    config = GPTConfig(block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, init_seed=seed,
                       zreg_coef=args.zreg_coef if method.zreg else 0.0, zreg_reduction="mean")
    device = torch.device(args.device)
    model = TinyGPT(config).to(device)
    params = list(model.parameters())
    for p in params:  # the same start everywhere, as DDP's constructor does
        dist.broadcast(p.data, 0)
    shapes = [tuple(p.shape) for p in params]
    buffer = torch.zeros(sum(p.numel() for p in params), device=device)
    reduce = _Reducer(method, buffer, shapes, seed)
    exact = torch.empty_like(buffer)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses, cosines, curve = [], [], []
    t0 = time.perf_counter()
    for step in range(args.steps):
        if step % args.eval_every == 0:
            curve.append((step, _held_out(model, quick_eval, device)))
        x, y = batch_tensors(sample_windows(data.train, args.batch, args.seq, seed, step + 1,
                                            rank), device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.cat([p.grad.reshape(-1) for p in params], out=buffer)
        exact.copy_(buffer)
        mean_loss = loss.detach().double().reshape(1)
        dist.all_reduce(exact)
        exact /= world
        dist.all_reduce(mean_loss)
        reduce(exact)
        cosines.append(float(torch.nn.functional.cosine_similarity(
            buffer.double(), exact.double(), dim=0)))
        losses.append(float(mean_loss) / world)
        at = 0
        for p in params:
            p.grad.copy_(buffer[at:at + p.numel()].view_as(p))
            at += p.numel()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        for group in opt.param_groups:
            group["lr"] = _lr(step, args)
        opt.step()
    final = _held_out(model, eval_windows, device)
    curve.append((args.steps, _held_out(model, quick_eval, device)))
    digests = [None] * world
    dist.all_gather_object(digests, params_digest(model))
    return {"method": name, "seed": seed, "settings": _settings(name, args), "final_loss": final,
            "train_loss_tail": float(np.mean(losses[-args.tail:])),
            "cosine_mean": float(np.mean(cosines)), "cosine_min": float(np.min(cosines)),
            "wire_bytes_per_step": reduce.wire_bytes(),
            "local_bytes_per_step": reduce.local_bytes,
            "identical": len(set(digests)) == 1, "seconds": round(time.perf_counter() - t0, 1),
            "train_losses": losses, "cosines": cosines, "held_out_curve": curve}


def _train_sharded(name: str, seed: int, args, data, eval_windows, quick_eval) -> dict:
    """:func:`train_run` for the FSDP2 methods: the same model, batches,
    optimizer, schedule and clipping; the reduction happens inside backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from squinchcomm.torch import fsdp

    method = METHODS[name]
    world = dist.get_world_size()
    config = GPTConfig(block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, init_seed=seed)
    device = torch.device(args.device)
    model = TinyGPT(config).to(device)  # init_seed: the same start on every rank
    sizes = [sum(p.numel() for p in b.parameters()) for b in model.h]
    units = sizes + [model.num_params() - sum(sizes)]
    mesh, local = None, world
    if method.hierarchical:
        local = NODE_SIZE
        grid = init_device_mesh(args.device, (world // local, local),
                                mesh_dim_names=("node", "shard"))
        mesh = grid["shard"]
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    options = dict(compression=method.compression, error_feedback=method.error_feedback,
                   min_compress_bytes=0, seed=seed)
    if method.hierarchical:  # the wire: each rank's shard allreduced across the nodes
        fsdp.compress_across_nodes(model, grid["node"].get_group(), **options)
        wire = sum(wire_bytes(u, world, method.compression, hierarchical=True,
                              local_size=local) for u in units)
        local_bytes = sum(wire_bytes(u, local, "none", collective="reduce_scatter")
                          for u in units)
    else:
        fsdp.compress(model, **options)
        wire = sum(wire_bytes(u, world, method.compression, collective="reduce_scatter")
                   for u in units)
        local_bytes = 0.0
    plain = TinyGPT(config).to(device)  # full parameters for the held-out loss

    def held_out(windows):
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        plain.load_state_dict(full)
        return _held_out(plain, windows, device)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    t0 = time.perf_counter()
    losses, curve = _local_loop(model, opt, opt.step, held_out, quick_eval, args, data, seed,
                                device)
    final = held_out(eval_windows)
    curve.append((args.steps, held_out(quick_eval)))
    digests = [None] * world
    dist.all_gather_object(digests, params_digest(plain))
    return {"method": name, "seed": seed, "settings": _settings(name, args), "final_loss": final,
            "train_loss_tail": float(np.mean(losses[-args.tail:])),
            "cosine_mean": float("nan"), "cosine_min": float("nan"),
            "wire_bytes_per_step": wire, "local_bytes_per_step": local_bytes,
            "identical": len(set(digests)) == 1, "seconds": round(time.perf_counter() - t0, 1),
            "train_losses": losses, "cosines": [], "held_out_curve": curve}


def _local_loop(model, opt, step, held_out, quick_eval, args, data, seed, device,
                on_eval=None) -> tuple[list, list]:
    """The steps of the methods that reduce outside this loop (FSDP2 inside
    backward, DiLoCo in its ``step``): the batches, the loss averaged over
    the ranks, clipping of this rank's gradient, the schedule, ``step()``;
    the held-out curve every ``--eval-every`` steps. Returns (losses, curve)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    losses, curve = [], []
    for s in range(args.steps):
        if s % args.eval_every == 0:
            curve.append((s, held_out(quick_eval)))
            if on_eval is not None:
                on_eval()
        x, y = batch_tensors(sample_windows(data.train, args.batch, args.seq, seed, s + 1, rank),
                             device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        mean_loss = loss.detach().double().reshape(1)
        dist.all_reduce(mean_loss)
        losses.append(float(mean_loss) / world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for group in opt.param_groups:
            group["lr"] = _lr(s, args)
        step()
    return losses, curve


def diloco_schedule(method: Method, args) -> tuple[int, int, int]:
    """(H, fragments, delay) of a DiLoCo method; ``--quick`` caps them (see the docstring)."""
    h = min(method.sync_every, 3) if args.quick else method.sync_every
    fragments = min(method.fragments, h)
    return h, fragments, min(method.delay, h - 1)


def _train_diloco(name: str, seed: int, args, data, eval_windows, quick_eval) -> dict:
    """:func:`train_run` for DiLoCo: the same model, batches, inner optimizer,
    schedule and clipping (of each rank's own gradient); the global
    parameters are evaluated."""
    import squinchcomm.torch as hvd

    method = METHODS[name]
    world = dist.get_world_size()
    if not hvd.is_initialized():  # the default communicator, over the same gloo group
        hvd.init("torch", min_compress_bytes=0, check_metadata=False)
    config = GPTConfig(block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, init_seed=seed)
    device = torch.device(args.device)
    model = TinyGPT(config).to(device)
    params = list(model.parameters())
    for p in params:
        dist.broadcast(p.data, 0)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    h, fragments, delay = diloco_schedule(method, args)
    compression = hvd.WireCompression(method.compression, error_feedback=method.error_feedback)

    def outer(global_params):
        return torch.optim.SGD(global_params, lr=method.outer_lr, momentum=method.outer_momentum,
                               nesterov=method.outer_momentum > 0)

    diloco = hvd.DiLoCo(model, opt, sync_every=h, compression=compression, fragments=fragments,
                        fragment_sync_delay=delay, outer_optimizer=outer, name=f"{name}.seed{seed}")
    plain = TinyGPT(config).to(device)  # the global parameters, for the held-out loss
    shared = diloco.global_parameters()

    def held_out(windows):
        with torch.no_grad():
            for n, p in plain.named_parameters():
                p.copy_(shared[n])
        return _held_out(plain, windows, device)

    sent = []
    t0 = time.perf_counter()
    losses, curve = _local_loop(model, opt, diloco.step, held_out, quick_eval, args, data, seed,
                                device, on_eval=lambda: sent.append(diloco.wire_bytes))
    diloco.synchronize()  # an exchange still in flight is applied before the evaluation
    final = held_out(eval_windows)
    curve.append((args.steps, held_out(quick_eval)))
    sent.append(diloco.wire_bytes)
    digests = [None] * world
    dist.all_gather_object(digests, params_digest(plain))
    return {"method": name, "seed": seed, "settings": _settings(name, args), "final_loss": final,
            "train_loss_tail": float(np.mean(losses[-args.tail:])),
            "cosine_mean": float("nan"), "cosine_min": float("nan"),
            "wire_bytes_per_step": diloco.wire_bytes / args.steps, "local_bytes_per_step": 0.0,
            "identical": len(set(digests)) == 1, "seconds": round(time.perf_counter() - t0, 1),
            "train_losses": losses, "cosines": [], "held_out_curve": curve, "bytes_curve": sent,
            "diloco": {"sync_every": h, "fragments": fragments, "delay": delay,
                       "syncs": list(diloco.syncs), "exchange_s": diloco.exchange_seconds,
                       "exposed_s": diloco.exposed_seconds}}


# ---------------------------------------------------------------------------- summary
def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per method: mean/std/min/max of the final held-out loss over seeds, the
    paired difference to bf16 (same seed), cosine and wire means."""
    out = {}
    by = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r
    for name, seeds in by.items():
        base = by.get(METHODS[name].baseline, {})
        finals = np.array([r["final_loss"] for r in seeds.values()])
        paired = [seeds[s]["final_loss"] - base[s]["final_loss"] for s in seeds if s in base]
        out[name] = {
            "seeds": sorted(seeds), "mean": float(finals.mean()),
            "std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
            "min": float(finals.min()), "max": float(finals.max()),
            "paired_diff_mean": float(np.mean(paired)) if paired else None,
            "paired_diff_std": float(np.std(paired, ddof=1)) if len(paired) > 1 else None,
            "cosine_mean": float(np.mean([r["cosine_mean"] for r in seeds.values()])),
            "cosine_min": float(np.min([r["cosine_min"] for r in seeds.values()])),
            "wire_bytes_per_step": float(np.mean([r["wire_bytes_per_step"]
                                                  for r in seeds.values()])),
            "local_bytes_per_step": float(np.mean([r["local_bytes_per_step"]
                                                   for r in seeds.values()])),
            "identical": all(r["identical"] for r in seeds.values()),
            "seconds": float(np.mean([r["seconds"] for r in seeds.values()])),
        }
    return out


def judge(summary: dict[str, dict]) -> dict[str, dict]:
    """Apply :data:`CRITERION` to every Squinch method that has its baseline
    (bf16, or fsdp-bf16 for the sharded ones) to compare with."""
    verdicts = {}
    for name, s in summary.items():
        if "squinch" not in name or METHODS[name].baseline not in summary:
            continue
        b = summary[METHODS[name].baseline]
        spread = b["max"] - b["min"]
        diff = s["mean"] - b["mean"]
        within_spread = abs(diff) <= spread
        within_rel = abs(diff) <= RELATIVE_TOLERANCE * b["mean"]
        verdicts[name] = {"diff": diff, "bf16_spread": spread,
                          "relative": diff / b["mean"], "within_spread": within_spread,
                          "within_0.5%": within_rel, "pass": within_spread and within_rel}
        # A diagnosis, not the verdict: a Z-Reg run against bf16 with the same Z-Reg
        # separates what the regularizer costs from what the compression costs.
        if METHODS[name].zreg and "bf16+zreg" in summary:
            same = summary["bf16+zreg"]["mean"]
            verdicts[name]["diff_vs_bf16+zreg"] = s["mean"] - same
            verdicts[name]["relative_vs_bf16+zreg"] = (s["mean"] - same) / same
    return verdicts


def _one_minus(cosine: float) -> str:
    return "n/a" if math.isnan(cosine) else f"{1 - cosine:.1e}"


def _markdown(doc: dict) -> str:
    s, v = doc["summary"], doc["verdicts"]
    a = doc["args"]
    lines = [
        f"# Loss parity: {a['n_layer']}-layer GPT, {doc['world']} ranks, "
        f"seeds {a['seeds']}, {a['steps']} steps",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']}  ",
        f"Model: TinyGPT {a['n_layer']} layers, width {a['n_embd']}, {a['n_head']} heads, "
        f"context {a['seq']}, {doc['params']:,} parameters; batch {a['batch']} x {a['seq']} "
        f"bytes per rank; AdamW lr {a['lr']} (warm-up {a['warmup']}, cosine to 10%), "
        f"clip {a['clip']}; Z-Reg coefficient {a['zreg_coef']} (mean over rows)  ",
        f"Held-out: {a['eval_windows']} windows of the held-out files; {doc['corpus']}  ",
        f"Wall time: {doc['wall_seconds'] / 60:.1f} min  ",
        f"Criterion (stated before the runs): {CRITERION}; primary method {PRIMARY}",
        "",
        "| method | final held-out loss (mean ± std) | min..max | vs baseline, paired (mean ± std) "
        "| 1 - cosine to fp32 avg (mean / max) | wire KB/rank/step | wire MB/rank, run "
        "| identical | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    for name, r in s.items():
        paired = ("-" if r["paired_diff_mean"] is None else
                  f"{r['paired_diff_mean']:+.4f}" + ("" if r["paired_diff_std"] is None else
                                                     f" ± {r['paired_diff_std']:.4f}"))
        verdict = ("-" if name not in v else ("pass" if v[name]["pass"] else "FAIL"))
        wire = f"{r['wire_bytes_per_step'] / 1e3:.1f}"
        if r["local_bytes_per_step"]:
            wire += f" (+{r['local_bytes_per_step'] / 1e3:.0f} in node)"
        lines.append(f"| {name} | {r['mean']:.4f} ± {r['std']:.4f} | {r['min']:.4f}..{r['max']:.4f}"
                     f" | {paired} | {_one_minus(r['cosine_mean'])} / {_one_minus(r['cosine_min'])} | {wire} | "
                     f"{r['wire_bytes_per_step'] * a['steps'] / 1e6:.1f} | "
                     f"{'yes' if r['identical'] else 'NO'} | {verdict} |")
    lines += ["", "Baseline: bf16; fsdp-bf16 for the fsdp-/hsdp- methods; dilocoH-fp32 for the "
              "DiLoCo methods with H steps. Verdicts (diff = mean - mean(baseline)):", ""]
    for name, x in v.items():
        base = METHODS[name].baseline
        side = "" if x["pass"] else (f", lower loss than {base}" if x["diff"] < 0 else
                                     f", higher loss than {base}")
        lines.append(f"- {name}: diff {x['diff']:+.4f} ({100 * x['relative']:+.2f}%), {base} "
                     f"spread {x['bf16_spread']:.4f}: {'pass' if x['pass'] else 'FAIL'}"
                     f" (within spread: {x['within_spread']}, within 0.5%: {x['within_0.5%']}"
                     f"{side})" + ("" if "diff_vs_bf16+zreg" not in x else
                                   f"; against bf16+zreg {x['diff_vs_bf16+zreg']:+.4f} "
                                   f"({100 * x['relative_vs_bf16+zreg']:+.2f}%)"))
    return "\n".join(lines) + "\n"


def _plot(doc: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["summary"])
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    for r in doc["runs"]:
        label = r["method"] if r["seed"] == doc["args"]["seeds"][0] else None
        steps, loss = zip(*r["held_out_curve"])
        ax1.plot(steps, loss, color=colors[r["method"]], lw=1, label=label)
        tl = np.convolve(r["train_losses"], np.ones(20) / 20, mode="valid")
        ax2.plot(np.arange(len(tl)) + 19, tl, color=colors[r["method"]], lw=0.7, label=label)
    ax1.set(xlabel="step", ylabel="held-out loss (nats/byte)", title="held-out loss, every seed")
    ax2.set(xlabel="step", ylabel="training loss (20-step mean)", title="training loss")
    top = max(s["mean"] for s in doc["summary"].values())
    for ax in (ax1, ax2):
        ax.set_ylim(min(s["min"] for s in doc["summary"].values()) - 0.1, top + 0.8)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    loss_png = out / f"{doc['args']['name']}_loss.png"
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)
    plots = [str(loss_png)]
    if any(METHODS[r["method"]].kind == "diloco" for r in doc["runs"]):
        plots.append(_plot_bytes(doc, out, colors, plt))
    if not any(r["cosines"] for r in doc["runs"]):  # only sharded or DiLoCo: no cosine
        return plots
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in doc["runs"]:
        if r["seed"] != doc["args"]["seeds"][0] or r["method"] == "fp32" or not r["cosines"]:
            continue  # (the sharded methods have no per-step cosine)
        c = np.convolve(1 - np.asarray(r["cosines"]), np.ones(10) / 10, mode="valid")
        ax.plot(np.arange(len(c)) + 9, c, color=colors[r["method"]], lw=1, label=r["method"])
    ax.set(xlabel="step", ylabel="1 - cosine to the exact fp32 average (10-step mean)",
           yscale="log", title=f"gradient error per step, seed {doc['args']['seeds'][0]}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    cos_png = out / f"{doc['args']['name']}_cosine.png"
    fig.savefig(cos_png, dpi=110)
    plt.close(fig)
    return plots + [str(cos_png)]


def _plot_bytes(doc: dict, out: Path, colors, plt) -> str:
    """Held-out loss against the wire bytes each rank has sent so far (mean over seeds)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in doc["summary"]:
        runs = [r for r in doc["runs"] if r["method"] == name]
        sent = np.mean([r["bytes_curve"] for r in runs], axis=0)
        loss = np.mean([[v for _, v in r["held_out_curve"]] for r in runs], axis=0)
        keep = sent > 0  # the start (no bytes yet) has no place on a log axis
        style = "--" if METHODS[name].kind == "diloco" else "-"
        ax.plot(sent[keep] / 1e6, loss[keep], style, marker=".", color=colors[name], lw=1,
                label=name)
    ax.set(xscale="log", xlabel="wire MB sent per rank so far",
           ylabel="held-out loss (nats/byte, mean over seeds)",
           title="held-out loss against bytes on the wire")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png = out / f"{doc['args']['name']}_bytes.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return str(png)


# ---------------------------------------------------------------------------- main
def _parse(argv):
    p = argparse.ArgumentParser(prog=DEFAULT_PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(PER_STEP),
                   help=f"comma list of {', '.join(METHODS)} (default: all but the DiLoCo "
                        f"ones; the DiLoCo study: --methods {DILOCO_STUDY} --seeds 0,1,2 "
                        "--name diloco)")
    p.add_argument("--seeds", default=None,
                   help="comma list of seeds (default 0,1,2,3,4; with --quick 0,1)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=30, help="learning-rate warm-up steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=64, help="context length in bytes")
    add_model_args(p, layers=2, width=128, heads=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--zreg-coef", type=float, default=1e-3,
                   help="Attention Z-Reg coefficient of the +zreg methods (mean over rows)")
    p.add_argument("--eval-windows", type=int, default=512, help="held-out windows, final loss")
    p.add_argument("--eval-every", type=int, default=50, help="held-out curve interval (steps)")
    p.add_argument("--tail", type=int, default=20, help="steps in the tail training loss")
    p.add_argument("--corpus-bytes", type=int, default=None, help="stdlib bytes to read")
    p.add_argument("--out", default="bench/results", help="directory of parity.{json,md,png}")
    p.add_argument("--name", default="parity", help="file name stem in --out")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one GPU per rank, NCCL (init_process_group_from_env sets each "
                        "rank's GPU from its local rank)")
    p.add_argument("--long", action="store_true",
                   help="the longer run for a GPU machine: 6 layers, width 384, context 256, "
                        "batch 16, 3000 steps (explicit options still win)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs of an existing <out>/<name>.json made with the same "
                        "settings; run only the missing (method, seed) pairs")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: tiny model, 6 steps, 2 seeds, writes into --out")
    args = p.parse_args(argv)
    if args.long:
        given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
        for opt, value in LONG.items():
            if option(opt) not in given:
                setattr(args, opt, value)
    if args.quick:
        args.steps, args.warmup, args.n_layer, args.n_embd, args.n_head = 6, 2, 1, 32, 2
        args.seq, args.batch, args.eval_windows, args.eval_every, args.tail = 16, 2, 16, 3, 2
        args.corpus_bytes = args.corpus_bytes or (1 << 20)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names or len(set(names)) != len(names):
        p.error(f"--methods {args.methods!r}: list each of {', '.join(METHODS)} at most once"
                + (f" (unknown: {', '.join(bad)})" if bad else ""))
    args.methods = names
    if args.seeds is None:
        args.seeds = "0,1" if args.quick else "0,1,2,3,4"
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: pass a comma list of integers, e.g. 0,1,2")
    if not args.seeds or args.steps < 1 or args.eval_every < 1 or args.warmup < 1:
        p.error("pass at least one seed and positive --steps, --warmup, --eval-every")
    return args


def _document(args, argv, prog, world, threads, data, params, t0, runs) -> dict:
    summary = summarize(runs)
    return {"command": " ".join([prog] + [shlex.quote(a) for a in
                                          (sys.argv[1:] if argv is None else argv)]),
            "version": __version__, "world": world, "torch_threads": threads,
            "machine": f"{versions()['cpu']}, {os.cpu_count()} cores, {world} ranks on this "
                       f"machine, torch {torch.__version__}",
            "versions": versions(), "corpus": data.describe(), "params": params,
            "args": dict(vars(args)), "criterion": CRITERION, "primary": PRIMARY,
            # this invocation's time plus that of the runs it resumed
            "wall_seconds": time.perf_counter() - t0 + sum(
                r["seconds"] for r in runs if r.get("resumed")),
            "summary": summary, "verdicts": judge(summary), "runs": runs}


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> dict:
    """Run the experiment (collective: every rank calls it); returns the result document."""
    args = _parse(argv)
    init_process_group_from_env(backend="nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if any(METHODS[m].hierarchical for m in args.methods) and world % (2 * NODE_SIZE):
        raise ValueError(f"the hierarchical methods need a multiple of {2 * NODE_SIZE} ranks "
                         f"(nodes of {NODE_SIZE}), got {world}: run mpirun -n 4 or drop them "
                         "from --methods")
    # CPU: every rank of this experiment is on this machine and shares its cores
    threads = share_cores(world) if args.device == "cpu" else torch.get_num_threads()
    data = load_corpus(**({"max_bytes": args.corpus_bytes} if args.corpus_bytes else {}))
    rng = np.random.default_rng(12345)  # one held-out set for every method and seed
    starts = rng.integers(0, data.val.size - args.seq - 1, args.eval_windows)
    eval_windows = data.val[starts[:, None] + np.arange(args.seq + 1)]
    quick_eval = eval_windows[:max(world, args.eval_windows // 8)]
    out = Path(args.out)
    t0 = time.perf_counter()
    runs = []
    if args.resume:  # rank 0 reads; every rank must skip the same runs
        kept = [_resumable(out / f"{args.name}.json", args) if rank == 0 else None]
        dist.broadcast_object_list(kept, 0)
        runs = kept[0]
    done = {(r["method"], r["seed"]) for r in runs}
    params = TinyGPT(GPTConfig(block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head,
                               n_embd=args.n_embd)).num_params()
    doc = {}
    for seed in args.seeds:
        for name in args.methods:
            if (name, seed) in done:
                continue
            r = train_run(name, seed, args, data, eval_windows, quick_eval)
            runs.append(r)
            if rank == 0:
                print(f"seed {seed} {name:>16}: held-out {r['final_loss']:.4f}  train "
                      f"{r['train_loss_tail']:.4f}  1-cos {1 - r['cosine_mean']:.1e}  "
                      f"wire {r['wire_bytes_per_step'] / 1e3:.1f} KB  identical "
                      f"{r['identical']}  {r['seconds']:.0f} s", flush=True)
                doc = _document(args, argv, prog, world, threads, data, params, t0, runs)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
                (out / f"{args.name}.md").write_text(_markdown(doc))
    if rank == 0 and runs:
        runs.sort(key=lambda r: (r["seed"], args.methods.index(r["method"])))
        doc = _document(args, argv, prog, world, threads, data, params, t0, runs)
        doc["plots"] = _plot(doc, out)
        (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
        (out / f"{args.name}.md").write_text(_markdown(doc))
        print(_markdown(doc), flush=True)
    dist.barrier()
    return doc
