"""Benchmarks: ``python -m squinchcomm.bench <command> [options]`` (``--help`` per command)."""

__all__ = ["COMMANDS"]

# Subcommand -> "module" (its main(argv) runs) or "module:function"; imported on
# demand, so a command's heavy imports (torch, mpi4py) cost only that command.
COMMANDS = {
    "allreduce": "squinchcomm.bench.collective:allreduce_main",
    "reduce_scatter": "squinchcomm.bench.collective:reduce_scatter_main",
    "allgather": "squinchcomm.bench.collective:allgather_main",
    "codec": "squinchcomm.bench.codec",
    "quality": "squinchcomm.bench.quality",
    "train": "squinchcomm.bench.train",
    "pipeline": "squinchcomm.bench.pipeline",
    "model": "squinchcomm.bench.model",
    # companion techniques (squinchcomm.nn), issue 6
    "zreg": "squinchcomm.bench.zreg",
    "clamp": "squinchcomm.bench.clamp",
    "visibility": "squinchcomm.bench.visibility",
    "distill": "squinchcomm.bench.distill",
    "qat": "squinchcomm.bench.qat",
    # the loss-parity experiment, issue 7
    "parity": "squinchcomm.bench.parity",
    # the device check for a lent GPU machine, issue 13
    "gpu-check": "squinchcomm.bench.gpu_check",
}
