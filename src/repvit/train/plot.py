"""``repvit plot RUN_DIR``: loss / accuracy / learning-rate curves from metrics.jsonl to a PNG."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..utils.files import atomic_write

__all__ = ["read_metrics", "plot_run"]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}; pass a run directory written by `repvit train`")
    rows = []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if i == last:
                # a run killed mid-append leaves a torn final line: plot the complete epochs before it
                print(f"note: skipping the incomplete last line {i} of {path} (the run was likely stopped while "
                      f"writing it): {e}", file=sys.stderr)
                continue
            raise ValueError(f"{path} line {i} is not a JSON object: {e}") from e
        missing = [k for k in ("epoch", "train_loss", "val_top1") if k not in row]
        if missing:
            raise ValueError(f"{path} line {i} lacks {', '.join(repr(k) for k in missing)}: not a metrics.jsonl "
                             "written by repvit train (each line holds epoch, train_loss, val_top1, ...)")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no epochs yet; plot after the first epoch finishes")
    return rows


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw train/val loss, top-1 (raw and EMA) and lr per epoch; returns the PNG path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("repvit plot needs matplotlib: pip install 'repvit[plot]'") from e
    rows = read_metrics(run_dir)
    ep = [r["epoch"] + 1 for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(ep, [r["train_loss"] for r in rows], "o-", label="train loss")
    def series(key: str) -> tuple[list, list]:     # an optional column: the epochs that have it
        have = [(e, r[key]) for e, r in zip(ep, rows) if key in r]
        return [e for e, _ in have], [v for _, v in have]
    if any("val_loss" in r for r in rows):
        ax[0].plot(*series("val_loss"), "o-", label="val loss")
    ax[1].plot(ep, [r["val_top1"] for r in rows], "o-", label="val top-1 (raw)")
    if any("ema_val_top1" in r for r in rows):
        ax[1].plot(*series("ema_val_top1"), "o-", label="val top-1 (EMA)")
    if any("lr" in r for r in rows):
        ax[2].plot(*series("lr"), "o-", label="lr (end of epoch)")
    for a, title in zip(ax, ("loss", "accuracy (%)", "learning rate")):
        a.set_xlabel("epoch")
        a.set_title(title)
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(str(Path(run_dir).resolve().name))
    fig.tight_layout()
    dst = Path(out) if out else (Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent) / "curves.png"
    atomic_write(dst, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return dst
