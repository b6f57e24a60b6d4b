"""Entry point: ``python -m squinchcomm.bench <command> [options]``."""

import importlib
import sys

from squinchcomm.bench import COMMANDS


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        names = " | ".join(COMMANDS)
        print(f"usage: python -m squinchcomm.bench {{{names}}} [options]  (--help per command)",
              file=sys.stderr)
        return 2
    module, _, function = COMMANDS[argv[0]].partition(":")
    # Interpreter exit drains the engines and takes the gloo group down
    # (squinchcomm.collectives.engine), so nothing is needed after the command.
    result = getattr(importlib.import_module(module), function or "main")(argv[1:])
    # Commands return their results (rows, a report); an int is an exit status.
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
