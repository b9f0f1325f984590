"""Resumable training checkpoints: atomic writes, RNG capture/restore, rotation.

``last.pt`` holds everything an exact resume needs and loads with ``torch.load(weights_only=True)``:
plain dicts, numbers, strings and tensors only (the config as a dict, RNG states as tensors).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..utils.files import atomic_write

__all__ = ["atomic_torch_save", "capture_rng", "restore_rng", "load_train_state", "rotate"]


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a truncated one.
    """
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def capture_rng() -> dict:
    """Torch (CPU + CUDA), NumPy and Python RNG states, as tensors."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor(np_state[4], dtype=torch.float64),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_meta": torch.tensor([py_state[0]], dtype=torch.int64),
        "python_gauss": torch.tensor([py_state[2] if py_state[2] is not None else float("nan")],
                                     dtype=torch.float64),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    meta = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(meta[0]), int(meta[1]),
                         float(state["numpy_gauss"])))
    gauss = float(state["python_gauss"][0])
    random.setstate((int(state["python_meta"][0]), tuple(int(v) for v in state["python"].tolist()),
                     None if gauss != gauss else gauss))
    if "cuda" in state and torch.cuda.is_available():
        states = list(state["cuda"])
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def load_train_state(path: str | os.PathLike) -> dict:
    """Load a resumable checkpoint (a run directory or a .pt file)."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no resumable checkpoint at {p}; --resume expects a run directory holding last.pt")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file should read as such, not as a pickle traceback
        raise RuntimeError(f"cannot read checkpoint {p}: {e}") from e
    for key in ("model", "optimizer", "epoch", "micro", "step", "config"):
        if key not in state:
            raise ValueError(f"{p} is not a repvit training checkpoint (missing {key!r})")
    return state


def rotate(run_dir: Path, epoch: int, keep_last: int) -> None:
    """Keep ``last.pt`` as ``checkpoint-epochNNNN.pt`` (hard link, else copy) and prune to ``keep_last``.

    Checkpoints of epochs after ``epoch`` were written by a continuation that this run abandoned when it resumed
    from an older checkpoint (a run's epochs only grow): they are deleted, not counted. Counted, they would make
    the prune delete the checkpoint just written (e.g. after ``--set run.keep_last=1``) and keep checkpoints of
    two different trajectories side by side; this run would overwrite each of them on reaching its epoch anyway."""
    kept = keep_last > 0
    if kept:
        src, dst = run_dir / "last.pt", run_dir / f"checkpoint-epoch{epoch:04d}.pt"

        def place(tmp: str) -> None:
            # link (or copy) under a temporary name that atomic_write then renames over dst: a kill at any moment
            # leaves the old dst or the complete new one, never a missing or half-copied file
            os.unlink(tmp)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
        atomic_write(dst, place)
    ours = []
    for p in run_dir.glob("checkpoint-epoch*.pt"):
        m = re.fullmatch(r"checkpoint-epoch(\d+)\.pt", p.name)
        if m is None:
            continue
        n = int(m.group(1))
        # with none kept this run writes no file of this epoch, so one found is the abandoned continuation's too
        if n > epoch or (n == epoch and not kept):
            p.unlink(missing_ok=True)
        else:
            ours.append((n, p))
    if kept:
        for _, old in sorted(ours)[:-keep_last]:
            old.unlink(missing_ok=True)
