"""Data-parallel training of a small GPT on the Python standard library's source
bytes, Horovod-style, with Squinch-compressed gradients.

    mpirun -n 4 python examples/gpt_train.py --steps 60
    torchrun --nproc-per-node 4 examples/gpt_train.py --steps 60

Written like any Horovod script: the only squinchcomm-specific lines are
tagged ``# squinchcomm:``; with ``import horovod.torch as hvd`` it would run
unchanged (apart from ``Compression.squinch``). Every rank draws its own batch
from (seed, step, rank); rank 0 prints training loss, held-out loss and
throughput.
"""

import argparse
import os
import time

import torch

import squinchcomm.torch as hvd  # squinchcomm: the Horovod-compatible API
from squinchcomm.bench.corpus import load_corpus, sample_windows
from squinchcomm.bench.tinygpt import GPTConfig, TinyGPT, batch_tensors, estimate_loss

COMPRESSIONS = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
                "bf16": hvd.Compression.bf16, "squinch": hvd.Compression.squinch}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", choices=sorted(COMPRESSIONS), default="squinch")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--transport", choices=["auto", "mpi", "torch"], default="auto",
                   help="auto: torch.distributed under torchrun, MPI otherwise")
    return p.parse_args()


def main():
    args = parse_args()
    transport = args.transport
    if transport == "auto":
        transport = "torch" if "TORCHELASTIC_RUN_ID" in os.environ else "mpi"
    hvd.init(transport)  # squinchcomm: mpirun or torchrun
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() // hvd.local_size()))
    corpus = load_corpus()
    config = GPTConfig(block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                       n_embd=args.width, init_seed=args.seed)
    model = TinyGPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(  # squinchcomm: compressed gradient allreduce
        optimizer, named_parameters=model.named_parameters(),
        compression=COMPRESSIONS[args.compression], op=hvd.Average)
    if hvd.rank() == 0:
        print(f"ranks {hvd.size()}  params {model.num_params():,}  compression "
              f"{args.compression}  batch {args.batch}x{args.seq} per rank  {corpus.describe()}",
              flush=True)
    tokens = 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch_tensors(sample_windows(corpus.train, args.batch, args.seq, args.seed,
                                            step=step, rank=hvd.rank()))
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        tokens += args.batch * args.seq * hvd.size()
        if step % args.eval_every == 0 or step == args.steps:
            train_loss = hvd.allreduce(loss.detach(), op=hvd.Average).item()
            val = estimate_loss(model, corpus.val, args.batch, args.seq, seed=args.seed + 1)
            elapsed = time.perf_counter() - start
            if hvd.rank() == 0:
                print(f"step {step:4d}  train loss {train_loss:.4f}  val loss {val:.4f}  "
                      f"{tokens / elapsed:,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
