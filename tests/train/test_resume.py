"""Exact resume after a SIGKILL, and the non-finite loss stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from repvit.train import NonFiniteLossError, train

from trainhelpers import ROOT, TINY, as_overrides, cli_env, load_state, tiny_config

RESUME_SET = ["schedule.epochs=2", "run.max_steps_per_epoch=3", "run.checkpoint_every_steps=1", "run.seed=3",
              "aug.pad_crop=2", "aug.hflip=0.5"]   # random augmentation on: its RNG must resume exactly too


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_crash_after_checkpoint_then_resume_is_exact(tmp_path, monkeypatch):
    """Fast, in-process: the run dies right after its 4th checkpoint write, then resumes."""
    import repvit.train.loop as loop
    ref = tmp_path / "ref"
    train(tiny_config(*RESUME_SET), ref)
    real, calls = loop.atomic_torch_save, []

    def dying_save(obj, path):
        real(obj, path)
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
    monkeypatch.setattr(loop, "atomic_torch_save", dying_save)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*RESUME_SET), run)
    monkeypatch.setattr(loop, "atomic_torch_save", real)
    assert load_state(run)["step"] == 4 and load_state(run)["micro"] == 1   # mid-epoch checkpoint
    # what a SIGKILL can leave too: a torn metrics line and a checkpoint-sized temp file
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "train_lo')
    (run / ".last.pt.abc123.tmp").write_bytes(b"partial")
    train(None, resume=run)
    assert not list(run.glob(".*.tmp"))
    import json
    assert [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    a, b = load_state(ref), load_state(run)
    assert a["step"] == b["step"] == 6
    _same(a["model"], b["model"])
    _same(a["ema"], b["ema"])
    from safetensors.torch import load_file
    _same(load_file(ref / "best.safetensors"), load_file(run / "best.safetensors"))


@pytest.mark.slow
def test_kill_and_resume_ends_with_identical_weights(tmp_path):
    ref = tmp_path / "ref"
    train(tiny_config(*RESUME_SET), ref)

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "repvit", "train", "--recipe", "digits", "--out", str(run),
           *as_overrides(TINY + RESUME_SET)]
    proc = subprocess.Popen(cmd, env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    # kill hard as soon as a mid-epoch checkpoint (update 1 of epoch 2) exists
    while time.time() < deadline and proc.poll() is None:
        if (run / "last.pt").exists():
            try:
                if load_state(run)["step"] >= 4:
                    break
            except Exception:  # noqa: BLE001 - file being replaced right now; poll again
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = load_state(run)
    assert 0 < killed_at["step"] < 6

    train(None, resume=run)  # same code path as `repvit train --resume RUN_DIR`
    a, b = load_state(ref), load_state(run)
    assert a["step"] == b["step"] == 6
    _same(a["model"], b["model"])
    _same(a["ema"], b["ema"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        _same(a["optimizer"]["state"][k], b["optimizer"]["state"][k])
    epochs = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert len(epochs) == 2   # no duplicated epoch lines after the resume


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "nan"
    cfg = tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=8", "run.checkpoint_every_steps=1",
                      "optim.lr=1.0e+6", "optim.clip_mode=none", "schedule.warmup_epochs=0", "aug.smoothing=0.0")
    # lr 1e6 blows up within a few updates: either the loss turns NaN/inf, or a step with a finite loss overflows
    # the weights first (which of the two depends on the CPU's float kernels); both must stop before a checkpoint
    with pytest.raises(NonFiniteLossError, match=r"non-finite (loss|weights) .* update (\d+)") as err:
        train(cfg, run)
    failed_update = int(__import__("re").search(r"update (\d+)", str(err.value)).group(1))
    state = load_state(run)
    assert state["step"] == failed_update - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state["ema"].values() if v.is_floating_point())
    assert "last good checkpoint" in str(err.value)


def test_a_step_that_overflows_the_weights_stops_before_any_checkpoint(tmp_path, monkeypatch):
    """A step whose loss was finite can still leave inf in the weights (here: the optimizer's third step writes
    one, as an overflowing update would): the run stops right there, naming that update, and the checkpoint
    written after update 2 stays the last one, with finite weights."""
    import repvit.train.loop as loop
    real = loop.build_optimization

    def poisoned(*a, **kw):
        opt, sched = real(*a, **kw)
        step, calls = opt.step, []

        def bad_step(*sa, **skw):
            out = step(*sa, **skw)
            calls.append(1)
            if len(calls) == 3:
                with torch.no_grad():
                    opt.param_groups[0]["params"][0].view(-1)[0] = float("inf")
            return out
        opt.step = bad_step
        return opt, sched

    monkeypatch.setattr(loop, "build_optimization", poisoned)
    run = tmp_path / "inf"
    cfg = tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=5", "run.checkpoint_every_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights after epoch 1, update 3 .*last good checkpoint"):
        train(cfg, run)
    state = load_state(run)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()
