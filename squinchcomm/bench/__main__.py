"""Entry point: ``python -m squinchcomm.bench <command> [options]``."""

import importlib
import os
import sys

from squinchcomm.bench import COMMANDS


def _leave_past_gloo(code) -> None:
    """Exit now, skipping interpreter teardown, if a torch.distributed group is up.

    torch 2.13's gloo sometimes aborts a rank at interpreter exit after all
    the work is done ("terminate called without an active exception"), and
    destroy_process_group() sometimes aborts too; os._exit() skips the C++
    destructors. Output is flushed first. Not when MPI is loaded: MPI must
    finalize (at exit, through mpi4py) or mpirun reports a failure.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or "mpi4py.MPI" in sys.modules or not dist.is_initialized():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        names = " | ".join(COMMANDS)
        print(f"usage: python -m squinchcomm.bench {{{names}}} [options]  (--help per command)",
              file=sys.stderr)
        return 2
    module, _, function = COMMANDS[argv[0]].partition(":")
    try:
        getattr(importlib.import_module(module), function or "main")(argv[1:])
    except SystemExit as exc:  # argparse: --help, or a usage error (status 2)
        _leave_past_gloo(exc.code)
        raise
    _leave_past_gloo(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
