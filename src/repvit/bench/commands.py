"""Subcommands of this capability (placeholder until implemented)."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    return None
