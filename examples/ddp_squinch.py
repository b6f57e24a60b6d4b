"""A plain PyTorch DDP training script with a Squinch gradient-compression hook.

    torchrun --nproc-per-node 2 examples/ddp_squinch.py --steps 20 [--hook squinch]
    python -m torch.distributed.run --nproc-per-node 2 examples/ddp_squinch.py --hook bf16

A tiny GPT learns next-byte prediction on the Python standard library's own
source (no download). Everything is ordinary DistributedDataParallel; the
lines tagged ``# squinchcomm:`` are the only ones the library adds: they
register a communication hook that averages each gradient bucket with the
6-bit Squinch allreduce (error feedback on), or an fp16/bf16 one for
comparison. ``--hook none`` is DDP's own fp32 allreduce. Rank 0 prints the
loss and the throughput (tokens per second over all ranks).
"""

import argparse
import hashlib
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# Data and model only (any model and data loader work the same way).
import squinchcomm  # squinchcomm:
from squinchcomm.models.corpus import load_corpus, sample_windows
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT, batch_tensors, estimate_loss
from squinchcomm.torch import ddp_hooks  # squinchcomm: the DDP communication hooks


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", choices=("none", "squinch", "fp16", "bf16"), default="squinch",
                   help="DDP communication hook: squinch (error feedback on), fp16, bf16 or none (DDP's fp32 allreduce)")
    p.add_argument("--steps", type=int, default=20,
                   help="training steps (default 20)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=64,
                   help="context length in bytes")
    p.add_argument("--layers", type=int, default=4,
                   help="transformer blocks")
    p.add_argument("--width", type=int, default=128,
                   help="embedding width")
    p.add_argument("--heads", type=int, default=4,
                   help="attention heads")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="AdamW learning rate")
    p.add_argument("--log-every", type=int, default=5,
                   help="print the loss every N steps")
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights and data order")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun's environment
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    # squinchcomm: torch's and the codec's threads, each rank its share of the node's cores
    # (oversubscribed, the hook was ~7x slower on 2 cores).
    squinchcomm.share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", world)))

    data = load_corpus(max_bytes=1 << 20)
    config = GPTConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                       block_size=args.seq)
    model = DDP(TinyGPT(config).to(device), device_ids=[device.index] if cuda else None)
    if args.hook != "none":  # squinchcomm: average gradient buckets compressed
        hook = {"squinch": ddp_hooks.squinch_hook, "fp16": ddp_hooks.fp16_hook,  # squinchcomm:
                "bf16": ddp_hooks.bf16_hook}[args.hook]  # squinchcomm:
        model.register_comm_hook(ddp_hooks.SquinchHookState(error_feedback=True), hook)  # squinchcomm:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))

    if rank == 0:
        print(f"# ranks {world}  hook {args.hook}  params {model.module.num_params():,}  "
              f"batch {args.batch}x{args.seq} per rank  device {device}  torch {torch.__version__}")
    tokens_per_step = world * args.batch * args.seq
    start = timed_from = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch_tensors(sample_windows(data.train, args.batch, args.seq, args.seed, step,
                                            rank), device)
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        if step == 1:
            timed_from = time.perf_counter()  # step 1 includes warm-up (bucket rebuild, JIT)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            elapsed = time.perf_counter() - timed_from
            rate = tokens_per_step * (step - 1) / elapsed if step > 1 else float("nan")
            print(f"step {step:4d}  loss {loss.item():.4f}  tokens/s {rate:,.0f}", flush=True)

    val = estimate_loss(model.module, data.val, args.batch, args.seq, args.seed + 1, device=device)
    # Every rank received the same averaged gradients, so the weights agree bit for bit.
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                     for p in model.module.parameters())).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if rank == 0:
        print(f"val loss {val:.4f}  wall {time.perf_counter() - start:.1f} s  "
              f"parameters identical on all ranks: {'yes' if len(set(digests)) == 1 else 'NO'}")
    # Nothing to tear down: squinchcomm's exit handler takes the gloo group down and
    # lets gloo's worker threads finish first (README, "At exit").


if __name__ == "__main__":
    main()
