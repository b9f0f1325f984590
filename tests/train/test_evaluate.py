"""evaluate(): top-1/top-5/loss against a hand computation, and horizontal-flip test-time augmentation."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from repvit.cli import main
from repvit.train import train
from repvit.train.evaluate import evaluate

from trainhelpers import tiny_config


class _Batches(TensorDataset):
    """(x, y) items; evaluate()'s collate appends the skipped-image count."""


class _LeftHeavy(nn.Module):
    """Logits from the left and right halves with different weights: a model that is NOT mirror-invariant."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wl, self.wr = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        return x[..., :w].mean((-2, -1)) @ self.wl + x[..., w:].mean((-2, -1)) @ self.wr


def _data(n: int = 37) -> _Batches:
    g = torch.Generator().manual_seed(1)
    return _Batches(torch.randn(n, 3, 6, 8, generator=g), torch.randint(0, 5, (n,), generator=g))


def _by_hand(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    top5 = logits.topk(5, 1).indices
    return {"top1": 100.0 * (top5[:, 0] == y).float().mean().item(),
            "top5": 100.0 * (top5 == y[:, None]).any(1).float().mean().item()}


def test_plain_and_flip_tta_match_a_hand_computation():
    model, ds = _LeftHeavy(), _data()
    x, y = ds.tensors
    cpu = torch.device("cpu")

    plain = evaluate(model, ds, device=cpu, batch_size=8)
    ref = _by_hand(model(x), y)
    assert plain["n"] == len(y) and plain["top1"] == pytest.approx(ref["top1"]) and plain["top5"] == ref["top5"]
    assert plain["loss"] == pytest.approx(nn.functional.cross_entropy(model(x), y).item(), rel=1e-5)

    flip = evaluate(model, ds, device=cpu, batch_size=8, tta="flip")
    p = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2        # mean of the two views' probabilities
    ref = _by_hand(p, y)
    assert flip["top1"] == pytest.approx(ref["top1"]) and flip["top5"] == pytest.approx(ref["top5"])
    assert flip["loss"] == pytest.approx(nn.functional.nll_loss(p.log(), y).item(), rel=1e-5)
    assert flip["loss"] != pytest.approx(plain["loss"], rel=1e-3)      # the mirror view really was used


def test_flip_tta_changes_nothing_for_a_mirror_invariant_model():
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    ds = _data()
    a = evaluate(pooled, ds, device=torch.device("cpu"), batch_size=8)
    b = evaluate(pooled, ds, device=torch.device("cpu"), batch_size=8, tta="flip")
    assert a["top1"] == b["top1"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_unknown_tta_mode_is_refused():
    with pytest.raises(ValueError, match="tta must be one of none, flip"):
        evaluate(_LeftHeavy(), _data(), device=torch.device("cpu"), tta="five-crop")


def test_eval_cli_passes_the_tta_mode_through(tmp_path, capsys, monkeypatch):
    ev = sys.modules["repvit.train.evaluate"]     # the package re-exports a function of the same name

    seen, real = [], ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: seen.append(k["tta"]) or real(*a, **k))
    run = tmp_path / "run"
    train(tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=2"), run)
    args = ["eval", str(run / "deploy.safetensors"), "--data", "digits", "--max-samples", "64", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--tta", "flip"]) == 0
    flip = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["tta"] == "none" and flip["tta"] == "flip" and flip["n"] == plain["n"] == 64
    assert seen == ["none", "flip"]


def test_eval_of_a_checkpoint_list_reports_members_and_their_mean_probability_ensemble(tmp_path, capsys):
    from repvit.data import build_data
    from repvit.train.builder import model_from_file
    from repvit.train.config import AugConfig

    runs = []
    for seed in (0, 1):     # two different students of the same data
        run = tmp_path / f"run{seed}"
        train(tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=3", f"run.seed={seed}"), run)
        runs.append(run)
    files = [str(r / "deploy.safetensors") for r in runs]
    assert main(["eval", ",".join(files), "--data", "digits", "--max-samples", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["weights"] for r in res["results"]] == files + ["ensemble"]
    assert res["top1"] == res["results"][-1]["top1"] and res["results"][-1]["members"] == 2

    # the same numbers by hand: load both models, average their softmax outputs on the same 64 images
    models = [model_from_file(f).eval() for f in files]
    cfg = tiny_config()
    cfg.data.img_size, cfg.data.max_val_samples = 16, 64
    cfg.data.mean, cfg.data.std = tuple(models[0].preprocessing["mean"]), tuple(models[0].preprocessing["std"])
    ds = build_data(cfg.data, AugConfig(), train=False).val
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        probs = [m(x).softmax(1) for m in models]
    for r, p in zip(res["results"], probs + [sum(probs) / 2]):
        assert r["top1"] == pytest.approx(_by_hand(p, y)["top1"])
    assert res["results"][-1]["loss"] == pytest.approx(nn.functional.nll_loss((sum(probs) / 2).log(), y).item(),
                                                       rel=1e-4)


def test_eval_of_a_checkpoint_list_refuses_members_with_different_inputs(tmp_path):
    from repvit.train.evaluate import evaluate_checkpoint

    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=1"), a)
    train(tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=1", "data.img_size=20"), b)
    with pytest.raises(ValueError, match=r"ensemble member .*b/deploy.safetensors.* input_size"):
        evaluate_checkpoint(f"{a}/deploy.safetensors,{b}/deploy.safetensors", "digits", max_samples=8)
    with pytest.raises(ValueError, match="empty entry"):
        evaluate_checkpoint(f"{a}/deploy.safetensors,", "digits", max_samples=8)


def test_eval_uses_the_crop_the_checkpoint_records(tmp_path):
    """Size, mean/std and interpolation came from the checkpoint but the crop from the flag's default: a model
    validated with crop 0.95 during training was scored at 0.875 without a word."""
    import repvit
    from repvit.train.evaluate import evaluate_checkpoint
    m = repvit.create_model("repvit_m0_6", num_classes=10, in_chans=1).eval()
    ck = tmp_path / "m.safetensors"
    repvit.save_checkpoint(m, ck, preprocessing={"input_size": [1, 32, 32], "mean": [0.5], "std": [0.5],
                                                 "interpolation": "bilinear", "crop_pct": 0.95})
    res = evaluate_checkpoint(str(ck), "digits", max_samples=16, num_workers=0)
    assert res["eval_crop"] == "timm" and not any("overrides" in n for n in res["notes"])
    res = evaluate_checkpoint(str(ck), "digits", max_samples=16, num_workers=0, eval_crop="official")
    assert res["eval_crop"] == "official" and any("overrides the checkpoint's recorded crop (timm" in n
                                                  for n in res["notes"])
    with pytest.raises(ValueError, match="--max-samples must be >= 0"):
        evaluate_checkpoint(str(ck), "digits", max_samples=-5, num_workers=0)


def test_eval_of_a_directory_without_last_pt_says_what_to_pass(tmp_path):
    from repvit.train.evaluate import evaluate_checkpoint
    with pytest.raises(FileNotFoundError, match="is a directory without a last.pt; pass a checkpoint file"):
        evaluate_checkpoint(str(tmp_path), "digits", num_workers=0)


def test_eval_refuses_bad_sizes_counts_and_an_absent_gpu_as_user_errors(tmp_path, capsys):
    """--img-size 0 used to evaluate at 224 silently, a negative size and --device cuda without a GPU ended as
    'unexpected' errors (exit 1, 'please report it'): they are the user's to fix (exit 2, one line)."""
    import repvit
    from repvit.cli import main
    from repvit.train.evaluate import evaluate_checkpoint
    ck = tmp_path / "m.safetensors"
    repvit.save_checkpoint(repvit.create_model("repvit_m0_6", num_classes=10, in_chans=1), ck)
    for bad in (["--img-size", "0"], ["--img-size", "-5"], ["--batch-size", "0"], ["--workers", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(["eval", str(ck), "--data", "digits", *bad])
        assert e.value.code == 2 and "must be >= " in capsys.readouterr().err
    with pytest.raises(ValueError, match="--img-size must be a positive"):
        evaluate_checkpoint(str(ck), "digits", img_size=0, num_workers=0)
    if not torch.cuda.is_available():
        assert main(["eval", str(ck), "--data", "digits", "--device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err
    assert main(["eval", str(ck), "--data", "digits", "--device", "tpu7"]) == 2
    assert "is not a device name" in capsys.readouterr().err
