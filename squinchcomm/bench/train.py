"""Training-step benchmark: tokens/s of the GPT example per gradient-compression method.

    torchrun --standalone --nproc-per-node 4 -m squinchcomm.bench train --steps 10
    mpirun -n 4 python -m squinchcomm.bench train --methods hvd_fp32,squinch,ddp_squinch
    sudo python bench/shaped_cluster.py --ranks 4 --rate 1gbit -- train --steps 10

Trains the model of ``examples/gpt_train.py`` (:class:`~squinchcomm.models.tinygpt.TinyGPT`
on the stdlib byte corpus, AdamW, the same batches: ``sample_windows(corpus.train,
batch, seq, seed, step=, rank=)``) data-parallel over one torch.distributed gloo
process group, once per method, one method after another in the same job. Every
method starts from the same initial weights and sees the same batches:

- ``hvd_fp32``, ``hvd_fp16``, ``hvd_bf16``, ``squinch``, ``squinch_ef``:
  ``squinchcomm.torch.DistributedOptimizer`` with ``Compression.none``, ``fp16``,
  ``bf16``, ``squinch`` and ``squinch_with(error_feedback=True)``; the gradients
  are fused into one buffer (the 64 MiB fusion threshold) and averaged by the
  library's allreduce (fp32: gloo's own ``all_reduce``);
- ``hvd_auto``: the same with ``Compression.auto`` (each bucket in the
  fastest of none, bf16 and Squinch by the link model the first step probes);
- ``ddp_fp32``: ``DistributedDataParallel`` with its default allreduce;
- ``ddp_fp16``: DDP with PyTorch's ``default_hooks.fp16_compress_hook``;
- ``ddp_powersgd4``: DDP with PyTorch's ``powerSGD_hook`` (rank 4, error
  feedback, warm start), compressing from the third step on
  (``start_powerSGD_iter=2``, the earliest PyTorch allows), so ``--warmup``
  must be at least 2; one bucket's collectives at a time (see
  ``_one_bucket_at_a_time``: unwrapped, the hook's callback-issued collectives
  reached gloo in different orders on different ranks and aborted the job);
- ``ddp_squinch``: DDP with ``squinchcomm.torch.ddp_hooks.squinch_hook``
  (error feedback on, as in ``examples/ddp_squinch.py``);
- ``fsdp_fp32``: FSDP2 (``fully_shard`` on every transformer block and on the
  model) with its own reduce-scatter; ``fsdp_squinch``: the same with
  ``squinchcomm.torch.fsdp.compress`` (Squinch reduce-scatter, error feedback
  on); ``hsdp_squinch``: FSDP2 sharded over the ranks of one node (the
  detected layout) and ``fsdp.compress_across_nodes`` (a Squinch allreduce
  of the reduced shards across nodes, error feedback on);
- ``zero_squinch``: ``DistributedOptimizer(shard_optimizer_state=True)`` with
  ``Compression.squinch`` (ZeRO-2: a Squinch reduce-scatter per bucket, each
  rank steps its shard, fp32 parameter all-gather);
- ``diloco_squinch``: ``hvd.DiLoCo`` (AdamW inner steps, Nesterov outer
  step) syncing every ``--sync-every`` steps (default 10), the
  pseudo-gradient in Squinch with error feedback; ``sdiloco_squinch``:
  Streaming DiLoCo, 5 fragments synced ``--sync-every``/5 steps apart, each
  exchange applied that many inner steps after it starts (the exchange runs
  under them). Only one step in H carries a sync (a fragment's, streaming),
  so their time is the *mean* over the timed steps, not the median: run a
  multiple of ``--sync-every`` timed steps. Their ``wait`` is the mean time a
  step waited for an exchange, and the footer gives each exchange's total
  time against that exposed wait (how much of it the inner steps hid).

Each method runs ``--warmup`` untimed steps, then ``--steps`` timed ones. A step
is timed from ``zero_grad`` through ``optimizer.step`` after an untimed
barrier; its time is that of the slowest rank. Columns (rank 0 prints):

- ``time(ms)``: median step time over the timed steps;
- ``tokens/s``: global tokens per step (world x batch x seq) / median step time;
- ``speedup``: time of ``hvd_fp32`` / time of the method (``-`` without it);
- ``loss``: training loss averaged over ranks and the last 5 timed steps
  (same data and initial weights, so a lossy method shows here);
- ``wire(MB/rank)``: gradient bytes each rank sends per step, 1e6 B per MB, in
  the ring model 2(N-1)/N * payload: 4 B per gradient element for fp32, 2 for
  fp16/bf16, Squinch's encoded size (0.75 B); squinchcomm sends buffers under
  ``SQUINCHCOMM_MIN_COMPRESS_BYTES`` (64 KiB) as fp32 (none in the default
  model: the hvd methods fuse all gradients, DDP buckets are 1 MB or more); and
  for PowerSGD the P and Q factors of the compressed matrices plus the
  uncompressed tensors, as counted by PowerSGD's own state; for FSDP also the
  fp32 parameter all-gathers, (N-1)/N * payload each: two per block (forward,
  and backward after resharding) and one for the root unit, plus the
  gradient reduce-scatter, (N-1)/N * payload; for HSDP the same inside a node
  plus the cross-node allreduce of each rank's shard; for ZeRO the
  reduce-scatter and the fp32 parameter all-gather of every bucket;
- ``ident``: the parameters hash to the same bytes on every rank at the end
  (data parallelism's invariant; a method that breaks it is wrong, not fast;
  for DiLoCo its global parameters);
- ``wait(ms)``: for the hvd methods, the median over timed steps of the
  slowest rank's time from the end of ``backward()`` to the reduced gradients
  (``opt.synchronize()``, then ``step()`` inside ``skip_synchronize()``): the
  exchange that backward did not hide, measured directly rather than as the
  difference of two noisy runs; ``-`` for DDP, which waits inside backward.

The header also records the layout squinchcomm detects (nodes x ranks per
node); ``--hierarchical`` makes the squinchcomm methods (hvd_* and
ddp_squinch) sum inside a node uncompressed and compress only across nodes.

Default model: 2 layers, width 512, 8 heads, 128-byte context, 4 sequences per
rank: 6.5 M parameters, so 26 MB of fp32 gradients per step, whose ring
allreduce over 4 ranks at 1 Gbit/s moves 39 MB per rank (about 0.3 s), while a
step on 4 ranks sharing 2 cores over shared memory takes about 0.85 s: the
exchange matters at that rate without a step taking many seconds. Torch uses
cores / ranks-on-this-machine threads per rank unless OMP_NUM_THREADS is set
(examples/gpt_train.py shares the cores of a node the same way; here the ranks
are counted per machine, since the shaped cluster's network-namespace "hosts"
share one machine's cores).
"""

import argparse
import json
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel as DDP

import squinchcomm.torch as hvd
from squinchcomm import __version__, codec
from squinchcomm.bench.common import params_digest, parse_size, versions
from squinchcomm.bench.torch_methods import START_POWERSGD_ITER, share_cores
from squinchcomm.collectives import wire_bytes
from squinchcomm.models.corpus import load_corpus, sample_windows
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT, batch_tensors
from squinchcomm.torch import ddp_hooks
from squinchcomm.transport.torch_dist import init_process_group_from_env

__all__ = ["main", "run_method", "METHODS", "LOSS_STEPS", "wire_bytes_per_rank"]

METHODS = ("hvd_fp32", "hvd_fp16", "hvd_bf16", "squinch", "squinch_ef", "hvd_auto",
           "ddp_fp32", "ddp_fp16", "ddp_powersgd4", "ddp_squinch",
           "fsdp_fp32", "fsdp_squinch", "hsdp_squinch", "zero_squinch",
           "diloco_squinch", "sdiloco_squinch")
STREAMING_FRAGMENTS = 5
LOSS_STEPS = 5  # the loss column averages this many final timed steps
POWERSGD_RANK = 4
# method -> (wire format of a gradient element, sent by squinchcomm: whose small
# buffers go fp32). PowerSGD is counted by its own state instead.
_WIRE = {"hvd_fp32": ("fp32", True), "hvd_fp16": ("fp16", True), "hvd_bf16": ("bf16", True),
         "squinch": ("squinch", True), "squinch_ef": ("squinch", True),
         "ddp_fp32": ("fp32", False), "ddp_fp16": ("fp16", False),
         "ddp_squinch": ("squinch", True), "zero_squinch": ("squinch", True)}


def _methods(spec: str, warmup: int) -> list[str]:
    chosen = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise ValueError(f"--methods {spec!r}: unknown {', '.join(bad) or '(empty)'}; choose a "
                         f"comma list of {', '.join(METHODS)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--methods {spec!r} names a method twice: list each once")
    if "ddp_powersgd4" in chosen and warmup < START_POWERSGD_ITER:
        raise ValueError(f"--warmup {warmup}: ddp_powersgd4 compresses from step "
                         f"{START_POWERSGD_ITER + 1} on (start_powerSGD_iter="
                         f"{START_POWERSGD_ITER}), so pass --warmup >= {START_POWERSGD_ITER} "
                         "to time compressed steps only")
    return chosen


def wire_bytes_per_rank(method: str, buffers: list[int], world: int,
                        min_compress_bytes: int) -> float:
    """Bytes one rank sends per step in the ring model, 2(N-1)/N * payload.

    Args:
        method: a name from :data:`METHODS` other than ``ddp_powersgd4``.
        buffers: element counts of the gradient buffers exchanged in one step.
        world: number of ranks N.
        min_compress_bytes: squinchcomm sends buffers smaller than this (fp32
            bytes) uncompressed; PyTorch's hooks compress every buffer.

    Returns:
        Bytes per rank per step.

    Example:
        >>> wire_bytes_per_rank("hvd_fp16", [1000], world=4, min_compress_bytes=0)
        3000.0
    """
    kind, library = _WIRE[method]
    return sum(wire_bytes(n, world, "none" if library and 4 * n < min_compress_bytes else kind)
               for n in buffers)


def _recording(hook, sizes: list):
    """Wrap a DDP comm hook so it appends each bucket's element count to ``sizes``."""
    def recorded(state, bucket):
        sizes.append(bucket.buffer().numel())
        return hook(state, bucket)

    recorded.__name__ = recorded.__qualname__ = hook.__name__
    return recorded


def _one_bucket_at_a_time(hook):
    """Wrap PowerSGD's hook so a bucket's collectives are all issued before the
    next bucket's start.

    PyTorch's ``powerSGD_hook`` issues its P and Q allreduces from future
    callbacks, so with several buckets in flight the order in which the
    collectives reach the process group differs between ranks; gloo matches
    collectives by order and aborted ("Received data size doesn't match
    expected size") at 4 ranks with this model's two buckets. Waiting for the
    previous bucket's future first restores one order everywhere, at the cost
    of overlap between buckets.
    """
    pending = []

    def serialized(state, bucket):
        if pending:
            pending.pop().wait()
        fut = hook(state, bucket)
        pending.append(fut)
        return fut

    serialized.__name__ = serialized.__qualname__ = hook.__name__
    return serialized


class _Run:
    """One method's model, optimizer and the bookkeeping for its wire bytes."""

    def __init__(self, method: str, config: GPTConfig, args):
        self.method = method
        self.model = TinyGPT(config)  # seeded init: the same weights for every method
        self.buckets: list[int] = []  # DDP hook methods: bucket sizes seen
        self.powersgd = self.diloco = None

        def adamw(params):
            return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)

        if _sharded(method):
            self.units = _fully_shard(self.model, method, args)
            self.optimizer = adamw(self.model.parameters())
            self.net = self.model
        elif "diloco" in method:
            hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
            self.net = self.model
            self.optimizer = adamw(self.model.parameters())
            h = args.sync_every
            fragments = min(STREAMING_FRAGMENTS, h) if method == "sdiloco_squinch" else 1
            self.diloco = hvd.DiLoCo(self.model, self.optimizer, sync_every=h,
                                     compression=hvd.Compression.squinch_with(error_feedback=True),
                                     fragments=fragments,
                                     fragment_sync_delay=h // fragments if fragments > 1 else 0,
                                     name=method)
        elif method.startswith("ddp_"):
            cap = {} if args.bucket_bytes is None else {"bucket_cap_mb": args.bucket_bytes / 2**20}
            self.net = DDP(self.model, **cap)  # broadcasts rank 0's weights
            if method == "ddp_fp16":
                self.net.register_comm_hook(None, _recording(default_hooks.fp16_compress_hook,
                                                             self.buckets))
            elif method == "ddp_powersgd4":
                self.powersgd = powersgd.PowerSGDState(
                    process_group=None, matrix_approximation_rank=POWERSGD_RANK,
                    start_powerSGD_iter=START_POWERSGD_ITER, use_error_feedback=True,
                    warm_start=True)
                self.net.register_comm_hook(self.powersgd,
                                            _one_bucket_at_a_time(powersgd.powerSGD_hook))
            elif method == "ddp_squinch":
                state = ddp_hooks.SquinchHookState(error_feedback=True,
                                                   hierarchical=args.hierarchical)
                self.net.register_comm_hook(state, _recording(ddp_hooks.squinch_hook,
                                                              self.buckets))
            self.optimizer = adamw(self.net.parameters())
        else:
            compression = {"hvd_fp32": hvd.Compression.none, "hvd_fp16": hvd.Compression.fp16,
                           "hvd_bf16": hvd.Compression.bf16,
                           "squinch": hvd.Compression.squinch_with(error_feedback=False),
                           "squinch_ef": hvd.Compression.squinch_with(error_feedback=True),
                           "zero_squinch": hvd.Compression.squinch_with(error_feedback=False),
                           "hvd_auto": hvd.Compression.auto}
            hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
            self.net = self.model
            self.optimizer = hvd.DistributedOptimizer(
                adamw(self.model.parameters()), named_parameters=self.model.named_parameters(),
                compression=compression[method], op=hvd.Average,
                fusion_threshold=args.bucket_bytes, first_bucket_bytes=args.first_bucket_bytes,
                last_bucket_bytes=args.last_bucket_bytes,
                shard_optimizer_state=method == "zero_squinch")

    def step(self, x, y):
        """One training step (zero_grad, forward, backward, step); returns the loss
        and the exposed wait: seconds from the end of backward until the
        gradients are reduced (hvd methods; None for DDP, which waits inside
        backward)."""
        self.optimizer.zero_grad(set_to_none=True)
        _, loss = self.net(x, y)
        loss.backward()
        if self.diloco is not None:  # the wait: this step's time blocked on an exchange
            before = self.diloco.exposed_seconds
            self.diloco.step()
            return loss, self.diloco.exposed_seconds - before
        if not hasattr(self.optimizer, "synchronize"):
            self.optimizer.step()
            return loss, None
        t0 = time.perf_counter()
        self.optimizer.synchronize()  # Horovod's pattern: the same work step() does
        wait = time.perf_counter() - t0
        with self.optimizer.skip_synchronize():
            self.optimizer.step()
        return loss, wait

    def wire_counter(self) -> int:
        """A running count whose growth over the timed steps gives their wire volume."""
        if self.powersgd is not None:
            return self.powersgd.total_numel_after_compression
        if self.diloco is not None:
            return self.diloco.wire_bytes
        return len(self.buckets)

    def wire_bytes(self, start: int, steps: int, world: int, min_compress_bytes: int) -> float:
        """Bytes per rank per step over the timed steps (``start``: wire_counter() before)."""
        if self.powersgd is not None:  # fp32 P, Q and uncompressed tensors, allreduced
            elements = (self.powersgd.total_numel_after_compression - start) / steps
            return wire_bytes(round(elements), world, "none")
        if _sharded(self.method):
            return self.units.wire_bytes(min_compress_bytes)
        if self.diloco is not None:  # the syncs of the timed steps, per step
            return (self.diloco.wire_bytes - start) / steps
        if self.method == "zero_squinch":  # reduce-scatter, then fp32 parameter all-gather
            return sum(wire_bytes(n, world, "squinch" if 4 * n >= min_compress_bytes else "none",
                                  collective="reduce_scatter")
                       + wire_bytes(n, world, "none", collective="allgather")
                       for _, n in self.optimizer.buckets)
        if self.method == "hvd_auto":  # each bucket in the method the link model picks
            model = hvd.communicator().link_model
            return sum(wire_bytes(n, world, "none" if 4 * n < min_compress_bytes
                                  else model.choose(n)) for _, n in self.optimizer.buckets)
        if self.buckets:  # a recording hook: the buckets of the timed steps
            timed = self.buckets[start:]
            return wire_bytes_per_rank(self.method, timed, world, min_compress_bytes) / steps
        # hvd_*: the optimizer's buckets; ddp_fp32: every element, fp32
        sizes = ([n for _, n in self.optimizer.buckets] if hasattr(self.optimizer, "buckets")
                 else [self.model.num_params()])
        return wire_bytes_per_rank(self.method, sizes, world, min_compress_bytes)

    def close(self):
        if hasattr(self.optimizer, "remove_hooks"):
            self.optimizer.remove_hooks()


def _sharded(method: str) -> bool:
    """FSDP2 methods (their optimizer steps DTensor shards)."""
    return method.startswith(("fsdp_", "hsdp_"))


class _ShardedLayout:
    """FSDP2 units of a sharded method: their sizes and the bytes they move."""

    def __init__(self, method: str, blocks: list[int], root: int, shard_size: int,
                 nodes: int):
        self.method, self.blocks, self.root = method, blocks, root
        self.shard_size, self.nodes = shard_size, nodes

    def wire_bytes(self, min_compress_bytes: int) -> float:
        """Bytes one rank sends per step (see the module docstring); units
        under ``min_compress_bytes`` of fp32 go uncompressed."""
        n, units = self.shard_size, self.blocks + [self.root]

        def wire(u, compressed):
            return "squinch" if compressed and 4 * u >= min_compress_bytes else "none"

        gather = wire_bytes(self.root, n, "none", collective="allgather") + sum(
            2 * wire_bytes(b, n, "none", collective="allgather") for b in self.blocks)
        scatter = sum(wire_bytes(u, n, wire(u, self.method == "fsdp_squinch"),
                                 collective="reduce_scatter") for u in units)
        across = 0.0
        if self.method == "hsdp_squinch":  # each rank's shards, allreduced across nodes
            across = sum(wire_bytes(-(-u // n), self.nodes, wire(-(-u // n), True))
                         for u in units)
        return gather + scatter + across


def _fully_shard(model, method: str, args) -> _ShardedLayout:
    """Apply FSDP2 to ``model`` for a sharded method; returns its layout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from squinchcomm.torch import fsdp

    comm = hvd.communicator()
    mesh, nodes, shard_size = None, 1, comm.size
    if method == "hsdp_squinch":
        nodes, shard_size = comm.cross_size, comm.local_size
        if comm.rank != comm.cross_rank * shard_size + comm.local_rank:
            raise ValueError("hsdp_squinch needs the ranks of a node numbered consecutively")
        grid = init_device_mesh("cpu", (nodes, shard_size), mesh_dim_names=("node", "shard"))
        mesh = grid["shard"]
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.h]
    root = sum(p.numel() for p in model.parameters()) - sum(blocks)
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if method == "fsdp_squinch":
        fsdp.compress(model, error_feedback=True)
    elif method == "hsdp_squinch":
        fsdp.compress_across_nodes(model, grid["node"].get_group(), error_feedback=True)
    return _ShardedLayout(method, blocks, root, shard_size, nodes)


def _ranks_on_this_machine() -> int:
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return names.count(socket.gethostname())


def _bucket_mib(run: _Run, last_step_start: int) -> list[float]:
    """MiB of fp32 gradients per bucket, in reduction order: the optimizer's
    buckets, or those a recording DDP hook saw in the last step (else empty)."""
    if hasattr(run.optimizer, "buckets"):
        return [4 * n / 2**20 for _, n in run.optimizer.buckets]
    if run.powersgd is None and run.diloco is None:
        return [4 * n / 2**20 for n in run.buckets[last_step_start:]]
    return []


def _full(model):
    """The model with every FSDP2 parameter gathered (collective), else itself."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return model
    return [p.full_tensor() for p in model.parameters()]


def run_method(method: str, config, args, data, min_compress_bytes: int) -> dict:
    """Train with one method; collective. Returns its row (the same on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run = _Run(method, config, args)
    times, waits, losses, wire_start, last_start = [], [], [], 0, 0
    exchange = exposed = 0.0
    for step in range(1, args.warmup + args.steps + 1):
        x, y = batch_tensors(sample_windows(data.train, args.batch, args.seq, args.seed,
                                            step=step, rank=rank))
        if step == args.warmup + 1:
            wire_start = run.wire_counter()
            if run.diloco is not None:
                exchange, exposed = run.diloco.exchange_seconds, run.diloco.exposed_seconds
        last_start = run.wire_counter()
        dist.barrier()
        t0 = time.perf_counter()
        loss, wait = run.step(x, y)
        dt = time.perf_counter() - t0
        if step > args.warmup:
            times.append(dt)
            waits.append(wait)
            losses.append(loss.item())
    if run.diloco is not None:  # the timed steps' exchanges (one in flight is applied now)
        run.diloco.synchronize()
        exchange = run.diloco.exchange_seconds - exchange
        exposed = run.diloco.exposed_seconds - exposed
    # DiLoCo's shared state is its global parameters (the local ones differ by design).
    shared = (_full(run.model) if run.diloco is None
              else list(run.diloco.global_parameters().values()))
    mine = dict(times=times, waits=waits, losses=losses, digest=params_digest(shared),
                exchange=exchange, exposed=exposed,
                wire=run.wire_bytes(wire_start, args.steps, world, min_compress_bytes),
                buckets=_bucket_mib(run, last_start))
    run.close()
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    # A step ends when its slowest rank does: max over ranks, then the median.
    slowest = [max(e["times"][i] for e in everyone) for i in range(args.steps)]
    mean_losses = [statistics.fmean(e["losses"][i] for e in everyone) for i in range(args.steps)]
    # DiLoCo: one step in H syncs, so the mean over whole cycles is its cost.
    average = statistics.fmean if run.diloco is not None else statistics.median
    t = average(slowest)
    wait = None if waits[0] is None else average(
        max(e["waits"][i] for e in everyone) for i in range(args.steps)) * 1e3
    return dict(method=method, time_ms=t * 1e3, wait_ms=wait,
                tokens_per_s=world * args.batch * args.seq / t,
                loss=statistics.fmean(mean_losses[-LOSS_STEPS:]),
                wire_mb=everyone[0]["wire"] / 1e6, buckets_mib=everyone[0]["buckets"],
                params_identical=len({e["digest"] for e in everyone}) == 1,
                step_times_ms=[v * 1e3 for v in slowest], losses=mean_losses,
                **({} if run.diloco is None else {
                    "exchange_ms": max(e["exchange"] for e in everyone) * 1e3,
                    "exposed_ms": max(e["exposed"] for e in everyone) * 1e3}))


# ---------------------------------------------------------------------------- output
def _header(args, info) -> str:
    hier = "on" if info["hierarchical"] else (
        "off" if not args.hierarchical else "off (requested, but needs >1 node and >1 rank/node)")
    return "\n".join([
        f"# squinchcomm {__version__} training-step benchmark (tokens/s of the GPT example)",
        f"# model TinyGPT layers {args.layers} width {args.width} heads {args.heads} "
        f"seq {args.seq}  params {info['params']:,}  fp32 gradients {info['grad_mb']:.2f} MB",
        f"# batch {args.batch}x{args.seq} per rank  tokens/step {info['tokens_per_step']:,}  "
        f"steps {args.steps} timed + {args.warmup} warm-up per method  lr {args.lr}  "
        f"seed {args.seed}  AdamW",
        f"# methods {','.join(info['methods'])}",
        f"# network {info['network']}",
        f"# transport torch.distributed gloo  world {info['world_size']}  nodes "
        f"{info['nodes']} x {info['ranks_per_node']} ranks (squinchcomm's node detection)  "
        f"hierarchical {hier}",
        f"# torch threads {info['torch_threads']} per rank ({info['ranks_on_machine']} ranks "
        f"on this machine, {os.cpu_count()} cores; OMP_NUM_THREADS "
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')})  NUMBA_NUM_THREADS "
        f"{os.environ.get('NUMBA_NUM_THREADS', 'unset')}  min_compress_bytes "
        f"{info['min_compress_bytes']}  host {platform.node()}",
        "# buckets: cap " + _size(args.bucket_bytes, "SQUINCHCOMM_FUSION_THRESHOLD or 64 MiB "
                                  "(hvd), 25 MiB (DDP)")
        + ", hvd first bucket " + _size(args.first_bucket_bytes,
                                        "SQUINCHCOMM_FIRST_BUCKET_BYTES or 1 MiB")
        + ", hvd last bucket " + _size(args.last_bucket_bytes,
                                       "SQUINCHCOMM_LAST_BUCKET_BYTES or no cap"),
        f"# {info['corpus']}",
        "# " + "  ".join(f"{k} {val}" for k, val in versions().items()),
        "# time = median over timed steps of the slowest rank, zero_grad..optimizer.step "
        "(barrier before each step, not timed); DiLoCo methods: the mean (one step in H "
        "syncs), wait = the mean time a step waited for an exchange",
        "# tokens/s = world*batch*seq / time; speedup = time(hvd_fp32) / time; loss = mean "
        f"over ranks and the last {LOSS_STEPS} timed steps",
        "# wire = MB (1e6 B) of gradients each rank sends per step, ring model 2(N-1)/N * "
        "payload; ident: parameters bit-identical on every rank at the end",
        "# wait = median over timed steps of the slowest rank's time from the end of backward "
        "to reduced gradients (the exchange backward did not hide; hvd methods only)",
        *(["# wire counts the flat algorithm: hierarchical squinchcomm methods send "
           "2(C-1)/C * payload / ranks-per-node across C nodes, the rest inside the node"]
          if info["hierarchical"] else []),
        f"# {'method':>13} {'time(ms)':>10} {'tokens/s':>10} {'speedup':>8} {'loss':>8} "
        f"{'wire(MB/rank)':>13} {'ident':>5} {'wait(ms)':>8}",
    ])


def _size(nbytes, default: str) -> str:
    return default if nbytes is None else f"{nbytes / 2**20:g} MiB"


def _row(r) -> str:
    speedup = f"{r['speedup']:.2f}" if r["speedup"] is not None else "-"
    return (f"  {r['method']:>13} {r['time_ms']:>10.1f} {r['tokens_per_s']:>10,.0f} "
            f"{speedup:>8} {r['loss']:>8.4f} {r['wire_mb']:>13.3f} "
            f"{'yes' if r['params_identical'] else 'NO':>5} "
            f"{'-' if r['wait_ms'] is None else format(r['wait_ms'], '.1f'):>8}")


def _footer(rows) -> str:
    bad = [r["method"] for r in rows if not r["params_identical"]]
    lines = ["#", "# parameters bit-identical on every rank: "
             + ("all methods" if not bad else "NOT for " + ", ".join(bad))]
    for r in rows:
        if "exchange_ms" in r:
            lines.append(f"# {r['method']}: the timed steps' exchanges took {r['exchange_ms']:.0f} "
                         f"ms from launch to result, of which the steps waited "
                         f"{r['exposed_ms']:.0f} ms (slowest rank)")
        if r["buckets_mib"]:
            lines.append(f"# buckets {r['method']}: {len(r['buckets_mib'])} of "
                         + " ".join(f"{b:.2f}" for b in r["buckets_mib"])
                         + " MiB (fp32 gradients, in reduction order)")
    if not os.environ.get("SQUINCHCOMM_BENCH_NETWORK"):  # set by bench/shaped_cluster.py
        lines.append("# one machine: gradients move through shared memory/loopback, so "
                     "compression cannot win on time here; run it on a shaped cluster")
    return "\n".join(lines)


def main(argv=None):
    """Run the benchmark (collective: every rank calls it); returns the result dict."""
    p = argparse.ArgumentParser(prog="python -m squinchcomm.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list of {', '.join(METHODS)} (default all; hvd_fp32, the "
                        "baseline of the speedup column, runs first)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method (default 3)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=128, help="context length in bytes")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    p.add_argument("--hierarchical", action="store_true",
                   help="squinchcomm methods sum inside a node uncompressed, compress across")
    p.add_argument("--bucket-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="bucket cap, e.g. 4M: DistributedOptimizer's fusion_threshold and "
                        "DDP's bucket_cap_mb (default: their own defaults)")
    p.add_argument("--first-bucket-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="DistributedOptimizer's first_bucket_bytes (DDP's first bucket is "
                        "its own 1 MiB)")
    p.add_argument("--last-bucket-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="DistributedOptimizer's last_bucket_bytes: a cap on the bucket "
                        "backward finishes with (default: none of its own)")
    p.add_argument("--sync-every", type=int, default=10, metavar="H",
                   help="DiLoCo methods: inner steps between a fragment's syncs (default 10)")
    p.add_argument("--json", metavar="FILE", help="rank 0 writes rows and parameters as JSON")
    args = p.parse_args(argv)
    # Validate before any collective, so every rank fails the same way at once.
    methods = _methods(args.methods, args.warmup)
    if args.sync_every < 1:
        raise ValueError(f"--sync-every {args.sync_every}: pass at least 1")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps {args.steps} --warmup {args.warmup}: pass at least one timed "
                         "step and a non-negative warm-up count")
    config = GPTConfig(block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                       n_embd=args.width, init_seed=args.seed)
    methods.sort(key=lambda m: m != "hvd_fp32")  # the baseline first: rows print as they come

    # The engines and groups are left to the exit handler (see squinchcomm.bench.__main__).
    init_process_group_from_env(backend="gloo")
    comm = hvd.init("torch", hierarchical=args.hierarchical)
    codec.warm_up()  # wait for init's background compile: no timed step shares the cores with it
    on_machine = _ranks_on_this_machine()
    threads = share_cores(on_machine)
    data = load_corpus()
    params = TinyGPT(config).num_params()
    info = dict(methods=methods, params=params, grad_mb=4 * params / 1e6,
                tokens_per_step=comm.size * args.batch * args.seq,
                network=os.environ.get("SQUINCHCOMM_BENCH_NETWORK")
                or "this machine (shared memory / loopback)",
                world_size=comm.size, nodes=comm.cross_size, ranks_per_node=comm.local_size,
                hierarchical=comm.hierarchical, ranks_on_machine=on_machine,
                torch_threads=threads, min_compress_bytes=comm.min_compress_bytes,
                corpus=data.describe())
    root = comm.rank == 0
    if root:
        print(_header(args, info), flush=True)
    rows, base = [], None
    for method in methods:
        row = run_method(method, config, args, data, comm.min_compress_bytes)
        if method == "hvd_fp32":
            base = row["time_ms"]
        row["speedup"] = base / row["time_ms"] if base is not None else None
        rows.append(row)
        if root:
            print(_row(row), flush=True)
    doc = {"args": vars(args), "versions": versions(), **info, "rows": rows}
    if root:
        print(_footer(rows), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(doc, fh, indent=1)
    dist.barrier()  # nobody exits while rank 0 still writes
    return doc

