"""torchrun entry for the DDP tests: train a tiny config, then save this rank's parameters.

``python -m torch.distributed.run --nproc_per_node 2 ddp_capture_worker.py OUT_DIR key=value ...``
trains ``tiny_config(key=value ...)`` into OUT_DIR and writes ``OUT_DIR/params_rank{R}.pt`` on every
rank (the run itself only saves rank 0's state), so a test can check that the ranks stayed in sync,
``OUT_DIR/grads_rank{R}.pt``: the (already all-reduced) gradients handed to each optimizer step, and
``OUT_DIR/buffers_rank{R}.pt``: the buffers (BatchNorm statistics) of the trained model and of its EMA at the end.
A first argument ``--as-if-sync-bn`` makes the loop take its SyncBatchNorm path (skip a micro-step on all ranks
when one has no data) on CPU, where PyTorch has no SyncBatchNorm kernel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import timm.utils
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import repvit.train.loop as loop  # noqa: E402
from repvit.train import train  # noqa: E402
from trainhelpers import recording_optimization, tiny_config  # noqa: E402

_built: list = []
_grads: list = []
_build = loop.build_student


def _capture(*args, **kwargs):
    m = _build(*args, **kwargs)
    _built.append(m)          # the first one is the model being trained (raw, DDP wraps it)
    return m


_emas: list = []


class _RecordedEma(timm.utils.ModelEmaV3):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _emas.append(self)


def main() -> None:
    timm.utils.ModelEmaV3 = _RecordedEma       # the loop imports it from timm.utils when it builds the EMA
    args = sys.argv[1:]
    if args[0] == "--as-if-sync-bn":
        loop._has_sync_bn = lambda model: True
        args = args[1:]
    out, overrides = Path(args[0]), args[1:]
    loop.build_student = _capture
    loop.build_optimization = recording_optimization(loop.build_optimization, _grads)
    train(tiny_config(*overrides), out)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({n: p.detach().clone() for n, p in _built[0].named_parameters()}, out / f"params_rank{rank}.pt")
    torch.save(_grads, out / f"grads_rank{rank}.pt")
    torch.save({"model": {n: b.clone() for n, b in _built[0].named_buffers()},
                "ema": {n: b.clone() for n, b in _emas[0].module.named_buffers()} if _emas else None},
               out / f"buffers_rank{rank}.pt")


if __name__ == "__main__":
    main()
