"""Two gloo DDP processes train exactly like one process accumulating to the same global batch."""

from __future__ import annotations

import subprocess
import sys

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
