"""Entry point: ``python -m squinchcomm.bench <command> [options]``."""

import importlib
import sys

from squinchcomm.bench import COMMANDS
from squinchcomm.transport import exit_past_gloo


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
        exit_past_gloo(exc.code)
        raise
    exit_past_gloo(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
