"""`embforge <synth|train|encode|export|merge|mine|data|eval|bench>`.

The top layer: each module of this package (embforge/cli/<area>.py) registers its subcommands with
`add_parser(subparsers)`, parses flags, and wires the layers below together (e.g. cli/train.py gives the trainer its
data and its evaluation hook). The work itself lives in the subpackages. Imports are lazy so that
`embforge eval --help` does not import the trainer.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
