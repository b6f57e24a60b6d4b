"""Synthetic training throughput per gradient compression, in the style of
Horovod's pytorch_synthetic_benchmark.py (random tokens, a small GPT).

    mpirun -n 4 python examples/synthetic_benchmark.py --compressions none,fp16,squinch
    torchrun --nproc-per-node 4 examples/synthetic_benchmark.py

Every compression runs in the same job on the same model, one after the
other; rank 0 prints tokens/s per rank (mean +- 1.96 std over iterations)
and the total. On one machine the exchange is shared memory, so compression
costs time here; on a bandwidth-limited network it is what buys time back.
"""

import argparse
import os
import timeit

import numpy as np
import torch

import squinchcomm  # squinchcomm:

import squinchcomm.torch as hvd  # squinchcomm: the Horovod-compatible API
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT

COMPRESSIONS = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
                "bf16": hvd.Compression.bf16, "squinch": hvd.Compression.squinch}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressions", default="none,fp16,bf16,squinch",
                   help="comma list of none, fp16, bf16, squinch (run one after another)")
    p.add_argument("--batch", type=int, default=8,
                   help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=128,
                   help="context length (random tokens)")
    p.add_argument("--layers", type=int, default=2,
                   help="transformer blocks")
    p.add_argument("--width", type=int, default=128,
                   help="embedding width")
    p.add_argument("--heads", type=int, default=4,
                   help="attention heads")
    p.add_argument("--num-warmup-batches", type=int, default=2,
                   help="untimed batches first (compiles the codec)")
    p.add_argument("--num-batches-per-iter", type=int, default=3,
                   help="batches per timed iteration")
    p.add_argument("--num-iters", type=int, default=4,
                   help="timed iterations")
    p.add_argument("--fusion-threshold-mb", type=float, default=64,
                   help="DistributedOptimizer bucket size in MB (Horovod's fusion buffer)")
    args = p.parse_args()
    names = [c for c in args.compressions.split(",") if c]
    bad = set(names) - set(COMPRESSIONS)
    if bad:
        p.error(f"unknown compressions {sorted(bad)}; choose from {', '.join(COMPRESSIONS)}")

    hvd.init("torch" if "TORCHELASTIC_RUN_ID" in os.environ else "mpi")  # squinchcomm
    squinchcomm.share_cores(hvd.local_size())  # squinchcomm: the ranks of a node share its cores
    model = TinyGPT(GPTConfig(block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                              n_embd=args.width))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    gen = torch.Generator().manual_seed(hvd.rank())
    data = torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]
    if hvd.rank() == 0:
        print(f"ranks {hvd.size()}  params {model.num_params():,}  batch {args.batch}x{args.seq} "
              f"per rank  iterations {args.num_iters} x {args.num_batches_per_iter} batches",
              flush=True)
    for name in names:
        optimizer = hvd.DistributedOptimizer(  # squinchcomm: compressed gradients
            torch.optim.SGD(model.parameters(), lr=1e-3),
            named_parameters=model.named_parameters(), compression=COMPRESSIONS[name],
            fusion_threshold=int(args.fusion_threshold_mb * 2 ** 20))

        def benchmark_step():
            optimizer.zero_grad()
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()

        timeit.timeit(benchmark_step, number=args.num_warmup_batches)
        squinchcomm.codec.warm_up()  # squinchcomm: no timed batch shares the cores with a compile
        rates = []
        for _ in range(args.num_iters):
            t = timeit.timeit(benchmark_step, number=args.num_batches_per_iter)
            rates.append(args.batch * args.seq * args.num_batches_per_iter / t)
        optimizer.remove_hooks()
        if hvd.rank() == 0:
            mean, conf = np.mean(rates), 1.96 * np.std(rates)
            print(f"{name:>8}: {mean:9,.0f} +- {conf:7,.0f} tokens/s per rank, "
                  f"total {mean * hvd.size():10,.0f} tokens/s on {hvd.size()} ranks", flush=True)


if __name__ == "__main__":
    main()
