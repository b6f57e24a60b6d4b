"""Benchmarks: ``python -m squinchcomm.bench <codec|quality> [options]``."""

__all__ = ["COMMANDS"]

# Subcommand -> module with a main(argv); imported on demand.
COMMANDS = {
    "codec": "squinchcomm.bench.codec",
    "quality": "squinchcomm.bench.quality",
    "allreduce": "squinchcomm.bench.allreduce",
}
