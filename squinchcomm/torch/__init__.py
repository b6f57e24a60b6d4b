"""Horovod-compatible PyTorch API: ``import squinchcomm.torch as hvd``.

A drop-in for ``import horovod.torch as hvd`` with Squinch 6-bit gradient
compression (``hvd.Compression.squinch``), over MPI (``mpirun``) or
torch.distributed (``torchrun``).

Example::

    import torch
    import squinchcomm.torch as hvd

    hvd.init()
    model = torch.nn.Linear(100, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=hvd.Compression.squinch)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

Differences from Horovod (the README lists them all): no Adasum (it
raises with the reason); collectives are matched by call order
on every rank (every rank must issue the same collectives in the same
order), not negotiated by name, and a mismatch raises the same
MismatchError on every rank; no custom Compressor classes (compression
happens on the wire, see :mod:`squinchcomm.torch.compression`).
"""

from squinchcomm.errors import require

require("torch", "torch", "squinchcomm.torch")  # an error naming the extra

from squinchcomm.torch._ops import (Adasum, Average, Max, Min, Product, Sum, TorchHandle,
                                    allgather, allgather_async, allgather_object, allreduce,
                                    allreduce_, allreduce_async, allreduce_async_, alltoall,
                                    barrier, broadcast, broadcast_, broadcast_async,
                                    broadcast_async_, broadcast_object,
                                    broadcast_optimizer_state, broadcast_parameters,
                                    communicator, cross_rank, cross_size, gloo_built,
                                    grouped_allreduce, grouped_allreduce_,
                                    grouped_allreduce_async, grouped_allreduce_async_, init,
                                    is_initialized, join, local_rank, local_size, mpi_built,
                                    nccl_built, poll, rank, reducescatter, shutdown, size,
                                    synchronize, ccl_built, cuda_built, rocm_built,
                                    mpi_enabled, gloo_enabled, mpi_threads_supported,
                                    is_homogeneous, HorovodInternalError, reducescatter_async,
                                    grouped_reducescatter, grouped_allgather, start_timeline,
                                    stop_timeline, sparse_allreduce_async)
from squinchcomm.torch.process_sets import (ProcessSet, add_process_set, global_process_set,
                                            remove_process_set)
from squinchcomm.torch.compression import Compression, WireCompression
from squinchcomm.torch.optimizer import DistributedOptimizer
from squinchcomm.torch.diloco import DiLoCo
from squinchcomm.torch.sync_batch_norm import SyncBatchNorm

__all__ = ["init", "shutdown", "is_initialized", "communicator", "rank", "size", "local_rank",
           "local_size", "cross_rank", "cross_size", "mpi_built", "gloo_built", "nccl_built",
           "ccl_built", "cuda_built", "rocm_built", "mpi_enabled", "gloo_enabled",
           "mpi_threads_supported", "is_homogeneous", "HorovodInternalError",
           "reducescatter_async", "grouped_reducescatter", "grouped_allgather",
           "start_timeline", "stop_timeline", "sparse_allreduce_async",
           "ProcessSet", "add_process_set", "remove_process_set", "global_process_set",
           "Average", "Sum", "Adasum", "Min", "Max", "Product", "Compression", "WireCompression",
           "TorchHandle", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
           "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async",
           "grouped_allreduce_async_", "allgather", "allgather_async", "allgather_object",
           "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "broadcast_object",
           "reducescatter", "alltoall", "barrier", "join", "synchronize", "poll",
           "broadcast_parameters", "broadcast_optimizer_state", "DistributedOptimizer", "DiLoCo",
           "SyncBatchNorm"]
