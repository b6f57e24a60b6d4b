"""The benchmark methods that need PyTorch: torch.distributed's own collectives
and PyTorch's DDP communication hooks, driven on the benchmark's flat buffers.

Used by :mod:`squinchcomm.bench.collective` (``--transport torch``, and for
bfloat16 buffers, which NumPy cannot hold); nothing else imports it.

DDP hands a hook a ``torch.distributed.GradBucket``, which has no Python
constructor in torch 2.13. :class:`FlatBucket` stands in for it with every
method the hooks call (``buffer``, ``index``, ``is_last``, ``gradients``,
``parameters``, ``set_buffer``), over the benchmark's flat buffer: bucket 0,
the last and only bucket of an iteration. The hooks themselves are PyTorch's,
unmodified (``default_hooks.fp16_compress_hook``, ``bf16_compress_hook``,
``powerSGD_hook.powerSGD_hook``); like every DDP hook they reduce the bucket
in place and return the average (they divide by the world size).

PowerSGD compresses each 2-D gradient to rank-r factors P and Q and
allreduces 1-D gradients uncompressed, so what the bucket holds matters. The
buffer is presented as the weight matrices of a d_model = 1024 transformer:
consecutive 1024 x 1024 matrices, then one (rest // 1024) x 1024 matrix, then
a 1-D remainder of fewer than 1024 elements (a bias). PowerSGD itself skips
matrices it cannot compress at least 2x (its ``min_compression_rate``), such
as a few rows at small sizes; those travel uncompressed.
"""

from __future__ import annotations


import numpy as np
import torch

import squinchcomm
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

__all__ = ["FlatBucket", "PowerSGD", "TorchEngine", "MATRIX", "START_POWERSGD_ITER",
           "all_gather_single", "reduce_scatter_single", "as_tensor", "as_numpy", "matrix_shapes", "ddp_cast_hook", "engine_bf16_allreduce",
           "share_cores"]

#: Rows and columns of the weight matrices PowerSGD sees.
MATRIX = 1024
#: PowerSGD allreduces uncompressed until its iteration counter reaches this;
#: 2 is the least PowerSGDState accepts with error feedback or warm start.
START_POWERSGD_ITER = 2


# torch 2.13 renamed the single-tensor collectives (the old names warn); older
# torch has only the old ones.
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A zero-copy torch view of a benchmark buffer (bfloat16 is held as uint16 bits)."""
    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def as_numpy(t) -> np.ndarray:
    """The inverse of :func:`as_tensor` (NumPy arrays pass through)."""
    if isinstance(t, np.ndarray):
        return t
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def share_cores(local_size: int) -> int:
    """:func:`squinchcomm.share_cores` (torch's and the codec's threads per
    local rank); returns torch's thread count, which the benchmarks report."""
    squinchcomm.share_cores(local_size)
    return torch.get_num_threads()


def matrix_shapes(n: int) -> list[tuple[int, ...]]:
    """The gradient shapes a flat buffer of ``n`` elements is presented as."""
    shapes: list[tuple[int, ...]] = [(MATRIX, MATRIX)] * (n // MATRIX ** 2)
    rest = n % MATRIX ** 2
    if rest >= MATRIX:
        shapes.append((rest // MATRIX, MATRIX))
    if rest % MATRIX:
        shapes.append((rest % MATRIX,))
    return shapes


class FlatBucket:
    """Stands in for ``torch.distributed.GradBucket`` over a flat gradient buffer.

    Args:
        buffer: the bucket's flat (n,) tensor; the gradients are views of it
            shaped by ``shapes``, so a hook writing into them writes into the
            buffer, as with DDP's buckets.
        shapes: the gradients' shapes, in buffer order (e.g. a model's
            parameter shapes); None: :func:`matrix_shapes`.
    """

    def __init__(self, buffer: torch.Tensor, shapes: list[tuple[int, ...]] | None = None):
        self._buffer = buffer
        self._grads, start = [], 0
        shapes = matrix_shapes(buffer.numel()) if shapes is None else shapes
        if sum(int(np.prod(s)) for s in shapes) != buffer.numel():
            raise ValueError(f"shapes {shapes} hold {sum(int(np.prod(s)) for s in shapes)} "
                             f"elements, the buffer {buffer.numel()}: pass the shapes of "
                             "exactly the buffer's gradients, in order")
        for shape in shapes:
            size = int(np.prod(shape))
            self._grads.append(buffer[start:start + size].view(shape))
            start += size

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def set_buffer(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer

    def gradients(self) -> list[torch.Tensor]:
        return list(self._grads)

    def parameters(self) -> list[torch.Tensor]:
        """Stand-ins with the parameters' shapes (the gradients themselves)."""
        return list(self._grads)


def ddp_cast_hook(kind: str, buffer: torch.Tensor, group):
    """One call of PyTorch's ``fp16_compress_hook`` / ``bf16_compress_hook``
    (``kind`` "fp16" / "bf16") on ``buffer``, waited for; returns the callable."""
    hook = {"fp16": default_hooks.fp16_compress_hook,
            "bf16": default_hooks.bf16_compress_hook}[kind]
    bucket = FlatBucket(buffer)
    return lambda: hook(group, bucket).wait()


def engine_bf16_allreduce(src: torch.Tensor, out: torch.Tensor, group, world: int):
    """The engine's own bf16 allreduce: all_reduce (sum, in bf16) of a bf16 copy
    of ``src``, then the average into ``out``; returns the callable."""
    def call():
        t = src.to(torch.bfloat16, copy=True)  # copy: a bf16 src must stay untouched
        dist.all_reduce(t, group=group)
        out.copy_(t)
        out.div_(world)
    return call


class PowerSGD:
    """PyTorch's ``powerSGD_hook`` on a :class:`FlatBucket` over ``buffer``.

    Error feedback and warm start on, ``matrix_approximation_rank`` = ``rank``,
    ``start_powerSGD_iter`` = :data:`START_POWERSGD_ITER`. A fresh state per
    buffer: the hook keys its error and P/Q memories by bucket index, sized
    for the first buffer it saw.

    Args:
        buffer: the bucket's flat tensor (reduced in place).
        rank: the matrix approximation rank.
        group: the process group.
        seed: PowerSGD's random seed (the same on every rank: Q starts random).
        shapes: the gradients' shapes in ``buffer`` (see :class:`FlatBucket`);
            PowerSGD compresses the 2-D ones and allreduces the rest as they are.
    """

    def __init__(self, buffer: torch.Tensor, rank: int, group, seed: int,
                 shapes: list[tuple[int, ...]] | None = None):
        self.state = powerSGD_hook.PowerSGDState(
            process_group=group, matrix_approximation_rank=rank,
            start_powerSGD_iter=START_POWERSGD_ITER, use_error_feedback=True, warm_start=True,
            random_seed=seed)
        self.bucket = FlatBucket(buffer, shapes)
        #: Elements the last compressed call allreduced: the P and Q factors plus
        #: the tensors left uncompressed (PowerSGD's own count).
        self.sent_elements = 0

    def warm_up(self, refill) -> None:
        """Run the hook's uncompressed first iterations (plain allreduces), each
        on a refilled buffer, so that every later call compresses."""
        while self.state.iter < self.state.start_powerSGD_iter:
            refill()
            powerSGD_hook.powerSGD_hook(self.state, self.bucket).wait()

    def __call__(self) -> None:
        """One compressed call, waited for."""
        if self.state.iter < self.state.start_powerSGD_iter:
            raise RuntimeError(f"PowerSGD is at iteration {self.state.iter}, still below "
                               f"start_powerSGD_iter={self.state.start_powerSGD_iter}: it "
                               "would allreduce uncompressed; call warm_up() first")
        self.step()

    def step(self) -> None:
        """One call as in training, the uncompressed warm-up iterations included
        (:attr:`sent_elements` is then the whole buffer), waited for."""
        before = self.state.total_numel_after_compression
        powerSGD_hook.powerSGD_hook(self.state, self.bucket).wait()
        sent = self.state.total_numel_after_compression - before
        self.sent_elements = sent if sent else self.bucket.buffer().numel()


class TorchEngine:
    """torch.distributed's own collectives on NumPy buffers (zero-copy views)."""

    def __init__(self, group):
        self.group = group

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def reduce_scatter(self, x32: np.ndarray, out: np.ndarray) -> None:
        """Sum float32 ``x32`` over the ranks; this rank's equal shard into ``out``."""
        reduce_scatter_single(torch.from_numpy(out), torch.from_numpy(x32), group=self.group)

    def allgather(self, x: np.ndarray, out: np.ndarray) -> None:
        """Concatenate every rank's ``x`` into ``out``, as bytes."""
        all_gather_single(torch.from_numpy(out.view(np.uint8)), torch.from_numpy(x.view(np.uint8)),
                         group=self.group)
