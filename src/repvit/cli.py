"""The ``repvit`` command line: one entry point, one subcommand per capability.

Each capability lives in its own module exposing ``register(subparsers)``; that
function adds its subcommand(s) and sets ``func`` to the handler taking the parsed
namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# modules that contribute subcommands, in the order ``repvit --help`` lists them
COMMAND_MODULES = (
    "repvit.weights.commands",   # models, convert
    "repvit.train.commands",     # train, eval, plot
    "repvit.export.commands",    # export, quantize
    "repvit.bench.commands",     # bench, roadmap
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repvit", description="RepViT: models, weights, training, export, benchmarks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        # user-facing errors: one clear line, no traceback (set REPVIT_DEBUG=1 to see it)
        import os
        if os.environ.get("REPVIT_DEBUG"):
            raise
        print(f"repvit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
