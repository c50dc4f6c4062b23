"""`embforge <synth|train|encode|export|merge|mine|data|eval|bench>`.

The top layer: each module of this package (embforge/cli/<area>.py) registers its subcommands with
`add_parser(subparsers)`, parses flags, and wires the layers below together (e.g. cli/train.py gives the trainer its
data and its evaluation hook). The work itself lives in the subpackages. Imports are lazy so that
`embforge eval --help` does not import the trainer.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from embforge import __version__

# subcommand -> module with add_parser(subparsers)
COMMANDS = {
    "synth": "embforge.cli.synth",
    "train": "embforge.cli.train",
    "encode": "embforge.cli.train",
    "export": "embforge.cli.train",
    "merge": "embforge.cli.merge",
    "mine": "embforge.cli.data",
    "data": "embforge.cli.data",
    "eval": "embforge.cli.eval",
    "bench": "embforge.cli.bench",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"embforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    seen = set()
    for name, module in COMMANDS.items():
        if module in seen or (wanted and COMMANDS[wanted] != module):
            continue
        seen.add(module)
        try:
            importlib.import_module(module).add_parser(sub)
        except ImportError as e:  # a missing optional dependency must not hide the other commands
            if wanted:
                raise
            sub.add_parser(name, help=f"(unavailable: {e})")
    return parser


def one_line(error: BaseException) -> str:
    """An error as one line: its message (an OSError's file and reason), newlines folded."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        msg = f"{error.filename}: {error.strerror}"
    else:
        msg = str(error.args[0]) if len(error.args) == 1 else str(error)
    return " ".join(part.strip() for part in msg.splitlines() if part.strip()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # Bad input the commands did not catch themselves (a config value, a data line, a missing file) is one line
    # naming the key or file:line and exit 2, never a traceback. EMBFORGE_TRACEBACK=1 shows the traceback.
    from embforge.config import ConfigError
    from embforge.data.records import DataError
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        if os.environ.get("EMBFORGE_TRACEBACK"):
            raise
        print(f"embforge {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
