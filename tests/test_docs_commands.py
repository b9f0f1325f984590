"""Every `repvit ...` command written in the README and docs/ parses with today's CLI: a renamed or removed flag
cannot leave a documented command (often the one that produced a committed result) silently broken."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from repvit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# usage synopses, not commands: optional parts in brackets, alternatives, placeholders (N, COMMAND, SOURCE, ...)
SYNOPSIS = re.compile(r"\[|\.\.\.|\||\{|<|(^|\s)[A-Z][A-Z_]*(\s|$)")
# prose mentions a flag or two of a command (`repvit eval --json`): such a fragment lacks required arguments, but a
# flag that does not exist, or a bad value, is an error in a fragment too
FRAGMENT_ERRORS = ("the following arguments are required", "expected one argument")


def _fenced_commands(text: str, prefix: str) -> list[str]:
    """The lines of the code blocks that start with ``prefix``, continuation lines (``\\``) joined, trailing
    comments dropped."""
    out = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [re.split(r"\s+#\s", ln.strip(), maxsplit=1)[0].strip() for ln in joined.splitlines()
                if ln.strip().startswith(prefix)]
    return out


def _inline_commands(text: str, prefix: str) -> list[str]:
    return [" ".join(m.split()) for m in re.findall(rf"`({re.escape(prefix)}[^`]+)`", text)]


def documented_commands() -> list[tuple[str, str, bool]]:
    """(document, command, whether it is a whole command: a code block's, not a fragment quoted in prose)."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for cmds, whole in ((_fenced_commands(text, "repvit "), True), (_inline_commands(text, "repvit "), False)):
            for cmd in cmds:
                if not SYNOPSIS.search(cmd) and len(shlex.split(cmd)) > 2:   # "repvit eval" alone names a command
                    found.append((doc.name, cmd, whole))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_whole_commands_for_every_subcommand():
    used = {shlex.split(c)[1] for _, c, whole in COMMANDS if whole}
    assert {"train", "eval", "export", "quantize", "bench", "roadmap", "convert", "plot"} <= used, used


@pytest.mark.parametrize("doc,cmd,whole", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c, _ in COMMANDS])
def test_documented_command_parses(doc, cmd, whole):
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(shlex.split(cmd)[1:])
    except SystemExit as e:
        msg = err.getvalue().strip().splitlines()[-1:]
        if not whole and any(f in "".join(msg) for f in FRAGMENT_ERRORS):
            # argparse reports missing required arguments before unknown flags: check the fragment's flags by name
            words = shlex.split(cmd)
            sub = next(a for a in parser._subparsers._group_actions if words[1] in a.choices).choices[words[1]]
            unknown = [w.split("=")[0] for w in words[2:] if w.startswith("--")
                       and w.split("=")[0] not in sub._option_string_actions]
            assert not unknown, f"{doc}: `{cmd}` names flags `repvit {words[1]}` does not have: {unknown}"
            return
        pytest.fail(f"{doc}: `{cmd}` no longer parses: {msg} (exit {e.code})")


def documented_scripts() -> list[tuple[str, str]]:
    """The ``python benchmarks/NAME.py ...`` commands of the docs (code blocks and inline), without synopses."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        found += [(doc.name, c) for c in _inline_commands(text, "python benchmarks/")
                  + _fenced_commands(text, "python benchmarks/") if not SYNOPSIS.search(c)]
    return found


SCRIPTS = documented_scripts()


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("doc,cmd", SCRIPTS, ids=[f"{d}:{c[:70]}" for d, c in SCRIPTS])
def test_documented_benchmark_command_parses(doc, cmd, monkeypatch):
    """The script's own argument parser accepts the documented arguments (stopped right after parsing)."""
    import argparse
    import sys

    from tests.conftest import load_script
    words = shlex.split(cmd)
    name = Path(words[1]).stem
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", words[1:])
    mod = load_script(name)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            mod.main(words[2:]) if "argv" in mod.main.__code__.co_varnames[:1] else mod.main()
    except _Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{doc}: `{cmd}` no longer parses: {err.getvalue().strip().splitlines()[-1:]} (exit {e.code})")
    pytest.fail(f"{doc}: `{cmd}`: main() returned without parsing its arguments")


def test_the_docs_hold_benchmark_commands():
    assert {Path(shlex.split(c)[1]).stem for _, c in SCRIPTS} >= {"fashion_mnist", "int8_accuracy", "latency_vs_timm"}
