"""Helpers shared by the benchmarks: size parsing and the version header."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform

from squinchcomm.config import parse_size

__all__ = ["parse_size", "size_sweep", "add_sweep_args", "write_results", "versions",
           "cpu_model", "params_digest"]


def size_sweep(minbytes, maxbytes, factor: int) -> list[int]:
    """Sizes ``-b, -b*f, -b*f^2, ... <= -e`` (nccl-tests' -b/-e/-f), validated."""
    lo, hi = parse_size(minbytes), parse_size(maxbytes)
    if lo < 4 or lo > hi:
        raise ValueError(f"sizes -b {minbytes} -e {maxbytes}: pass 4 <= -b <= -e (bytes)")
    if factor < 2:
        raise ValueError(f"-f {factor}: the size step factor must be >= 2")
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def add_sweep_args(p, *, maxbytes: str = "64M", iters: int = 10, warmup: int = 2,
                   unit: str = "fp32 bytes") -> None:
    """Add nccl-tests' sweep options ``-b -e -f -n -w`` to an argument parser
    (read them back with :func:`size_sweep`)."""
    p.add_argument("-b", "--minbytes", default="1M", help=f"smallest size in {unit} (default 1M)")
    p.add_argument("-e", "--maxbytes", default=maxbytes,
                   help=f"largest size in {unit} (default {maxbytes})")
    p.add_argument("-f", "--stepfactor", type=int, default=4, help="size multiplier (default 4)")
    p.add_argument("-n", "--iters", type=int, default=iters,
                   help=f"timed iterations (default {iters})")
    p.add_argument("-w", "--warmup", type=int, default=warmup,
                   help=f"untimed iterations (default {warmup})")


#: The model-size options of the commands that keep GPTConfig's field names for
#: them (``args.n_layer``, as their results record it): attribute -> option.
MODEL_FLAGS = {"n_layer": "--layers", "n_embd": "--width", "n_head": "--heads"}


def add_model_args(p, *, layers: int, width: int, heads: int) -> None:
    """Add ``--layers --width --heads``, read back as ``args.n_layer, n_embd, n_head``."""
    for (dest, flag), default in zip(MODEL_FLAGS.items(), (layers, width, heads)):
        p.add_argument(flag, dest=dest, metavar=flag[2:].upper(), type=int, default=default)


def option(dest: str) -> str:
    """The command-line option that sets ``args.<dest>`` (``n_layer`` -> ``--layers``)."""
    return MODEL_FLAGS.get(dest, "--" + dest.replace("_", "-"))


def write_results(out, name: str, doc: dict, report: str) -> None:
    """Write ``<out>/<name>.json`` (``doc``) and ``<out>/<name>.md`` (``report``),
    creating ``out``, and print the report. JSON writes infinite values (an
    exact quantization's SQNR) as Infinity."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{name}.md").write_text(report)
    print(report)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """Versions of the library and of the engines it can use (installed ones only),
    read from package metadata so nothing heavy is imported."""
    from squinchcomm import __version__

    out = {"squinchcomm": __version__, "python": platform.python_version()}
    for dist in ("numpy", "numba", "torch", "cupy-cuda13x", "cupy-cuda12x", "mpi4py",
                 "openmpi", "nvidia-nccl-cu13", "nvidia-nccl-cu12"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["cpu"] = cpu_model()
    return out


def params_digest(model) -> str:
    """A hash of a torch model's parameter bytes (or of a list of tensors):
    equal on every data-parallel rank exactly when the parameters are
    bit-identical there."""
    h = hashlib.blake2b(digest_size=16)
    for p in (model.parameters() if hasattr(model, "parameters") else model):
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()
