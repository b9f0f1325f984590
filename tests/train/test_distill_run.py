"""Distillation inside the loop: a checkpoint teacher, online and precomputed, with mixup on."""

from __future__ import annotations

import json

import pytest
import torch

from repvit.train import train

from trainhelpers import tiny_config


@pytest.mark.parametrize("kind, precompute, ensemble", [("hard", True, False), ("soft", False, False),
                                                        ("soft", False, True)])
def test_student_distils_from_a_checkpoint_teacher(tmp_path, kind, precompute, ensemble):
    teacher_run = tmp_path / "teacher"
    train(tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=2", "ema.enabled=false"), teacher_run)
    teacher = str(teacher_run / "best.safetensors")
    if ensemble:   # the final raw weights and the best ones: two members
        teacher += f",{teacher_run / 'last.pt'}"
    student = tmp_path / "student"
    res = train(tiny_config(
        "schedule.epochs=1", "run.max_steps_per_epoch=2", f"distill.kind={kind}",
        f"distill.teacher={teacher}", "distill.teacher_checkpoint=null",
        f"distill.precompute={str(precompute).lower()}", "aug.mixup=0.8", "aug.cutmix=1.0"), student)
    state = torch.load(student / "last.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("head.head_dist.") for k in state["model"])   # the student has its second head
    assert (student / "teacher_logits.pt").exists() == precompute
    if precompute:
        logits = torch.load(student / "teacher_logits.pt", weights_only=True)
        assert logits.shape == (1438, 10) and torch.isfinite(logits).all()
    row = json.loads((student / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_loss"] > 0 and res.deploy_top1 is not None
