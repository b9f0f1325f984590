"""Public entry points: create_model, load_checkpoint, save_checkpoint (implemented in repvit.weights)."""

from __future__ import annotations

from .weights.api import create_model, load_checkpoint, save_checkpoint

__all__ = ["create_model", "load_checkpoint", "save_checkpoint"]
