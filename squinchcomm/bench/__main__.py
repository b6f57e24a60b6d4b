"""Entry point: ``python -m squinchcomm.bench <command> [options]``."""

import ast
import importlib
import importlib.util
import sys

from squinchcomm.bench import COMMANDS


def _summary(module: str) -> str:
    """The first sentence of a command module's docstring, read without importing it."""
    spec = importlib.util.find_spec(module)
    try:
        with open(spec.origin, encoding="utf-8") as fh:
            doc = ast.get_docstring(ast.parse(fh.read())) or ""
    except (OSError, SyntaxError, AttributeError, TypeError):
        return ""
    first = " ".join(doc.strip().split("\n\n")[0].split())  # the first paragraph, one line
    return first.split(". ")[0].rstrip(".")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m squinchcomm.bench COMMAND [options]   (COMMAND --help for its "
             "options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {_summary(target.partition(':')[0])}"
              for name, target in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{what}\n{_usage()}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[argv[0]].partition(":")
    # Interpreter exit drains the engines, takes the gloo group down and lets
    # gloo's worker threads finish (squinchcomm.collectives.engine._at_exit), so
    # nothing is needed after the command.
    result = getattr(importlib.import_module(module), function or "main")(argv[1:])
    # Commands return their results (rows, a report); an int is an exit status.
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
