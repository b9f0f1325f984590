"""Two gloo DDP processes train exactly like one process accumulating to the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repvit.train import train

from trainhelpers import ROOT, TINY, as_overrides, cli_env, free_port, load_state, tiny_config

SET = ["schedule.epochs=1", "run.max_steps_per_epoch=4", "run.global_batch=32", "run.batch_size=16",
       "data.max_train_samples=256", "ema.enabled=false",
       "aug.pad_crop=2", "aug.hflip=0.5"]   # random augmentation: seeded per sample, so the same on both layouts


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_single_process(tmp_path):
    single = tmp_path / "single"
    train(tiny_config(*SET), single)            # 1 process: 2 micro-batches of 16 per update
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "repvit", "train", "--recipe", "digits", "--out", str(ddp), *as_overrides(TINY + SET)]
    p = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_state(single), load_state(ddp)
    assert a["step"] == b["step"] == 4 and b["world_size"] == 2 and a["world_size"] == 1
    params = [n for n, _ in __import__("repvit").models.build_model("repvit_m0_6", num_classes=10,
                                                                     in_chans=1).named_parameters()]
    for n in params:
        # BatchNorm running statistics are per process in DDP (no SyncBN on CPU); parameters must agree
        assert torch.allclose(a["model"][n], b["model"][n], atol=2e-5, rtol=1e-4), n


def test_two_process_ranks_end_with_the_saved_buffers_and_share_one_precomputed_teacher_table(tmp_path):
    """Every rank validates the weights the checkpoint holds: BatchNorm statistics and the EMA's buffers are the main
    rank's on all ranks after an epoch (each rank's last batch used to leave its own). And distill.precompute splits
    the teacher's pass over the ranks and gathers it: the table equals a single process's (uneven shards: 71 images)."""
    import repvit
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    repvit.save_checkpoint(repvit.create_model("repvit_m0_6", num_classes=10, in_chans=1), teacher)
    overrides = ["schedule.epochs=1", "run.max_steps_per_epoch=2", "run.global_batch=32", "run.batch_size=16",
                 "data.max_train_samples=71", "ema.enabled=true", "ema.decay=0.5", "distill.kind=soft",
                 f"distill.teacher={teacher}", "distill.precompute=true"]
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).with_name("ddp_capture_worker.py")), str(ddp), *overrides]
    p = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    b0, b1 = (torch.load(ddp / f"buffers_rank{r}.pt") for r in (0, 1))
    for part in ("model", "ema"):
        assert b0[part] and set(b0[part]) == set(b1[part])
        assert all(torch.equal(b0[part][n], b1[part][n]) for n in b0[part]), part
    single = tmp_path / "single"
    train(tiny_config(*overrides, "run.max_steps_per_epoch=1"), single)
    a, b = (torch.load(d / "teacher_logits.pt", weights_only=True) for d in (single, ddp))
    assert a["key"] == b["key"] and a["logits"].shape == b["logits"].shape == (71, 10)
    assert torch.allclose(a["logits"], b["logits"], atol=1e-5)
