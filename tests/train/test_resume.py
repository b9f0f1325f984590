"""Exact resume after a SIGKILL, and the non-finite loss stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _same_optimizer(a: dict, b: dict) -> None:
    """AdamW's moments and step counts of every parameter, and the param groups (lr, decay), bit for bit."""
    assert a["state"] and a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        _same(a["state"][k], b["state"][k])
    assert a["param_groups"] == b["param_groups"]


def _metrics(run) -> list[dict]:
    import json
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _same_metrics(ref: list[dict], got: list[dict]) -> None:
    """Every metric of every epoch equal, timings aside (train_loss bit-for-bit: same losses, same order)."""
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("epoch_time_s", "train_img_s"):
                assert a[k] == b[k], (a["epoch"], k, a[k], b[k])


@pytest.mark.parametrize("workers", [0, 2])
def test_crash_after_checkpoint_then_resume_is_exact(tmp_path, monkeypatch, workers):
    """Fast, in-process: the run dies right after its 4th checkpoint write, then resumes. The reference runs
    without loader workers, the interrupted run with ``workers``: augmentations are seeded per sample, so
    neither the worker count nor the resume point may change them."""
    import repvit.train.loop as loop
    ref = tmp_path / "ref"
    train(tiny_config(*RESUME_SET, "data.num_workers=0"), ref)
    real, calls = loop.atomic_torch_save, []

    def dying_save(obj, path):
        real(obj, path)
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
    monkeypatch.setattr(loop, "atomic_torch_save", dying_save)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*RESUME_SET, f"data.num_workers={workers}"), run)
    monkeypatch.setattr(loop, "atomic_torch_save", real)
    assert load_state(run)["step"] == 4 and load_state(run)["micro"] == 1   # mid-epoch checkpoint
    # what a SIGKILL can leave too: a torn metrics line and a checkpoint-sized temp file
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "train_lo')
    (run / ".last.pt.abc123.tmp").write_bytes(b"partial")
    assert load_state(run)["epoch_acc"][0]["seen"] > 0      # the interrupted epoch's accumulators are saved
    train(None, resume=run)
    assert not list(run.glob(".*.tmp"))
    assert [m["epoch"] for m in _metrics(run)] == [0, 1]
    _same_metrics(_metrics(ref), _metrics(run))                # the resumed epoch counts its first part too
    a, b = load_state(ref), load_state(run)
    assert a["step"] == b["step"] == 6
    _same(a["model"], b["model"])
    _same(a["ema"], b["ema"])
    _same_optimizer(a["optimizer"], b["optimizer"])
    assert a["scheduler"] == b["scheduler"]
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
    _same_optimizer(a["optimizer"], b["optimizer"])
    epochs = _metrics(run)
    assert len(epochs) == 2   # no duplicated epoch lines after the resume
    _same_metrics(_metrics(ref), epochs)   # the resumed epoch's train_loss and counts cover the whole epoch


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


# ---- resume records: --set on --resume, best.safetensors vs. the checkpoint's best, RNG of new ranks

TWO_EPOCHS = ["schedule.epochs=2", "run.max_steps_per_epoch=2", "run.keep_last=2", "run.seed=5"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run (checkpoint-epoch0001.pt and 0002.pt kept); tests work on copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    res = train(tiny_config(*TWO_EPOCHS), run)
    from repvit.train.loop import _read_best_record
    rec = _read_best_record(run / "best.safetensors")     # the best file describes its own weights
    assert rec is not None and (rec["top1"], rec["epoch"] + 1, rec["source"]) == (
        res.best_top1, res.best_epoch, res.best_source)
    return run


def _copy(run, dst):
    import shutil
    return Path(shutil.copytree(run, dst))


def _cli(capsys, *args):
    from repvit.cli import main
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_resume_accepts_only_the_allowed_set_keys_and_records_them(finished_run, tmp_path, capsys, monkeypatch):
    import types

    import yaml

    from repvit.train.config import RESUME_OVERRIDABLE
    run = _copy(finished_run, tmp_path / "run")
    ckpt = run / "checkpoint-epoch0001.pt"
    rc, _, err = _cli(capsys, "train", "--resume", str(ckpt), "--set", "optim.base_lr=1e-4", "--set", "run.amp=bf16")
    assert rc == 2 and "optim.base_lr" in err and "run.amp," not in err.split("Allowed")[0]
    assert all(k in err for k in RESUME_OVERRIDABLE) and "model.pretrained=" in err    # the list, and what instead
    with pytest.raises(ValueError, match="Allowed with --resume"):
        train(None, resume=ckpt, overrides=["run.seed=1"])
    assert load_state(run)["step"] == 4                  # nothing ran

    writers = []

    class Writer:                                        # TensorBoard, turned on mid-run: records its arguments
        def __init__(self, *a, **kw):
            writers.append(kw)

        def add_scalar(self, *a, **kw):
            pass

        def close(self):
            pass
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    rc, _, err = _cli(capsys, "train", "--resume", str(ckpt), "--set", "optim.clip_grad=0.5", "--set", "run.keep_last=1",
                      "--set", "run.tensorboard=true")
    assert rc == 0, err
    assert writers == [{"purge_step": 1}]                 # epoch 2 (step 1) is redone: its old scalars go
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["clip_grad"] == 0.5 and cfg["run"]["keep_last"] == 1 and cfg["run"]["seed"] == 5
    st = load_state(run)
    assert st["step"] == 4 and st["config"]["optim"]["clip_grad"] == 0.5      # later resumes keep the change
    assert sorted(p.name for p in run.glob("checkpoint-epoch*.pt")) == ["checkpoint-epoch0002.pt"]   # keep_last=1
    log = (run / "train.log").read_text()
    assert "resume overrides: optim.clip_grad=0.5 (was 5.0); run.keep_last=1 (was 2); run.tensorboard=True (was False)" in log
    assert f"resumed from {ckpt}: epoch 2/2, micro-batch 0, after update 2" in log


def _weights_file(path) -> tuple[dict, dict]:
    """A safetensors file's metadata and tensors (its bytes vary: the header's key order is not fixed)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _stale_best(run, record: dict) -> bytes:
    """Overwrite run/best.safetensors as a continuation after the checkpoint would have: other weights (last.pt's
    EMA), its own record. Returns the new file's bytes."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    best = run / "best.safetensors"
    with safe_open(str(best), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v.contiguous() for k, v in load_state(run)["ema"].items()}
    meta["train_best"] = json.dumps(record)
    save_file(tensors, str(best), metadata=meta)
    return best.read_bytes()


@pytest.mark.parametrize("case", ["abandoned", "missing"])
def test_resume_from_an_older_checkpoint_keeps_its_own_best(finished_run, tmp_path, case):
    """``--resume RUN/checkpoint-epoch0001.pt`` after the run went on: a best.safetensors written later (by the
    abandoned continuation) is set aside, not adopted; the checkpoint's record stays, and as it holds those
    weights (its best epoch is the one just before it) best.safetensors is rewritten from them. The resumed
    epoch 2 does not beat epoch 1 (as in the original run): the run ends with the checkpoint's best on disk,
    the very file the original run wrote, and the summary describing it. A missing best file is
    rewritten the same way."""
    import json

    from repvit.train.loop import _read_best_record
    run = _copy(finished_run, tmp_path / "run")
    best = run / "best.safetensors"
    original = _weights_file(best)
    ckpt = run / "checkpoint-epoch0001.pt"
    mine = torch.load(ckpt, map_location="cpu", weights_only=True)["best"]
    assert mine["epoch"] == 0 and _read_best_record(best) == mine
    if case == "abandoned":
        # unbeatable, so a record adopted on resume would survive to the summary
        stale = _stale_best(run, {"epoch": 1, "top1": 100.0, "source": "ema"})
    else:
        best.unlink()
    res = train(None, resume=ckpt)
    assert (res.best_top1, res.best_epoch, res.best_source) == (mine["top1"], 1, mine["source"])
    s = json.loads((run / "summary.json").read_text())
    assert (s["best_top1"], s["best_epoch"], s["best_source"]) == (mine["top1"], 1, mine["source"])
    assert load_state(run)["best"] == mine
    meta, tensors = _weights_file(best)                      # the weights the summary describes are on disk:
    assert meta == original[0]                               # the file the original run wrote at epoch 1
    _same(tensors, original[1])
    assert [m["epoch"] for m in _metrics(run)] == [0, 1]     # the abandoned epoch's line is replaced, not doubled
    log = (run / "train.log").read_text()
    assert "best.safetensors is rewritten from the weights of this checkpoint's best, epoch 1" in log
    if case == "abandoned":
        assert (run / "best-abandoned.safetensors").read_bytes() == stale      # set aside, not lost
        assert ("best.safetensors holds the ema weights of epoch 2 (top-1 100.00), written after this checkpoint "
                "by a continuation that this resume abandons; moved to best-abandoned.safetensors") in log
    else:
        assert not (run / "best-abandoned.safetensors").exists()


def test_a_resumed_finished_run_sets_its_final_files_aside_until_it_finishes(finished_run, tmp_path, monkeypatch):
    """While a finished run continues from an older checkpoint, summary.json and deploy.safetensors would describe
    the abandoned continuation (and summary.json says "finished"): they are moved aside at the resume, not lost."""
    import repvit.train.loop as loop
    run = _copy(finished_run, tmp_path / "run")
    summary, deploy = (run / "summary.json").read_bytes(), (run / "deploy.safetensors").read_bytes()

    def killed(obj, path):
        raise KeyboardInterrupt("simulated kill at the first checkpoint of the resumed run")
    monkeypatch.setattr(loop, "atomic_torch_save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(None, resume=run / "checkpoint-epoch0001.pt")
    assert not (run / "summary.json").exists() and not (run / "deploy.safetensors").exists()
    assert (run / "summary-abandoned.json").read_bytes() == summary
    assert (run / "deploy-abandoned.safetensors").read_bytes() == deploy
    assert "moved aside until it finishes again: summary.json -> summary-abandoned.json" in (run / "train.log").read_text()


def test_a_best_file_written_after_a_mid_epoch_checkpoint_is_not_adopted(tmp_path, monkeypatch):
    """Killed after a mid-epoch checkpoint, once the best file had been rewritten (the epoch's end evaluated,
    last.pt not yet written): the file's record is from after the resume point. The checkpoint does not hold
    the weights of its own best (epoch 1; it is mid-epoch 2), so that record is dropped and the redone epoch 2
    writes the best file the summary then describes."""
    import repvit.train.loop as loop
    from repvit.train.loop import _read_best_record
    real, calls = loop.atomic_torch_save, []

    def dying_save(obj, path):
        real(obj, path)
        calls.append(path)
        if len(calls) == 3:                  # update 1 (mid-epoch), end of epoch 1, update 3 (mid-epoch 2)
            raise KeyboardInterrupt("simulated kill")
    monkeypatch.setattr(loop, "atomic_torch_save", dying_save)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*TWO_EPOCHS, "run.checkpoint_every_steps=1"), run)
    monkeypatch.setattr(loop, "atomic_torch_save", real)
    st = load_state(run)
    assert (st["epoch"], st["micro"], st["best"]["epoch"]) == (1, 1, 0)
    stale = _stale_best(run, {"epoch": 1, "top1": 100.0, "source": "ema"})
    res = train(None, resume=run)
    ep2 = _metrics(run)[1]
    assert ep2["epoch"] == 1 and res.best_epoch == 2
    assert res.best_top1 == max(ep2["val_top1"], ep2["ema_val_top1"])
    assert _read_best_record(run / "best.safetensors") == {"epoch": 1, "top1": res.best_top1, "source": res.best_source}
    assert (run / "best-abandoned.safetensors").read_bytes() == stale
    assert "so that record is dropped: this run's next evaluated epoch writes a new best.safetensors" in (
        run / "train.log").read_text()


def test_a_rank_without_saved_rng_gets_its_own_stream():
    """Resuming with more processes: a new rank must not replay rank 0's random stream."""
    from repvit.train.checkpoint import capture_rng
    from repvit.train.loop import _restore_rank_rng
    torch.manual_seed(123)
    saved = [capture_rng()]

    def draw(rank, seed=0, step=7):
        restored = _restore_rank_rng(saved, rank, seed, step)
        return restored, torch.rand(4)
    ok0, r0 = draw(0)
    ok1, r1 = draw(1)
    ok2, r2 = draw(2)
    assert ok0 and not ok1 and not ok2
    assert not torch.equal(r0, r1) and not torch.equal(r1, r2) and not torch.equal(r0, r2)
    assert torch.equal(draw(1)[1], r1)                  # deterministic: the same seed, rank and step
    assert not torch.equal(draw(1, step=8)[1], r1)      # ... and tied to the resume position


def test_non_finite_weights_on_another_rank_stop_this_one_too(tmp_path, monkeypatch):
    """BatchNorm buffers differ per rank: the not-finite flag is all-reduced, so a rank whose own weights are
    finite stops with the rank that overflowed instead of waiting for it in the next collective."""
    import repvit.train.dist as dist
    import repvit.train.loop as loop
    from repvit.train.dist import DistInfo
    calls = []

    def other_rank_bad(t):
        calls.append(t.clone())
        return t.add_(1.0)                               # the other rank reports a non-finite tensor
    monkeypatch.setattr(dist, "all_reduce_sum", other_rank_bad)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    di = DistInfo(rank=1, world_size=2)
    with pytest.raises(NonFiniteLossError, match="update 3 on another rank"):
        loop._check_finite_weights(model, di, 0, 3, tmp_path)
    assert len(calls) == 1 and calls[0].item() == 0.0   # this rank joined the reduction with "finite"
    model[1].running_var.fill_(float("inf"))
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t)
    with pytest.raises(NonFiniteLossError, match=r"update 3 \(its loss"):
        loop._check_finite_weights(model, di, 0, 3, tmp_path)


def test_rotate_replaces_atomically_also_when_hard_links_fail(tmp_path, monkeypatch):
    import os

    from repvit.train.checkpoint import rotate
    (tmp_path / "last.pt").write_bytes(b"new")
    (tmp_path / "checkpoint-epoch0003.pt").write_bytes(b"old")
    (tmp_path / "checkpoint-epoch0001.pt").write_bytes(b"oldest")

    def no_links(*a):
        raise OSError("no hard links here")
    monkeypatch.setattr(os, "link", no_links)
    rotate(tmp_path, 3, keep_last=1)
    assert (tmp_path / "checkpoint-epoch0003.pt").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-epoch0003.pt", "last.pt"]   # no temp left


@pytest.mark.parametrize("keep_last", [1, 2])
def test_rotate_after_resuming_an_older_checkpoint_keeps_this_runs_checkpoints(tmp_path, keep_last):
    """Resumed from checkpoint-epoch0001.pt of a run that had reached epoch 3: at the end of epoch 2 the
    checkpoint just written is kept, and those of the abandoned continuation (epoch 3) go."""
    from repvit.train.checkpoint import rotate
    for n in (1, 2, 3):
        (tmp_path / f"checkpoint-epoch{n:04d}.pt").write_bytes(b"old %d" % n)
    (tmp_path / "last.pt").write_bytes(b"new")
    rotate(tmp_path, 2, keep_last=keep_last)
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-epoch*.pt"))
    assert kept == ["checkpoint-epoch0001.pt", "checkpoint-epoch0002.pt"][-keep_last:]
    assert (tmp_path / "checkpoint-epoch0002.pt").read_bytes() == b"new"


def test_rotate_with_keep_last_zero_still_removes_the_abandoned_continuations_checkpoints(tmp_path):
    """keep_last can be lowered to 0 on --resume: no checkpoint is written, but the abandoned continuation's
    files of this epoch and later (another trajectory) must not stay next to this run's."""
    from repvit.train.checkpoint import rotate
    for n in (1, 2, 3):
        (tmp_path / f"checkpoint-epoch{n:04d}.pt").write_bytes(b"old %d" % n)
    (tmp_path / "last.pt").write_bytes(b"new")
    rotate(tmp_path, 2, keep_last=0)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-epoch*.pt")) == ["checkpoint-epoch0001.pt"]
