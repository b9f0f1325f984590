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
    import os
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as e:
        # user-facing errors: one clear line, no traceback (set REPVIT_DEBUG=1 to see it). OSError covers the
        # file-system ones (FileNotFoundError, IsADirectoryError, PermissionError, a full disk, ...): their
        # messages name the path and the cause. A RuntimeError raised outside this package (torch internals,
        # out of memory, ...) is not ours to explain: say so, exit 1.
        if os.environ.get("REPVIT_DEBUG"):
            raise
        if isinstance(e, RuntimeError) and not _raised_here(e):
            print(f"repvit {args.command}: unexpected {type(e).__name__}: {e}\n(set REPVIT_DEBUG=1 for the "
                  "traceback, and please report it if the message does not say what to fix)", file=sys.stderr)
            return 1
        print(f"repvit {args.command}: error: {e}", file=sys.stderr)
        return 2


def _raised_here(e: BaseException) -> bool:
    """Whether ``e`` was raised by this package's own code (the innermost frame of its traceback)."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    from pathlib import Path
    pkg = Path(__file__).resolve().parent
    return pkg in Path(tb.tb_frame.f_code.co_filename).resolve().parents


if __name__ == "__main__":
    sys.exit(main())
