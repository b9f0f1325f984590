"""distill.precompute under DDP: a rank that fails while reading its shard stops every rank (none waits in the
gather for it)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainhelpers import free_port  # noqa: E402


class _Shard(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 5:                                   # in the second rank's shard (3..5) only
            raise OSError("image 5 is unreadable")
        return torch.full((1, 2, 2), float(i))


def _worker(rank: int, port: int, out: str) -> None:
    from repvit.train.dist import DistInfo
    from repvit.train.distill import precompute_teacher_logits
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        precompute_teacher_logits(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), _Shard(), batch_size=2,
                                  device=torch.device("cpu"), collate=lambda items: (torch.stack(items), []),
                                  num_classes=3, di=DistInfo(rank=rank, world_size=2))
        Path(out, f"rank{rank}").write_text("finished")
    except Exception as e:  # noqa: BLE001 - recorded for the test
        Path(out, f"rank{rank}").write_text(f"{type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_failing_rank_stops_the_others(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (Path(tmp_path, f"rank{r}").read_text() for r in (0, 1))
    assert r1 == "OSError: image 5 is unreadable"
    assert r0.startswith("RuntimeError: another rank failed while precomputing"), r0
