"""Gumbel top-k distillation: sparse, unbiased soft targets stored offline.

Storing a teacher's dense fp16 logits costs ``2 * vocab`` bytes per position
(100 kB at vocab 50k). Instead, for each position draw ``k`` vocabulary
entries without replacement by Gumbel top-k on the teacher's log-probabilities
and keep, per position, the k token ids, their k log-probabilities (fp16) and
one threshold ``tau`` (fp32): 260 bytes at vocab 50k, k = 64.

Unbiased weights (priority sampling; Kool et al. 2019, "Stochastic Beams and
Where to Find Them"): with keys ``g_v = l_v + Gumbel_v`` the sample ``S`` is
the k largest keys and ``tau`` the (k+1)-th largest. Given ``tau``, item ``i``
is in ``S`` with probability ``q_i = P(l_i + G > tau) = 1 - exp(-exp(l_i - tau))``,
so with ``w_i = p_i / q_i``::

    E[ sum_{i in S} w_i f(i) ] = sum_v p_v f(v)    for every f.

The stored soft target therefore equals the teacher distribution in
expectation, and :func:`distill_loss` is an unbiased estimate of the
cross-entropy from the teacher to the student. With ``k == vocab`` every entry
is kept, ``tau = -inf`` and ``w = p`` exactly.

The teacher distribution is the one whose log-probabilities are stored: the
keys are built from the fp16-rounded ``l_v``, so the estimate is exactly
unbiased for ``p_v = exp(fp16(l_v))`` (which differs from the fp32 teacher by
the fp16 rounding of the log-probabilities, a relative error of about
``|l_v| * 2**-11``).

Shard file layout (little-endian)::

    magic   8 bytes   b"SQDISTK\\n"
    hlen    uint32    length of the JSON header
    header  hlen bytes of UTF-8 JSON: version, vocab, k, positions,
            temperature, crc32 (of the payload)
    payload ids [positions, k] (uint16 if vocab <= 65536 else int32),
            logp [positions, k] float16, tau [positions] float32

Example::

    s = sample(teacher_logits.log_softmax(-1), k=64, temperature=1.0)
    with Writer("distill/", vocab=V, k=64) as w:
        w.write(s)
    for s in Reader("distill/", rank=rank, world=world):
        loss = distill_loss(student(x), s)

For a data-parallel student run, :func:`dump_teacher` writes one shard per
(step, rank) of the run and the run's parameters beside them
(:data:`TEACHER_META`); :func:`open_teacher` checks those parameters and
returns the rank's :class:`Reader`, whose shards come in step order.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "TopKSample",
    "sample",
    "weights",
    "distill_loss",
    "bytes_per_position",
    "write_shard",
    "read_shard",
    "Writer",
    "Reader",
    "TEACHER_META",
    "dump_teacher",
    "open_teacher",
]

MAGIC = b"SQDISTK\n"
VERSION = 1
SHARD_SUFFIX = ".sqdk"
_HLEN = struct.Struct("<I")


class TopKSample(NamedTuple):
    """Per-position Gumbel top-k sample of a teacher distribution.

    ids: ``[..., k]`` int32 token ids (distinct within a position).
    logp16: ``[..., k]`` float16 teacher log-probabilities of ``ids``.
    tau: ``[...]`` float32 (k+1)-th largest Gumbel key (``-inf`` if k == vocab).
    """

    ids: torch.Tensor
    logp16: torch.Tensor
    tau: torch.Tensor


def _id_dtype(vocab: int) -> np.dtype:
    """Smallest stored id type for ``vocab`` entries."""
    return np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<i4")


def bytes_per_position(k: int, vocab: int) -> int:
    """Return the stored bytes per position: k ids, k fp16 log-probs, one fp32 tau.

    Compare with ``2 * vocab`` for dense fp16 logits. Shard headers (under
    100 bytes per file) are not counted.
    """
    _check_k(k, vocab)
    return k * _id_dtype(vocab).itemsize + 2 * k + 4


def _check_k(k: int, vocab: int) -> None:
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"vocab must be a positive int, got {vocab!r}")
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, vocab={vocab}], got {k!r}")


def sample(
    logp: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> TopKSample:
    """Draw k entries per position without replacement by Gumbel top-k.

    Args:
        logp: ``[..., vocab]`` teacher log-probabilities (or logits: they are
            renormalized). Entries of ``-inf`` are never drawn unless fewer
            than k entries are finite (they then get weight 0).
        k: entries kept per position, ``1 <= k <= vocab``.
        temperature: the target is ``softmax(logp / temperature)``.
        generator: torch generator for the Gumbel noise (reproducibility).

    Returns:
        :class:`TopKSample` with ``ids``/``logp16`` of shape ``[..., k]`` and
        ``tau`` of shape ``[...]``, on ``logp``'s device.
    """
    if not torch.is_tensor(logp) or not logp.is_floating_point() or logp.dim() < 1:
        raise ValueError("logp must be a floating-point tensor of shape [..., vocab]")
    vocab = logp.shape[-1]
    _check_k(k, vocab)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    # Step 1: the target distribution at this temperature, rounded to the
    # stored fp16 so that the inclusion probabilities use the stored values.
    l16 = torch.log_softmax(logp.float() / temperature, dim=-1).half()  # [..., V]
    if torch.isnan(l16).any():
        raise ValueError("logp has NaN entries or a row with no finite entry")
    # Step 2: Gumbel keys g = l + G, G = -log(-log U).
    u = torch.rand(logp.shape, generator=generator, device=logp.device)
    u = u.clamp_min(torch.finfo(torch.float32).tiny)
    keys = l16.float() - torch.log(-torch.log(u))  # [..., V]
    # Step 3: the k largest keys are the sample; the (k+1)-th is tau.
    top = min(k + 1, vocab)
    values, idx = torch.topk(keys, top, dim=-1)  # [..., k+1]
    ids = idx[..., :k]
    if k < vocab:
        tau = values[..., k].contiguous()
    else:
        tau = torch.full(keys.shape[:-1], -math.inf, device=logp.device)
    return TopKSample(ids.to(torch.int32), torch.gather(l16, -1, ids), tau)


def weights(s: TopKSample) -> torch.Tensor:
    """Return the float32 importance weights ``w_i = p_i / q_i`` of a sample.

    ``q_i = 1 - exp(-exp(l_i - tau))`` is the probability that entry i is
    drawn given the threshold; ``sum_i w_i f(ids_i)`` is unbiased for
    ``sum_v p_v f(v)``. Entries with ``p_i = 0`` get weight 0.
    """
    logp = s.logp16.float()  # [..., k]
    tau = s.tau.float().unsqueeze(-1)  # [..., 1]
    q = -torch.expm1(-torch.exp(logp - tau))
    w = torch.exp(logp) / q
    return torch.where(logp == -math.inf, torch.zeros_like(w), w)


def distill_loss(
    student_logits: torch.Tensor,
    s: TopKSample,
    reduction: str = "mean",
    normalize: bool = False,
) -> torch.Tensor:
    """Return ``-sum_i w_i log softmax(student_logits)[ids_i]`` per position, reduced.

    Unbiased for the cross-entropy from the teacher to the student. With
    ``normalize=True`` the weights are divided by their per-position sum
    (self-normalized: lower variance, slightly biased, sums to 1).

    Args:
        student_logits: ``[..., vocab]``, leading shape equal to ``s.tau``'s.
        s: the stored teacher sample.
        reduction: ``"mean"`` or ``"sum"`` over positions, or ``"none"``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if student_logits.shape[:-1] != s.tau.shape or s.ids.shape != s.logp16.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} must be [..., vocab] with "
            f"leading shape equal to tau's {tuple(s.tau.shape)}"
        )
    w = weights(s).to(student_logits.device)  # [..., k]
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    logq = torch.log_softmax(student_logits.float(), dim=-1)  # [..., V]
    picked = torch.gather(logq, -1, s.ids.to(student_logits.device).long())  # [..., k]
    loss = -(w * picked).sum(-1)  # [...]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _as_numpy(s: TopKSample, vocab: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten a sample to ``[positions, k]`` little-endian arrays, validated."""
    if s.ids.dim() < 1 or s.ids.shape[-1] != k or s.logp16.shape != s.ids.shape or s.tau.shape != s.ids.shape[:-1]:
        raise ValueError(
            f"sample shapes ids {tuple(s.ids.shape)}, logp16 {tuple(s.logp16.shape)}, "
            f"tau {tuple(s.tau.shape)} do not match [..., k={k}], [..., k], [...]"
        )
    ids = s.ids.detach().cpu().reshape(-1, k)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"sample ids must lie in [0, vocab={vocab})")
    return (
        ids.numpy().astype(_id_dtype(vocab)),
        s.logp16.detach().cpu().to(torch.float16).reshape(-1, k).numpy().astype("<f2"),
        s.tau.detach().cpu().to(torch.float32).reshape(-1).numpy().astype("<f4"),
    )


def write_shard(path: str, s: TopKSample, vocab: int, temperature: float = 1.0) -> None:
    """Write one sample (all its positions) as a shard file at ``path``."""
    k = int(s.ids.shape[-1])
    _check_k(k, vocab)
    ids, logp, tau = _as_numpy(s, vocab, k)
    payload = ids.tobytes() + logp.tobytes() + tau.tobytes()
    header = json.dumps(
        {
            "version": VERSION,
            "vocab": vocab,
            "k": k,
            "positions": len(tau),
            "temperature": float(temperature),
            "crc32": zlib.crc32(payload),
        }
    ).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + _HLEN.pack(len(header)) + header + payload)


def _read_header(path: str, f) -> tuple[dict, int]:
    """Parse and check a shard's header; return it and the payload size."""
    start = f.read(len(MAGIC) + _HLEN.size)
    if len(start) < len(MAGIC) + _HLEN.size or start[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a distillation shard (bad magic, expected {MAGIC!r})")
    (hlen,) = _HLEN.unpack(start[len(MAGIC) :])
    raw = f.read(hlen)
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: corrupted or truncated header") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        got = header.get("version") if isinstance(header, dict) else None
        raise ValueError(f"{path}: unsupported version {got!r} (this reader reads version {VERSION})")
    for key in ("vocab", "k", "positions", "crc32"):
        if not isinstance(header.get(key), int) or header[key] < 0:
            raise ValueError(f"{path}: header field {key!r} missing or invalid")
    try:
        _check_k(header["k"], header["vocab"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    n, k = header["positions"], header["k"]
    payload = n * k * (_id_dtype(header["vocab"]).itemsize + 2) + 4 * n
    size = os.fstat(f.fileno()).st_size
    expected = len(start) + hlen + payload
    if size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(f"{path}: file {problem}: {size} bytes, header says {expected}")
    return header, payload


def read_shard(path: str) -> tuple[dict, TopKSample]:
    """Read a shard file; return its header and its ``[positions, k]`` sample.

    Raises ValueError naming the file for a bad magic, an unsupported version,
    a bad header, a wrong size (truncated) or a checksum mismatch (corrupted).
    """
    with open(path, "rb") as f:
        header, size = _read_header(path, f)
        payload = f.read(size)
    if zlib.crc32(payload) != header["crc32"]:
        raise ValueError(f"{path}: payload corrupted (CRC32 mismatch)")
    n, k, id_dtype = header["positions"], header["k"], _id_dtype(header["vocab"])
    n_ids = n * k * id_dtype.itemsize
    ids = np.frombuffer(payload, id_dtype, n * k).astype(np.int32).reshape(n, k)
    logp = np.frombuffer(payload, "<f2", n * k, offset=n_ids).reshape(n, k)
    tau = np.frombuffer(payload, "<f4", n, offset=n_ids + 2 * n * k)
    sample_ = TopKSample(
        torch.from_numpy(ids),
        torch.from_numpy(logp.astype(np.float16)),
        torch.from_numpy(tau.astype(np.float32)),
    )
    return header, sample_


def _shard_path(directory: str, prefix: str, index: int) -> str:
    return os.path.join(directory, f"{prefix}-{index:05d}{SHARD_SUFFIX}")


def _find_shards(directory: str, prefix: str) -> dict[int, str]:
    """Shard paths of ``prefix`` in ``directory`` by shard index."""
    pattern = re.compile(re.escape(prefix) + r"-(\d{5,})" + re.escape(SHARD_SUFFIX) + "$")
    found = {}
    for name in os.listdir(directory):
        m = pattern.match(name)
        if m:
            found[int(m.group(1))] = os.path.join(directory, name)
    return found


class Writer:
    """Append samples and write them as shards of ``positions_per_shard`` positions.

    Shards are ``{directory}/{prefix}-00000.sqdk``, ``-00001``, ...; the last
    one (written by :meth:`close`) may be shorter. Refuses a directory that
    already holds shards of the same prefix, so a reader never mixes runs.
    """

    def __init__(
        self,
        directory: str,
        vocab: int,
        k: int,
        temperature: float = 1.0,
        positions_per_shard: int = 1 << 20,
        prefix: str = "shard",
    ):
        _check_k(k, vocab)
        if not isinstance(positions_per_shard, int) or positions_per_shard < 1:
            raise ValueError(f"positions_per_shard must be a positive int, got {positions_per_shard!r}")
        os.makedirs(directory, exist_ok=True)
        if _find_shards(directory, prefix):
            raise ValueError(
                f"{directory} already holds shards of prefix {prefix!r}: remove them or use another directory"
            )
        self.directory, self.vocab, self.k = directory, vocab, k
        self.temperature, self.positions_per_shard, self.prefix = temperature, positions_per_shard, prefix
        self.paths: list[str] = []
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_n = 0

    def write(self, s: TopKSample) -> None:
        """Buffer a sample's positions; write every full shard."""
        arrays = _as_numpy(s, self.vocab, self.k)
        self._pending.append(arrays)
        self._pending_n += len(arrays[2])
        while self._pending_n >= self.positions_per_shard:
            self._flush(self.positions_per_shard)

    def close(self) -> list[str]:
        """Write the remaining positions as a last shard; return all shard paths."""
        if self._pending_n:
            self._flush(self._pending_n)
        return self.paths

    def _flush(self, n: int) -> None:
        ids, logp, tau = (np.concatenate(a) for a in zip(*self._pending))
        path = _shard_path(self.directory, self.prefix, len(self.paths))
        shard = TopKSample(
            torch.from_numpy(ids[:n].astype(np.int32)), torch.from_numpy(logp[:n]), torch.from_numpy(tau[:n])
        )
        write_shard(path, shard, self.vocab, self.temperature)
        self.paths.append(path)
        self._pending = [(ids[n:], logp[n:], tau[n:])] if len(tau) > n else []
        self._pending_n = len(tau) - n

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Reader:
    """Iterate over the shards of one rank: shard i belongs to rank ``i % world``.

    Headers of this rank's shards are checked at construction (magic, version,
    size); the payload checksum when a shard is read. ``k``/``vocab`` given
    here must match every shard, and shards must agree with each other.

    Attributes: ``paths`` (this rank's shards), ``k``, ``vocab``,
    ``temperature``, ``positions`` (total over this rank's shards).
    """

    def __init__(
        self,
        directory: str,
        rank: int = 0,
        world: int = 1,
        k: int | None = None,
        vocab: int | None = None,
        prefix: str = "shard",
    ):
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"need 0 <= rank < world, got rank={rank!r}, world={world!r}")
        found = _find_shards(directory, prefix)
        missing = sorted(set(range(len(found))) - set(found))
        if missing:
            # A gap would silently shift the shard-to-rank assignment.
            raise ValueError(f"{directory}: shard {missing[0]} of prefix {prefix!r} is missing")
        self.paths = [found[i] for i in range(rank, len(found), world)]
        self.k, self.vocab, self.temperature, self.positions = k, vocab, None, 0
        for path in self.paths:
            with open(path, "rb") as f:
                header, _ = _read_header(path, f)
            for key in ("k", "vocab", "temperature"):
                if getattr(self, key) is None:
                    setattr(self, key, header[key])
                elif header[key] != getattr(self, key):
                    raise ValueError(f"{path}: {key} mismatch: shard has {header[key]}, expected {getattr(self, key)}")
            self.positions += header["positions"]

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        for path in self.paths:
            yield read_shard(path)[1]


# ----------------------------------------------------------------------------
# Offline distillation of a data-parallel run: one shard per (step, rank).
# ----------------------------------------------------------------------------
TEACHER_META = "teacher.json"  # a dump's parameters, beside its shards


@torch.no_grad()
def dump_teacher(
    teacher_logits: Callable[[int, int], torch.Tensor],
    directory: str,
    vocab: int,
    positions: int,
    steps: int,
    world: int = 1,
    k: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    meta: dict | None = None,
) -> list[str]:
    """Store a teacher's Gumbel top-k samples for the batches a student run will train on.

    Position mapping: shard ``i = (s - 1) * world + r`` holds the sample of
    ``teacher_logits(s, r)``, the teacher's logits of exactly the inputs that
    rank ``r`` trains on at step ``s`` (1-based), its ``positions`` positions
    in the order the student's logits flatten. :class:`Reader` (or
    :func:`open_teacher`) gives rank ``r`` the shards ``r, r + world, ...``,
    i.e. steps 1, 2, ... in order. The parameters are saved in
    ``directory/teacher.json`` (:data:`TEACHER_META`) so that a student can
    check it uses the same ones.

    Args:
        teacher_logits: ``(step, rank) -> [..., vocab]`` teacher logits (run
            under ``torch.no_grad``; put the teacher in eval mode first).
        directory: where the shards go; must not already hold shards.
        vocab: the vocabulary size.
        positions: positions of each batch (e.g. ``batch * seq``).
        steps, world: those of the student run.
        k: entries sampled per position.
        temperature: the teacher's softmax temperature.
        seed: seeds the Gumbel noise; saved in the metadata.
        meta: more parameters of the run to save (e.g. batch, seq).

    Returns:
        The shard paths.
    """
    for name, value in (("steps", steps), ("positions", positions), ("world", world)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    gen = torch.Generator().manual_seed(seed)
    with Writer(directory, vocab, k, temperature, positions_per_shard=positions) as writer:
        for step in range(1, steps + 1):
            for rank in range(world):
                logits = teacher_logits(step, rank)  # [..., V]
                if logits.numel() != positions * vocab:
                    raise ValueError(f"teacher_logits({step}, {rank}) has shape "
                                     f"{tuple(logits.shape)}, not {positions} positions of "
                                     f"vocab {vocab}: one shard per (step, rank) needs both.")
                writer.write(sample(logits.float().cpu().log_softmax(-1), k, temperature,
                                    generator=gen))
    run = {"steps": steps, "seed": seed, "world": world, "k": k, "temperature": temperature,
           **(meta or {})}
    with open(os.path.join(directory, TEACHER_META), "w") as f:
        json.dump(run, f, indent=1)
    return writer.paths


def open_teacher(directory: str, rank: int = 0, world: int = 1, steps: int | None = None,
                 **expected) -> Reader:
    """Return rank ``rank``'s :class:`Reader` of a :func:`dump_teacher` directory.

    Raises ValueError unless the dump was made for this run: the same
    ``world`` and ``expected`` parameters (e.g. ``batch=8, seq=128, seed=0``)
    and at least ``steps`` steps.
    """
    with open(os.path.join(directory, TEACHER_META)) as f:
        meta = json.load(f)
    wrong = {key: (meta.get(key), value) for key, value in {**expected, "world": world}.items()
             if meta.get(key) != value}
    if steps is not None and meta["steps"] < steps:
        wrong["steps"] = (meta["steps"], steps)
    if wrong:
        raise ValueError(f"{directory} was dumped for other windows: (dump, this run) "
                         f"{wrong}; dump the teacher with this run's settings.")
    return Reader(directory, rank, world)
