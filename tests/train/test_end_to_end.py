"""A short real training on digits: accuracy, artefacts of the run directory, eval and plot commands."""

from __future__ import annotations

import json

import pytest
import torch

import repvit
from repvit.cli import main
from repvit.train import train
from repvit.train.config import config_from_dict
from repvit.weights.io import read_checkpoint

from trainhelpers import load_state, tiny_config


def test_short_run_writes_the_run_directory_contract(tmp_path, capsys):
    """Fast: 2 updates, then every artefact, `repvit eval --json` and `repvit plot`."""
    run = tmp_path / "run"
    res = train(tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=2"), run)
    for f in ("config.yaml", "metrics.jsonl", "last.pt", "best.safetensors", "deploy.safetensors", "train.log"):
        assert (run / f).is_file(), f
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 0 and row["step"] == 2 and {"train_loss", "val_top1", "val_top5"} <= set(row)
    assert main(["eval", str(run / "deploy.safetensors"), "--data", "digits", "--max-samples", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 64 and 0.0 <= out["top1"] <= out["top5"] <= 100.0
    assert abs(out["top1"] - res.deploy_top1) < 1e-6    # same 64 images as the run's validation subset
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", str(tmp_path / "missing.safetensors"), "--data", "digits"]) == 2
    assert "not found" in capsys.readouterr().err
    # `repvit convert last.pt` names the run's own checkpoint as ours (it has timm-like keys, but is not timm's)
    ck = read_checkpoint(run / "last.pt", use_ema=True)
    assert ck.source_format == "repvit" and ck.used_ema and ck.metadata["preprocessing"]["input_size"] == [1, 16, 16]
    assert main(["convert", str(run / "last.pt"), str(tmp_path / "ema.safetensors"), "--use-ema", "--deploy"]) == 0
    out = capsys.readouterr().out
    assert "repvit-format checkpoint" in out and "timm-format" not in out


def test_four_epoch_digits_run_learns(tmp_path):
    """Fast (about 10 s): the loop really learns. 4 epochs of 22 updates on 16x16 digits reach about 95-97 %
    top-1 on all 359 validation images (chance: 10 %), and the training loss falls every epoch.

    Not fewer epochs: the validation accuracy lags far behind the training loss until the cosine schedule's last,
    low-lr epoch (BatchNorm's running statistics trail weights that still move fast; measured: near chance after
    2 epochs, 23-60 % after 3 of 4, 95-97.5 % after the 4th for seeds 0-2)."""
    res = train(tiny_config("schedule.epochs=4", "data.max_val_samples=null"), tmp_path / "run")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    losses = [r["train_loss"] for r in rows]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses      # measured 1.35, 0.69, 0.61, 0.58
    assert losses[-1] < 0.6 * losses[0], losses
    assert rows[-1]["val_top1"] > 60.0, rows[-1]                       # 5x chance; measured 95-97.5
    assert res.best_top1 > 60.0 and res.deploy_top1 is not None and res.deploy_top1 > 60.0, res.summary


@pytest.mark.slow
def test_digits_run_reaches_90_percent_and_writes_everything(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_config("schedule.epochs=4", "data.max_val_samples=null", "run.channels_last=true")
    res = train(cfg, run)
    assert res.best_top1 > 90.0, res.summary
    assert res.deploy_top1 is not None and res.deploy_top1 > 90.0

    # run directory contract
    saved = config_from_dict(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    assert saved == cfg
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert all({"epoch", "train_loss", "val_top1", "ema_val_top1", "lr"} <= set(r) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 4 and state["step"] == 4 * 22 and state["config"]["model"]["name"] == "repvit_m0_6"

    # both saved models load with the public API; the deploy one is fused and agrees with the train form
    best = repvit.create_model("repvit_m0_6", checkpoint=run / "best.safetensors").eval()
    dep = repvit.create_model("repvit_m0_6", checkpoint=run / "deploy.safetensors").eval()
    assert dep.deploy and not best.deploy and best.in_chans == 1 and best.num_classes == 10
    assert best.preprocessing["input_size"] == [1, 16, 16]
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(best(x), dep(x), atol=1e-4)

    # repvit eval: the last printed line is JSON with top1/top5; deploy form gives the same accuracy
    assert main(["eval", str(run / "deploy.safetensors"), "--data", "digits", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(out["top1"] - res.deploy_top1) < 1e-6 and out["top5"] >= out["top1"] and out["n"] == 359
    assert main(["eval", str(run), "--data", "digits", "--form", "deploy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["weights"] for r in out["results"]} == {"raw", "ema"}
    assert out["top1"] == next(r["top1"] for r in out["results"] if r["weights"] == "ema")

    # repvit plot draws a PNG
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_loss_is_computed_in_float32_under_bf16_autocast(tmp_path, monkeypatch):
    """Autocast returns bf16 logits; the loss (log_softmax, the batch mean) runs outside its block, so it must get
    them as float32, as timm and DeiT compute it inside autocast (where log_softmax is a float32 op)."""
    import repvit.train.loop as loop
    seen, produced = [], []
    build_loss, build_student = loop._build_loss, loop.build_student

    def recording_loss(*a, **k):
        crit = build_loss(*a, **k)
        real = crit.forward

        def forward(out, *fa, **fk):
            seen.extend(o.dtype for o in (out if isinstance(out, (tuple, list)) else (out,)))
            return real(out, *fa, **fk)
        crit.forward = forward
        return crit

    def recording_student(*a, **k):
        m = build_student(*a, **k)
        m.register_forward_hook(lambda mod, inp, out: produced.append(out.dtype) if mod.training else None)
        return m

    monkeypatch.setattr(loop, "_build_loss", recording_loss)
    monkeypatch.setattr(loop, "build_student", recording_student)
    train(tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=2", "run.amp=bf16"), tmp_path / "run")
    assert produced and set(produced) == {torch.bfloat16}      # autocast was on
    assert seen and set(seen) == {torch.float32}


def test_step_per_epoch_follows_the_official_lr_staircase(tmp_path, monkeypatch):
    """schedule.step_per=epoch (the ImageNet recipes): the official loop calls lr_scheduler.step(epoch) after each
    epoch, so epochs 0 and 1 run at warmup_lr and epoch e >= 1 at the schedule's value at e - 1; every update of an
    epoch uses the same lr. Expected values computed by hand (linear warmup over 2 epochs, cosine over 5)."""
    import math

    import repvit.train.loop as loop
    lrs: list[float] = []
    build = loop.build_optimization

    def recording(*a, **k):
        opt, sched = build(*a, **k)
        real = opt.step

        def step(*sa, **sk):
            lrs.append(opt.param_groups[0]["lr"])
            return real(*sa, **sk)
        opt.step = step
        return opt, sched

    monkeypatch.setattr(loop, "build_optimization", recording)
    base, warm, low = 0.01, 1e-4, 1e-5
    cfg = tiny_config("schedule.epochs=5", "schedule.warmup_epochs=2", f"schedule.warmup_lr={warm}",
                      f"schedule.min_lr={low}", "schedule.step_per=epoch", f"optim.lr={base}",
                      "run.max_steps_per_epoch=2", "ema.enabled=false")
    train(cfg, tmp_path / "run")

    def official(t: int) -> float:          # timm's cosine with warmup (warmup_prefix off), at epoch t
        if t < 2:
            return warm + t * (base - warm) / 2
        return low + 0.5 * (base - low) * (1 + math.cos(math.pi * t / 5))
    want = [warm] + [official(e - 1) for e in range(1, 5)]
    got = [lrs[2 * e:2 * e + 2] for e in range(5)]
    assert all(a == b for a, b in got), got                     # one lr per epoch
    assert [a for a, _ in got] == pytest.approx(want, rel=1e-9)


def test_gradient_checkpointing_trains_the_same_weights_and_statistics(tmp_path):
    """run.grad_checkpointing only trades memory for compute: the weights, the BatchNorm statistics and the EMA
    after a few updates equal those of the same run without it (drop path on, so its replay is covered too)."""
    common = ["schedule.epochs=1", "run.max_steps_per_epoch=3", "run.seed=4", "model.drop_path_rate=0.1"]
    train(tiny_config(*common), tmp_path / "plain")
    train(tiny_config(*common, "run.grad_checkpointing=true"), tmp_path / "ckpt")
    a, b = load_state(tmp_path / "plain"), load_state(tmp_path / "ckpt")
    assert b["config"]["run"]["grad_checkpointing"] is True
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], msg=f"{part}.{k}")
