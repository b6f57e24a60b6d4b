"""Gumbel top-k distillation: storage per position and student quality.

Run from the repository root::

    python -m squinchcomm.bench distill            # writes bench/results/distill.{md,json}
    python -m squinchcomm.bench distill --quick    # seconds-long smoke run
    python -m squinchcomm.bench distill --vocab word:8192 --batch 16
                                                   # distill_vocab8192.{md,json}

Two measurements of :mod:`squinchcomm.nn.distill`:

1. Storage: bytes per position of a Gumbel top-k sample
   (:func:`~squinchcomm.nn.distill.bytes_per_position`: k ids, k fp16
   log-probabilities, one fp32 threshold) vs dense fp16 logits
   (``2 * vocab`` bytes), for the issue's example (vocab 50k, k = 64), a
   128k vocabulary (int32 ids) and the vocabulary used here.
2. Student quality. Steps:

   a. Train a teacher :class:`~squinchcomm.models.tinygpt.TinyGPT` on the
      stdlib corpus (next-token cross-entropy). Tokens are bytes (vocabulary
      256, the default, k = 8), or with ``--vocab word:V`` words
      (:func:`word_tokens`: the V - 1 most frequent regex tokens of the
      training split plus ``<unk>``; default k = 64), where k is a small
      fraction of the vocabulary as in real LLM distillation.
   b. Dump the teacher on a fixed list of training batches: for every seed a
      Gumbel top-k sample through :class:`~squinchcomm.nn.distill.Writer`
      (real shard files in a temporary directory, read back with
      :class:`~squinchcomm.nn.distill.Reader`); the top-``kt`` ids and fp16
      log-probabilities with ``kt`` the largest count whose storage does not
      exceed the Gumbel sample's (a top-k entry costs what a Gumbel entry
      costs; Gumbel adds one fp32 threshold, so at vocab 256 ``kt = k + 1``
      gives exactly equal bytes).
   c. Train identical smaller students (same init per seed, same batches,
      same steps, same optimizer) with each soft target:

      - ``gumbel``: :func:`~squinchcomm.nn.distill.distill_loss` (unbiased
        importance weights);
      - ``gumbel-selfnorm``: the same with ``normalize=True``;
      - ``topk``: cross-entropy to the renormalized top-``kt`` teacher
        probabilities (plain truncation at equal storage);
      - ``hard``: next-token cross-entropy (no teacher; reference);
      - ``dense``: cross-entropy to the full fp16 teacher distribution
        (``2 * vocab`` bytes; the best a sparse target can approach;
        recomputed from the teacher at every step, rounded to fp16, instead
        of held in memory: at vocab 8192 it would take gigabytes).

   d. On held-out text (``corpus.val`` windows, other files than training)
      compute exactly, from the full teacher and student distributions, the
      mean KL(teacher || student) per token and the student's next-token
      cross-entropy (nats), averaged over the seeds.

Torch runs one thread by default: on a shared 2-core machine two OpenMP
threads spin against other processes and ran a student step ~20x slower.
Runtime and timings are for a shared 2-core CPU and noisy; the quality
numbers do not depend on timing (every run is seeded).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from squinchcomm.bench.common import versions, write_results
from squinchcomm.models import corpus as corpus_mod
from squinchcomm.models.tinygpt import GPTConfig, TinyGPT, batch_tensors
from squinchcomm.nn import distill

__all__ = ["main", "storage_rows", "topk_equal_storage", "word_tokens", "METHODS", "TOKEN_RE"]

DEFAULT_PROG = "python -m squinchcomm.bench distill"
METHODS = ("gumbel", "gumbel-selfnorm", "topk", "hard", "dense")
# (vocab, k) pairs of the storage table besides the run's vocabulary at --k.
STORAGE_EXAMPLES = ((50_000, 64), (128_256, 64))
# Word-level tokens: identifiers / words, numbers, one punctuation character, whitespace runs.
# Every character matches one alternative, so the tokens concatenate back to the text.
TOKEN_RE = re.compile(r"[^\W\d]\w*|\d+|\s+|[^\w\s]")


def topk_entry_bytes(vocab: int) -> int:
    """Bytes of one stored (id, fp16 log-prob) pair: a 1-entry Gumbel sample minus its fp32 tau."""
    return distill.bytes_per_position(1, vocab) - 4


def topk_equal_storage(k: int, vocab: int) -> int:
    """The largest plain top-k count whose storage fits in a Gumbel top-k sample's."""
    return min(vocab, distill.bytes_per_position(k, vocab) // topk_entry_bytes(vocab))


def storage_rows(pairs) -> list[dict]:
    """Bytes per position of Gumbel top-k, equal-storage top-k and dense fp16, per (vocab, k)."""
    rows = []
    for vocab, k in pairs:
        gumbel = distill.bytes_per_position(k, vocab)
        kt = topk_equal_storage(k, vocab)
        rows.append({"vocab": vocab, "k": k, "gumbel_bytes": gumbel,
                     "topk_k": kt, "topk_bytes": kt * topk_entry_bytes(vocab),
                     "dense_fp16_bytes": 2 * vocab, "ratio": 2 * vocab / gumbel})
    return rows


def word_tokens(corpus: corpus_mod.Corpus, vocab: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Tokenize the corpus into words (:data:`TOKEN_RE`) with a ``vocab``-entry vocabulary.

    The text is the corpus bytes decoded as UTF-8 (invalid bytes replaced);
    the file separator byte becomes a token of its own. Ids ``0 .. vocab - 2``
    are the ``vocab - 1`` most frequent tokens of the training split, most
    frequent first (ties by first occurrence); id ``vocab - 1`` is ``<unk>``
    for every other token, in either split.

    Returns:
        ``(train_ids, val_ids, info)``: 1-D uint16 (int32 above 65536) id
        arrays, and ``info`` with the token counts and the fraction of
        ``<unk>`` tokens per split.
    """
    if vocab < 2:
        raise ValueError(f"vocab must be >= 2 (at least one word and <unk>), got {vocab}.")
    splits = [TOKEN_RE.findall(a.tobytes().decode("utf-8", errors="replace"))
              for a in (corpus.train, corpus.val)]
    words = [w for w, _ in collections.Counter(splits[0]).most_common(vocab - 1)]
    index = {w: i for i, w in enumerate(words)}
    dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    ids = [np.fromiter((index.get(t, vocab - 1) for t in toks), dtype=dtype, count=len(toks))
           for toks in splits]
    info = {"vocab": vocab, "train_tokens": ids[0].size, "val_tokens": ids[1].size,
            "train_unk": float(np.mean(ids[0] == vocab - 1)),
            "val_unk": float(np.mean(ids[1] == vocab - 1))}
    return ids[0], ids[1], info


def _config(args, layers: int, heads: int, width: int, init_seed: int = 0) -> GPTConfig:
    """A teacher or student shape at the run's vocabulary and context length."""
    return GPTConfig(vocab_size=args.vocab_size, block_size=args.seq, n_layer=layers,
                     n_head=heads, n_embd=width, init_seed=init_seed)


def _train_teacher(args, data) -> tuple[TinyGPT, float]:
    """Step a: next-token training of the teacher; return it and its seconds."""
    t0 = time.perf_counter()
    model = TinyGPT(_config(args, args.teacher_layers, args.teacher_heads, args.teacher_width,
                            args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(args.teacher_steps):
        x, y = batch_tensors(corpus_mod.sample_windows(data, args.batch, args.seq, args.seed, step))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model, time.perf_counter() - t0


def _distill_windows(args, data, step: int) -> np.ndarray:
    """The fixed training batch of distillation step ``step`` (same for every student)."""
    return corpus_mod.sample_windows(data, args.batch, args.seq, args.seed + 1000, step)


@torch.no_grad()
def _dump_teacher(args, teacher, data, directory: str, kt: int) -> dict:
    """Step b: write Gumbel shards per seed, keep top-kt targets in memory."""
    vocab = teacher.config.vocab_size
    writers = [distill.Writer(os.path.join(directory, f"seed{s}"), vocab, args.k,
                              positions_per_shard=args.batch * args.seq * 16)
               for s in range(args.seeds)]
    gens = [torch.Generator().manual_seed(args.seed + 7919 * (s + 1)) for s in range(args.seeds)]
    top_ids, top_logp = [], []
    for step in range(args.student_steps):
        x, _ = batch_tensors(_distill_windows(args, data, step))
        logp = torch.log_softmax(teacher(x)[0].float(), dim=-1)  # [B, T, V]
        for writer, gen in zip(writers, gens):
            writer.write(distill.sample(logp, args.k, generator=gen))
        values, idx = torch.topk(logp, kt, dim=-1)  # [B, T, kt]
        top_ids.append(idx.numpy().astype(np.uint16 if vocab <= 1 << 16 else np.int32))
        top_logp.append(values.half())
    paths = [w.close() for w in writers]
    file_bytes = sum(os.path.getsize(p) for ps in paths for p in ps) / args.seeds
    gumbel = []
    for s in range(args.seeds):
        reader = distill.Reader(os.path.join(directory, f"seed{s}"), k=args.k, vocab=vocab)
        parts = list(reader)
        shape = (args.student_steps, args.batch, args.seq)
        gumbel.append(distill.TopKSample(
            torch.cat([p.ids for p in parts]).view(*shape, args.k),
            torch.cat([p.logp16 for p in parts]).view(*shape, args.k),
            torch.cat([p.tau for p in parts]).view(shape)))
    positions = args.student_steps * args.batch * args.seq
    return {"gumbel": gumbel, "top_ids": top_ids, "top_logp": top_logp, "teacher": teacher,
            "file_bytes_per_position": file_bytes / positions, "positions": positions,
            "shards_per_seed": len(paths[0])}


def _soft_target_loss(logits: torch.Tensor, logp16: torch.Tensor,
                      ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy from ``softmax(logp16)`` (over ``ids``, or all entries) to the student."""
    target = torch.softmax(logp16.float(), dim=-1)  # renormalized over the stored entries
    logq = torch.log_softmax(logits.float(), dim=-1)
    if ids is not None:
        logq = torch.gather(logq, -1, ids)
    return -(target * logq).sum(-1).mean()


def _student_loss(method: str, x, logits, y, step: int, seed: int, dump: dict) -> torch.Tensor:
    if method == "hard":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    if method in ("gumbel", "gumbel-selfnorm"):
        g = dump["gumbel"][seed]
        s = distill.TopKSample(g.ids[step], g.logp16[step], g.tau[step])
        return distill.distill_loss(logits, s, normalize=method == "gumbel-selfnorm")
    if method == "topk":
        ids = torch.from_numpy(dump["top_ids"][step].astype(np.int64))
        return _soft_target_loss(logits, dump["top_logp"][step], ids)
    with torch.no_grad():  # dense: the teacher's fp16 log-probabilities of this batch
        dense = torch.log_softmax(dump["teacher"](x)[0].float(), dim=-1).half()
    return _soft_target_loss(logits, dense)


def _train_student(args, method: str, seed: int, data, dump) -> TinyGPT:
    """Step c: one student; its init and batches depend only on ``seed``, not ``method``."""
    model = TinyGPT(_config(args, args.student_layers, args.student_heads, args.student_width,
                            args.seed + 100 + seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(args.student_steps):
        x, y = batch_tensors(_distill_windows(args, data, step))
        logits, _ = model(x)
        loss = _student_loss(method, x, logits, y, step, seed, dump)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def _evaluate(model: TinyGPT, eval_batches, teacher_logp) -> tuple[float, float]:
    """Step d: mean KL(teacher || model) and model cross-entropy per held-out token (nats)."""
    kl, ce = [], []
    for (x, y), lt in zip(eval_batches, teacher_logp):
        ls = torch.log_softmax(model(x)[0].float(), dim=-1)
        kl.append((lt.exp() * (lt - ls)).sum(-1).mean().item())
        ce.append(F.nll_loss(ls.reshape(-1, ls.shape[-1]), y.reshape(-1)).item())
    return float(np.mean(kl)), float(np.mean(ce))


def _parse(argv):
    p = argparse.ArgumentParser(prog=DEFAULT_PROG, description=__doc__.split("\n")[0])
    p.add_argument("--vocab", default="byte",
                   help="tokens: byte (vocabulary 256, default) or word:V (V-entry word "
                        "vocabulary; results go to distill_vocabV.{json,md})")
    p.add_argument("--k", type=int, default=None,
                   help="Gumbel top-k entries per position (default 8 for bytes, 64 for words)")
    p.add_argument("--seeds", type=int, default=2, help="student seeds averaged (default 2)")
    p.add_argument("--seed", type=int, default=0, help="base seed of data, inits and noise")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seq", type=int, default=64, help="context length (default 64)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-heads", type=int, default=4)
    p.add_argument("--teacher-width", type=int, default=128)
    p.add_argument("--student-steps", type=int, default=200)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-heads", type=int, default=2)
    p.add_argument("--student-width", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 64 windows")
    p.add_argument("--corpus-bytes", type=int, default=4 << 20)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy 2-core machine, 2 ran ~20x slower)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds)")
    p.add_argument("--out", default="bench/results", help="directory for distill.{json,md}")
    args = p.parse_args(argv)
    if args.vocab == "byte":
        args.vocab_size, args.name = corpus_mod.VOCAB_SIZE, "distill"
    else:
        kind, _, size = args.vocab.partition(":")
        if kind != "word" or not size.isdigit() or int(size) < 2:
            p.error(f"--vocab must be byte or word:V with an integer V >= 2 (e.g. word:8192), "
                    f"got {args.vocab!r}")
        args.vocab_size, args.name = int(size), f"distill_vocab{size}"
    if args.k is None:
        args.k = 8 if args.vocab == "byte" else 64
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(args.method_list) - set(METHODS))
    if bad or not args.method_list:
        p.error(f"--methods must be a non-empty subset of {','.join(METHODS)}, "
                f"got {args.methods!r}")
    if args.quick:
        args.seq, args.batch, args.teacher_steps, args.student_steps = 16, 4, 20, 10
        args.teacher_layers, args.teacher_width, args.teacher_heads = 1, 32, 2
        args.student_layers, args.student_width, args.student_heads = 1, 16, 2
        args.eval_batches, args.corpus_bytes, args.seeds = 1, 1 << 18, 1
    for name in ("k", "seeds", "seq", "batch", "teacher_steps", "student_steps",
                 "eval_batches", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.k >= args.vocab_size:
        p.error(f"--k must be < the vocabulary ({args.vocab_size}), got {args.k}")
    return args


PARAMETERS = ("vocab", "k", "seeds", "seed", "methods", "seq", "batch", "lr", "teacher_steps",
              "teacher_layers", "teacher_heads", "teacher_width", "student_steps",
              "student_layers", "student_heads", "student_width", "eval_batches",
              "corpus_bytes", "threads", "quick")


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> dict:
    """Run both measurements; write distill.{json,md} (distill_vocabV with --vocab word:V).

    Returns:
        The JSON document that was written.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    vocab = args.vocab_size
    kt = topk_equal_storage(args.k, vocab)
    storage = storage_rows(list(STORAGE_EXAMPLES) + [(vocab, args.k)])
    corpus = corpus_mod.load_corpus(max_bytes=args.corpus_bytes)
    train, val, tokens = corpus.train, corpus.val, None
    if args.vocab != "byte":
        train, val, tokens = word_tokens(corpus, vocab)
        _progress(f"tokenized: {tokens}")
    # Steps a and b: teacher, then its dumped targets.
    teacher, teacher_seconds = _train_teacher(args, train)
    _progress(f"teacher trained ({teacher_seconds:.1f} s)")
    eval_batches = [batch_tensors(corpus_mod.sample_windows(val, 64, args.seq,
                                                            args.seed + 2000, i))
                    for i in range(args.eval_batches)]
    with torch.no_grad():
        teacher_logp = [torch.log_softmax(teacher(x)[0].float(), dim=-1) for x, _ in eval_batches]
    _, teacher_ce = _evaluate(teacher, eval_batches, teacher_logp)
    with tempfile.TemporaryDirectory(prefix="sq-distill-") as tmp:
        t_dump = time.perf_counter()
        dump = _dump_teacher(args, teacher, train, tmp, kt)
        dump_seconds = time.perf_counter() - t_dump
    _progress(f"teacher dumped ({dump_seconds:.1f} s)")
    # Steps c and d: students per method and seed, evaluated on held-out text.
    gumbel_bytes = distill.bytes_per_position(args.k, vocab)
    stored = {"gumbel": (args.k, gumbel_bytes), "gumbel-selfnorm": (args.k, gumbel_bytes),
              "topk": (kt, kt * topk_entry_bytes(vocab)), "hard": (1, 0),
              "dense": (vocab, 2 * vocab)}  # method -> (entries, bytes per position)
    rows = []
    for method in args.method_list:
        t_m = time.perf_counter()
        kls, ces = [], []
        for seed in range(args.seeds):
            kl, ce = _evaluate(_train_student(args, method, seed, train, dump),
                               eval_batches, teacher_logp)
            kls.append(kl)
            ces.append(ce)
        rows.append({"method": method, "entries": stored[method][0],
                     "bytes_per_position": stored[method][1],
                     "kl": kls, "ce": ces, "kl_mean": float(np.mean(kls)),
                     "ce_mean": float(np.mean(ces)),
                     "seconds": round(time.perf_counter() - t_m, 2)})
        _progress(f"students {method}: KL {rows[-1]['kl_mean']:.4f} ({rows[-1]['seconds']} s)")
    doc = {
        "benchmark": "distill",
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), **versions()},
        "parameters": {name: getattr(args, name) for name in PARAMETERS},
        "corpus": corpus.describe(),
        "tokens": tokens,
        "storage": storage,
        "gumbel_file_bytes_per_position": dump["file_bytes_per_position"],
        "distill_positions": dump["positions"],
        "shards_per_seed": dump["shards_per_seed"],
        "topk_k": kt,
        "teacher": {"params": teacher.num_params(), "val_ce": teacher_ce,
                    "seconds": round(teacher_seconds, 2)},
        "student_params": TinyGPT(_config(args, args.student_layers, args.student_heads,
                                          args.student_width)).num_params(),
        "dump_seconds": round(dump_seconds, 2),
        "students": rows,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_results(args.out, args.name, doc, _markdown(doc))
    return doc


def _progress(message: str) -> None:
    print(f"# distill: {message}", file=sys.stderr, flush=True)


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _markdown(doc: dict) -> str:
    m, p, t = doc["machine"], doc["parameters"], doc["teacher"]
    unit = "byte" if p["vocab"] == "byte" else "token"
    vers = " ".join(f"{k} {v}" for k, v in m.items() if k not in ("platform", "cpu_count", "cpu"))
    title = "" if p["vocab"] == "byte" else f", {doc['tokens']['vocab']}-word vocabulary"
    out = [f"# Gumbel top-k distillation: storage and student quality{title}", "",
           f"Command: `{doc['command']}`  ",
           f"Machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs, torch threads "
           f"{p['threads']} (shared machine: the seconds below are noisy; the quality numbers "
           "are seeded and do not depend on timing)  ",
           f"Versions: {vers}  ",
           "Parameters: " + ", ".join(f"{k}={v}" for k, v in p.items()), "",
           "## Bytes per position", "",
           "Gumbel top-k stores k ids (uint16 if vocab <= 65536, else int32), k fp16 "
           "log-probabilities and one fp32 threshold; dense stores vocab fp16 logits; "
           "equal-storage top-k keeps as many (id, fp16) pairs as fit in the Gumbel bytes.", ""]
    out += _table(["vocab", "k", "Gumbel top-k B", "equal-storage top-k", "dense fp16 B",
                   "dense / Gumbel"],
                  [[f"{r['vocab']:,}", str(r["k"]), str(r["gumbel_bytes"]),
                    f"{r['topk_k']} ({r['topk_bytes']} B)", f"{r['dense_fp16_bytes']:,}",
                    f"{r['ratio']:.1f}x"] for r in doc["storage"]], "rrrrrr")
    out += ["", f"Measured on disk for the run below: {doc['gumbel_file_bytes_per_position']:.2f} "
            f"B per position over {doc['distill_positions']:,} positions in "
            f"{doc['shards_per_seed']} shard(s) per seed (headers included).", "",
            "## Student quality on held-out text", "",
            f"- {doc['corpus']}"]
    if doc["tokens"]:
        tk = doc["tokens"]
        out += [f"- word tokens (identifiers/words, numbers, single punctuation, whitespace "
                f"runs): the {tk['vocab'] - 1} most frequent in train + <unk>; train "
                f"{tk['train_tokens']:,} tokens ({tk['train_unk']:.1%} <unk>), val "
                f"{tk['val_tokens']:,} tokens ({tk['val_unk']:.1%} <unk>)"]
    out += [
            f"- teacher: TinyGPT {p['teacher_layers']} layers, width {p['teacher_width']}, "
            f"{t['params']:,} parameters, {p['teacher_steps']} steps of batch {p['batch']} x "
            f"{p['seq']} {unit}s, held-out CE {t['val_ce']:.4f} nats/{unit} ({t['seconds']} s)",
            f"- students: TinyGPT {p['student_layers']} layers, width {p['student_width']}, "
            f"{doc['student_params']:,} parameters, {p['student_steps']} steps on the same "
            f"fixed batches and the same init per seed, AdamW lr {p['lr']}; "
            f"{p['seeds']} seed(s) (student init and Gumbel draw)",
            f"- held-out: {p['eval_batches']} x 64 windows of {p['seq']} {unit}s from "
            "corpus.val; KL(teacher || student) and CE exact from the full distributions, "
            f"nats per {unit}; mean over seeds (per-seed values in the .json file)", ""]
    best = min(r["kl_mean"] for r in doc["students"] if r["method"] != "dense")
    out += _table(["method", "entries", "B/position", "KL(teacher ‖ student)", "held-out CE",
                   "seconds"],
                  [[r["method"] + (" (best sparse)" if r["kl_mean"] == best else ""),
                    str(r["entries"]), str(r["bytes_per_position"]),
                    f"{r['kl_mean']:.4f}" + (f" ± {np.std(r['kl']) :.4f}" if len(r["kl"]) > 1
                                             else ""),
                    f"{r['ce_mean']:.4f}", str(r["seconds"])] for r in doc["students"]],
                  "lrrrrr")
    out += ["", "- gumbel: distill_loss, unbiased weights p/q given the (k+1)-th key; "
            "gumbel-selfnorm: the same weights divided by their sum per position; "
            "topk: CE to the renormalized top-k teacher probabilities; "
            f"hard: next-{unit} CE "
            "(the data itself, no teacher bytes); dense: CE to the full fp16 teacher distribution.",
            "- ± is the standard deviation over seeds.",
            f"- total runtime {doc['seconds']} s (teacher dump {doc['dump_seconds']} s).", ""]
    return "\n".join(out)
