"""Shared helpers for the training tests: tiny, fast configs on the digits data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from repvit.train.config import TrainConfig, apply_overrides
from repvit.train.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[2]

# deterministic, augmentation-free, 16x16 digits: a few seconds per epoch on one thread
TINY = [
    "data.img_size=16", "data.max_val_samples=64", "aug.pad_crop=0", "aug.hflip=0.0", "ema.enabled=true",
    "ema.decay=0.9", "run.threads=1", "run.progress=false", "run.channels_last=false",
]


def tiny_config(*extra: str) -> TrainConfig:
    return apply_overrides(load_recipe("digits"), TINY + list(extra))


def recording_optimization(build, grads: list):
    """Wrap ``loop.build_optimization`` so that every optimizer step first appends the gradients it steps with
    (one {name: tensor} dict per update) to ``grads``."""
    def wrapped(cfg, model, **kwargs):
        opt, sched = build(cfg, model, **kwargs)
        real_step = opt.step

        def step(*a, **k):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
            return real_step(*a, **k)
        opt.step = step
        return opt, sched
    return wrapped


def free_port() -> int:
    """A TCP port nobody listens on now, for torchrun's rendezvous (a fixed port collides with a previous run's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_cli(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "repvit", *args], capture_output=True, text=True, timeout=timeout,
                       env=cli_env(), cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"repvit {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def as_overrides(cfg_overrides: list[str]) -> list[str]:
    out = []
    for o in cfg_overrides:
        out += ["--set", o]
    return out


def load_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
