"""Data-parallel training of a small GPT on the Python standard library's source
bytes, Horovod-style, with Squinch-compressed gradients.

    mpirun -n 4 python examples/gpt_train.py --steps 60
    torchrun --nproc-per-node 4 examples/gpt_train.py --steps 60

Written like any Horovod script: the only squinchcomm-specific lines are
tagged ``# squinchcomm:``; with ``import horovod.torch as hvd`` it would run
unchanged (apart from ``Compression.squinch``). Every rank draws its own batch
from (seed, step, rank); rank 0 prints training loss, held-out loss and
throughput.

The companion techniques of ``squinchcomm.nn`` switch on with flags:

    --zreg 1e-4                 Attention (and LM-head) Z-Reg; prints the mean
                                |Z| of attention rows at eval steps
                                (``--zreg 0`` prints it without Z-Reg)
    --zreg-reduction mean       the virtual loss c * mean(Z^2) over each call's
                                rows (PaLM's z-loss form, c independent of
                                batch, heads and sequence length) instead of
                                the default c * sum(Z^2)
    --mlp-act relu2             ReLU^2 FFN instead of GELU
    --clamp rms --clamp-bits 8  Dynamic Clamping: int8 QAT of the FFN hidden
                                activation (modes rms, std, weight, constant;
                                constant needs --clamp-limit)
    --packed-docs               each window is cut at the corpus's file
                                separators (a 0 byte ends every file) into
                                documents that do not attend to each other
                                (visibility-mask attention); val loss too
    --dump-teacher DIR          after training, rank 0 stores this model's
                                Gumbel top-k samples for the windows of a
                                student run with the same --steps, --batch,
                                --seq, --seed and number of ranks
    --distill-dir DIR           train on loss = (1 - w) CE + w distill, w =
                                --distill-weight (default 1), from such a dump

Distillation, e.g. (the teacher's shard for (step, rank) holds its samples of
exactly the windows that rank draws at that step; see
``squinchcomm.nn.distill.dump_teacher``):

    mpirun -n 2 python examples/gpt_train.py --layers 4 --steps 200 --dump-teacher /tmp/t
    mpirun -n 2 python examples/gpt_train.py --layers 1 --steps 200 --distill-dir /tmp/t
"""

import argparse
import os
import time

import torch

import squinchcomm  # squinchcomm:

import squinchcomm.torch as hvd  # squinchcomm: the Horovod-compatible API
from squinchcomm.models.corpus import load_corpus, sample_windows
from squinchcomm.models.tinygpt import (GPTConfig, TinyGPT, attention_z, batch_tensors,
                                        document_visibility, estimate_loss, separator_doc_ids)
from squinchcomm.nn import distill  # squinchcomm: Gumbel top-k distillation

COMPRESSIONS = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
                "bf16": hvd.Compression.bf16, "squinch": hvd.Compression.squinch}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60,
                   help="training steps (default 60)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=128,
                   help="context length in bytes")
    p.add_argument("--layers", type=int, default=2,
                   help="transformer blocks")
    p.add_argument("--width", type=int, default=128,
                   help="embedding width")
    p.add_argument("--heads", type=int, default=4,
                   help="attention heads")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="AdamW learning rate (before scaling by the world size)")
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights and data order")
    p.add_argument("--compression", choices=sorted(COMPRESSIONS), default="squinch",
                   help="gradient compression on the wire")
    p.add_argument("--eval-every", type=int, default=20,
                   help="held-out loss every N steps")
    p.add_argument("--transport", choices=["auto", "mpi", "torch"], default="auto",
                   help="auto: torch.distributed under torchrun, MPI otherwise")
    p.add_argument("--zreg", type=float, default=None, metavar="COEF",
                   help="Z-Reg coefficient of attention and LM-head logits")
    p.add_argument("--zreg-reduction", choices=["sum", "mean"], default="sum",
                   help="Z-Reg virtual loss: COEF * sum (default, the issue's definition; "
                   "a useful COEF depends on batch x heads x seq) or COEF * mean of Z^2 "
                   "over the rows of each attention / LM-head call")
    p.add_argument("--mlp-act", choices=["gelu", "relu2"], default="gelu",
                   help="FFN activation (relu2: squared ReLU)")
    p.add_argument("--clamp", choices=["rms", "std", "weight", "constant"], default=None,
                   metavar="MODE", help="Dynamic Clamping of the FFN activation: rms, std, "
                   "weight or constant")
    p.add_argument("--clamp-bits", type=int, default=8,
                   help="bits of the clamped activation's grid")
    p.add_argument("--clamp-limit", type=float, default=None, help="for --clamp constant")
    p.add_argument("--packed-docs", action="store_true",
                   help="mask attention at the corpus's file boundaries")
    p.add_argument("--distill-dir", default=None, metavar="DIR",
                   help="teacher logits written by --dump-teacher: distil from them (Gumbel top-k)")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of the distillation loss, in [0, 1]")
    p.add_argument("--dump-teacher", default=None, metavar="DIR",
                   help="write this run's top-k logits to DIR (to distil a student from later)")
    args = p.parse_args()
    if not 0.0 <= args.distill_weight <= 1.0:
        p.error(f"--distill-weight must be in [0, 1], got {args.distill_weight}")
    if args.clamp == "constant" and args.clamp_limit is None:
        p.error("--clamp constant needs --clamp-limit (the fixed clamp limit, e.g. 4.0)")
    return args


def train_batch(args, data, step, rank):
    """Inputs, targets and attention mask (None: causal) of ``rank``'s windows at ``step``."""
    x, y = batch_tensors(sample_windows(data, args.batch, args.seq, args.seed, step=step,
                                        rank=rank))
    visibility = None
    if args.packed_docs:  # squinchcomm: visibility mask of the packed files
        visibility = document_visibility(separator_doc_ids(x))
    return x, y, visibility


def main():
    args = parse_args()
    transport = args.transport
    if transport == "auto":
        transport = "torch" if "TORCHELASTIC_RUN_ID" in os.environ else "mpi"
    hvd.init(transport)  # squinchcomm: mpirun or torchrun
    torch.manual_seed(args.seed)
    squinchcomm.share_cores(hvd.local_size())  # squinchcomm: the ranks of a node share its cores
    corpus = load_corpus()
    config = GPTConfig(block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                       n_embd=args.width, init_seed=args.seed,
                       zreg_coef=args.zreg or 0.0,  # squinchcomm: Z-Reg
                       zreg_reduction=args.zreg_reduction,
                       mlp_act=args.mlp_act, clamp=args.clamp,  # squinchcomm: Dynamic Clamping
                       clamp_bits=args.clamp_bits, clamp_limit=args.clamp_limit)
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
    teacher = None
    if args.distill_dir:  # squinchcomm: this rank's teacher samples, one shard per step
        teacher = iter(distill.open_teacher(args.distill_dir, hvd.rank(), hvd.size(),
                                            steps=args.steps, batch=args.batch, seq=args.seq,
                                            seed=args.seed))
    squinchcomm.codec.warm_up()  # squinchcomm: wait for init's kernel compile (first run only)
    tokens = 0
    start = time.perf_counter()  # reset after step 1 (the optimizer's first buckets)
    for step in range(1, args.steps + 1):
        x, y, visibility = train_batch(args, corpus.train, step, hvd.rank())
        optimizer.zero_grad(set_to_none=True)
        logits, loss = model(x, y, visibility=visibility)
        objective = loss
        if teacher is not None:  # squinchcomm: teacher sample of exactly these windows
            sample = distill.TopKSample(*(z.view(*x.shape, *z.shape[1:])
                                          for z in next(teacher)))  # (B, T, k), (B, T)
            distill_loss = distill.distill_loss(logits, sample)
            objective = (1 - args.distill_weight) * loss + args.distill_weight * distill_loss
        objective.backward()
        optimizer.step()
        if step == 1 and args.steps > 1:  # tokens/s from step 2
            start = time.perf_counter()
        else:
            tokens += args.batch * args.seq * hvd.size()
        if step % args.eval_every == 0 or step == args.steps:
            train_loss = hvd.allreduce(loss.detach(), op=hvd.Average).item()
            val = estimate_loss(model, corpus.val, args.batch, args.seq, seed=args.seed + 1,
                                packed_docs=args.packed_docs)
            extra = ""
            if teacher is not None:
                distill_avg = hvd.allreduce(distill_loss.detach(), op=hvd.Average).item()
                extra += f"  distill {distill_avg:.4f}"
            if args.zreg is not None:  # squinchcomm: mean |Z| of attention rows, one val batch
                val_x, _ = batch_tensors(sample_windows(corpus.val, args.batch, args.seq,
                                                        args.seed + 1))
                val_vis = (document_visibility(separator_doc_ids(val_x))
                           if args.packed_docs else None)
                extra += f"  attn |Z| {attention_z(model, val_x, val_vis):.3f}"
            elapsed = time.perf_counter() - start
            if hvd.rank() == 0:
                print(f"step {step:4d}  train loss {train_loss:.4f}  val loss {val:.4f}{extra}  "
                      f"{tokens / elapsed:,.0f} tokens/s", flush=True)
    if args.dump_teacher and hvd.rank() == 0:  # squinchcomm: store soft targets for a student
        model.eval()

        def teacher_logits(step, rank):  # the windows `rank` of the student run draws at `step`
            x, _, visibility = train_batch(args, corpus.train, step, rank)
            return model(x, visibility=visibility)[0]

        paths = distill.dump_teacher(teacher_logits, args.dump_teacher, config.vocab_size,
                                     args.batch * args.seq, args.steps, world=hvd.size(),
                                     seed=args.seed, meta={"batch": args.batch, "seq": args.seq,
                                                           "packed_docs": args.packed_docs})
        print(f"teacher samples: {len(paths)} shards in {args.dump_teacher}", flush=True)


if __name__ == "__main__":
    main()
