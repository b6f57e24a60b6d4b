"""A byte-level text corpus from the Python standard library's own source.

Benchmarks and examples need real training data that is present on every
machine without a download: the ``.py`` files of the running interpreter's
standard library are exactly that. Bytes are tokens (vocabulary 256).

How the corpus is built (deterministic for a given Python installation):

1. List the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, skipping
   ``site-packages`` (not the stdlib), test suites (``test``, ``tests``,
   ``idle_test``: huge, repetitive), ``__pycache__`` and the build-specific
   ``config-*`` / ``_sysconfigdata*`` files (they hold this machine's paths).
2. Assign each file to train or val by a stable hash of its relative POSIX
   path (BLAKE2b, not Python's salted ``hash``): the held-out split is BY FILE,
   so no validation text shares a file with training text.
3. Visit the files in hash order (a fixed pseudo-random shuffle, so a size cap
   keeps a mix of modules instead of the alphabetical head) and append each,
   cut to ``max_file_bytes``, to its split until that split's share of
   ``max_bytes`` is full. Files are separated by one ``SEPARATOR`` (0) byte,
   which never occurs in the sources.

Only NumPy and the standard library are imported.

Example:
    >>> from squinchcomm.models import corpus
    >>> c = corpus.load_corpus(max_bytes=1 << 20)
    >>> c.train.dtype, c.train.size + c.val.size <= 1 << 20
    (dtype('uint8'), True)
    >>> w = corpus.sample_windows(c.train, batch=4, seq=64, seed=0)
    >>> w.shape  # inputs w[:, :-1], next-byte targets w[:, 1:]
    (4, 65)
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "SEPARATOR",
    "VOCAB_SIZE",
    "DEFAULT_MAX_BYTES",
    "Corpus",
    "stdlib_root",
    "list_source_files",
    "split_of",
    "load_corpus",
    "sample_windows",
]

SEPARATOR = 0  # byte between files; never occurs in Python sources
VOCAB_SIZE = 256  # byte-level tokens
DEFAULT_MAX_BYTES = 4 << 20  # 4 MiB: big enough to not memorise, fast to read
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """A train / val split of byte sequences.

    Attributes:
        train: uint8 array, the training bytes (files joined by SEPARATOR).
        val: uint8 array, the held-out bytes (from different files).
        train_files: relative paths in the order their bytes appear in train.
        val_files: the same for val.
        root: the directory the paths are relative to.
        sha256: the first 16 hex digits of SHA-256(train + val), to record in
            results (the stdlib differs between Python versions).
    """

    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    train_files: tuple[str, ...] = field(repr=False)
    val_files: tuple[str, ...] = field(repr=False)
    root: str
    sha256: str

    def describe(self) -> str:
        """Return one line for benchmark headers."""
        return (f"stdlib corpus: train {self.train.size} B / {len(self.train_files)} files, "
                f"val {self.val.size} B / {len(self.val_files)} files, sha256 {self.sha256}")


def stdlib_root() -> Path:
    """Return the directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stable_unit(relpath: str) -> float:
    """Map a relative path to [0, 1) by BLAKE2b: the same on every run and machine."""
    digest = hashlib.blake2b(relpath.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def split_of(relpath: str, val_fraction: float = 0.1) -> str:
    """Return ``"val"`` or ``"train"`` for a file, from a stable hash of its path.

    Args:
        relpath: path relative to the corpus root, with ``/`` separators.
        val_fraction: the expected fraction of files held out.

    Returns:
        ``"val"`` if the path's hash falls below ``val_fraction``, else ``"train"``.

    Example:
        >>> split_of("json/decoder.py", 0.0), split_of("json/decoder.py", 1.0)
        ('train', 'val')
    """
    return "val" if _stable_unit(relpath) < val_fraction else "train"


def list_source_files(root: str | os.PathLike | None = None) -> list[str]:
    """Return the corpus's ``.py`` files as sorted relative POSIX paths (step 1).

    Args:
        root: the directory to scan; default: the stdlib of this interpreter.

    Returns:
        Relative paths, sorted, with the skipped directories and files left out.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise ValueError(f"corpus root {str(root)!r} is not a directory; pass root= "
                         "a directory holding .py files (default: the stdlib).")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place so os.walk does not descend; sorted for a fixed walk
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def _check_args(max_bytes, val_fraction, max_file_bytes):
    if not isinstance(max_bytes, int) or max_bytes < 2:
        raise ValueError(f"max_bytes must be an int >= 2, got {max_bytes!r}; e.g. 4 << 20.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}; e.g. 0.1.")
    if not isinstance(max_file_bytes, int) or max_file_bytes < 1:
        raise ValueError(f"max_file_bytes must be a positive int, got {max_file_bytes!r}.")


@functools.lru_cache(maxsize=4)
def _load(root: str, max_bytes: int, val_fraction: float, max_file_bytes: int) -> Corpus:
    files = list_source_files(root)
    # Step 3: hash order, ties (never seen in practice) broken by path.
    order = sorted(files, key=lambda p: (_stable_unit("order:" + p), p))
    budget = {"val": int(max_bytes * val_fraction)}
    budget["train"] = max_bytes - budget["val"]
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    names: dict[str, list[str]] = {"train": [], "val": []}
    for rel in order:
        split = split_of(rel, val_fraction)  # Step 2
        room = budget[split] - 1  # one byte for the separator
        if room <= 0:
            if budget["train"] <= 1 and budget["val"] <= 1:
                break
            continue
        data = Path(root, rel).read_bytes()[:min(max_file_bytes, room)]
        data = data.replace(bytes([SEPARATOR]), b"")  # keep SEPARATOR unambiguous
        parts[split].append(data + bytes([SEPARATOR]))
        names[split].append(rel)
        budget[split] -= len(data) + 1
    arrays = {}
    for split in ("train", "val"):
        arr = np.frombuffer(b"".join(parts[split]), dtype=np.uint8).copy()
        arr.setflags(write=False)  # shared through the cache: read-only
        arrays[split] = arr
    digest = hashlib.sha256(arrays["train"].tobytes() + arrays["val"].tobytes())
    return Corpus(arrays["train"], arrays["val"], tuple(names["train"]),
                  tuple(names["val"]), root, digest.hexdigest()[:16])


def load_corpus(max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = 0.1,
                root: str | os.PathLike | None = None,
                max_file_bytes: int = 128 << 10) -> Corpus:
    """Build (or return the cached) stdlib byte corpus.

    Args:
        max_bytes: total size cap of train + val in bytes.
        val_fraction: fraction of files (by path hash) and of ``max_bytes``
            held out for validation.
        root: directory of ``.py`` files; default: this interpreter's stdlib.
        max_file_bytes: each file is cut to this many bytes, so one huge
            module (e.g. ``pydoc_data/topics.py``) cannot dominate.

    Returns:
        A :class:`Corpus` with read-only uint8 ``train`` and ``val`` arrays.

    Example:
        >>> c = load_corpus(max_bytes=1 << 16)
        >>> set(c.train_files) & set(c.val_files)
        set()
    """
    _check_args(max_bytes, val_fraction, max_file_bytes)
    root = str(Path(root) if root is not None else stdlib_root())
    return _load(root, int(max_bytes), float(val_fraction), int(max_file_bytes))


def sample_windows(data: np.ndarray, batch: int, seq: int, seed: int, step: int = 0,
                   rank: int = 0) -> np.ndarray:
    """Draw ``batch`` random windows of ``seq + 1`` consecutive bytes.

    The draw is a pure function of ``(seed, step, rank)``: any process can
    recompute any rank's batch at any step, which is what reproducible
    multi-rank training and its tests need.

    Args:
        data: a 1-D uint8 array (``Corpus.train`` or ``Corpus.val``).
        batch: number of windows.
        seq: context length; each window has ``seq + 1`` bytes so that
            ``w[:, :-1]`` are the inputs and ``w[:, 1:]`` the next-byte targets.
        seed: base seed.
        step: training step (a different batch each step).
        rank: data-parallel rank (a different batch on each rank).

    Returns:
        uint8 array of shape (batch, seq + 1).

    Example:
        >>> d = np.arange(100, dtype=np.uint8)
        >>> w = sample_windows(d, batch=2, seq=3, seed=1)
        >>> bool((np.diff(w.astype(int), axis=1) == 1).all())
        True
    """
    for name, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if data.ndim != 1 or data.size < seq + 1:
        raise ValueError(f"data must be 1-D with at least seq + 1 = {seq + 1} bytes, got "
                         f"shape {data.shape}; lower seq or load a bigger corpus.")
    rng = np.random.default_rng([int(seed), int(step), int(rank)])
    starts = rng.integers(0, data.size - seq, size=batch)  # (batch,)
    return data[starts[:, None] + np.arange(seq + 1)]  # (batch, seq + 1)
