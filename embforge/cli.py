"""`embforge <synth|train|eval|bench|encode|export|merge|mine>`.

Each subpackage owns its subcommand: it exposes `add_parser(subparsers)` in its `cli` module, which registers
the parser and sets `func` (called with the parsed args, returns an exit code). Imports are lazy so that
`embforge eval --help` does not import the trainer.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with add_parser(subparsers)
COMMANDS = {
    "synth": "embforge.synth.cli",
    "train": "embforge.engine.cli",
    "encode": "embforge.engine.cli",
    "export": "embforge.engine.cli",
    "merge": "embforge.engine.cli",
    "mine": "embforge.engine.mine",
    "eval": "embforge.eval.cli",
    "bench": "embforge.bench.cli",
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
