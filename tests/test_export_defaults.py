"""The Python export API and the CLI agree on defaults (no coremltools needed)."""

import argparse
import inspect

from repvit.export import commands
from repvit.export.coreml import export_coreml


def test_coreml_precision_default_matches_the_cli():
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    cli = parser.parse_args(["export", "m.safetensors", "--format", "coreml", "--out", "m.mlpackage"])
    api_default = inspect.signature(export_coreml).parameters["fp16"].default
    assert cli.fp16 is False
    assert api_default is cli.fp16
