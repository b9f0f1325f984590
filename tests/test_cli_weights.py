"""`repvit models` and `repvit convert`, in-process and as `python -m repvit`."""

import json
import subprocess
import sys

import pytest
import torch

import repvit
from repvit.cli import main
from repvit.models import FACTS
from repvit.weights.io import read_checkpoint
from tests.conftest import randomize_bn


def test_models_table(tmp_path, capsys):
    assert main(["models", "--no-macs", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "m.json").read_text())
    assert [r["variant"] for r in rows] == repvit.list_models()
    for r in rows:
        assert r["train_params"] == FACTS[r["variant"]].train_params_single_head
        assert r["deploy_params"] == FACTS[r["variant"]].fused_params
        assert r["variant"] in out
    assert "| repvit_m0_9 | 5.10 | 5.07 |" in out


def test_convert_between_formats(tmp_path, capsys):
    m = randomize_bn(repvit.create_model("repvit_m1_1", distillation=True)).eval()
    torch.save({"model": repvit.weights.layouts.ours_to_official(m.state_dict())}, tmp_path / "off.pth")
    assert main(["convert", str(tmp_path / "off.pth"), str(tmp_path / "ours.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "ours.safetensors"), str(tmp_path / "timm_deploy.safetensors"),
                 "--to", "timm", "--deploy"]) == 0
    out = capsys.readouterr().out
    assert "official-format checkpoint" in out and "deploy form" in out
    ck = read_checkpoint(tmp_path / "timm_deploy.safetensors")
    assert ck.source_format == "timm" and ck.info.form == "deploy"
    d = repvit.create_model("repvit_m1_1", checkpoint=tmp_path / "timm_deploy.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(d(x), m(x), rtol=1e-4, atol=1e-4)


def test_cli_errors_are_one_clean_line(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint at all")
    torch.save({"w": torch.zeros(100)}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    for name, says in (("bad.pth", "is not a PyTorch or safetensors checkpoint"), ("cut.pth", "truncated or corrupt")):
        r = subprocess.run([sys.executable, "-m", "repvit", "convert", str(tmp_path / name), str(tmp_path / "o.st")],
                           capture_output=True, text=True)
        assert r.returncode == 2
        assert "repvit convert: error:" in r.stderr and says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_convert_never_overwrites_its_source_or_an_existing_file_unasked(tmp_path, capsys):
    """A convert onto its own source with --deploy used to destroy the train-form weights; an existing OUT needs
    --force; the official layout is a pickle, so a .safetensors name for it is refused."""
    m = repvit.create_model("repvit_m0_6", num_classes=10, in_chans=1)
    src = tmp_path / "best.safetensors"
    repvit.save_checkpoint(m, src)
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(src)
    for same in (f"{tmp_path}/sub/../best.safetensors", str(tmp_path / "link.safetensors")):   # other spellings
        assert main(["convert", str(src), same, "--deploy", "--force"]) == 2
        assert "OUT is the SOURCE" in capsys.readouterr().err and src.read_bytes() == before
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"keep me")
    assert main(["convert", str(src), str(other)]) == 2
    assert "--force" in capsys.readouterr().err and other.read_bytes() == b"keep me"
    assert main(["convert", str(src), str(other), "--force", "--deploy"]) == 0
    assert read_checkpoint(other).info.form == "deploy"
    assert main(["convert", str(src), str(tmp_path / "off.safetensors"), "--to", "official"]) == 2
    assert "name the output *.pth" in capsys.readouterr().err and not (tmp_path / "off.safetensors").exists()
    repvit.save_checkpoint(m, tmp_path / "model_best.pth.tar", format="official")   # other pickle names stay fine
    assert read_checkpoint(tmp_path / "model_best.pth.tar").source_format == "official"


def test_convert_says_when_preprocessing_is_dropped_or_defaulted(tmp_path, capsys):
    m = repvit.create_model("repvit_m0_6", num_classes=10, in_chans=1)
    pre = {"input_size": [1, 32, 32], "mean": [0.286], "std": [0.353], "interpolation": "bilinear", "crop_pct": 1.0}
    repvit.save_checkpoint(m, tmp_path / "a.safetensors", preprocessing=pre)
    # timm's layout as safetensors keeps it in the metadata: a round trip loses nothing, and timm loads the file
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "t.safetensors"), "--to", "timm"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "t.safetensors"), str(tmp_path / "rt.safetensors")]) == 0
    assert read_checkpoint(tmp_path / "rt.safetensors").metadata["preprocessing"] == pre
    from safetensors.torch import load_file
    assert all(k.startswith(("stem.", "stages.", "head.")) for k in load_file(str(tmp_path / "t.safetensors")))
    # ... as a pickle it cannot: said, and a file without it converted into ours holds the defaults: said
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "t.pth"), "--to", "timm"]) == 0
    assert "records no preprocessing" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "t.pth"), str(tmp_path / "back.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "records no preprocessing" in out and "defaults" in out
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "same.safetensors")]) == 0
    assert "note:" not in capsys.readouterr().out                        # ours -> ours keeps it: nothing to say
    assert read_checkpoint(tmp_path / "same.safetensors").metadata["preprocessing"]["input_size"] == [1, 32, 32]


def test_cli_tells_our_errors_from_unexpected_ones(monkeypatch, capsys):
    """Our own errors are one 'error:' line with exit 2; a RuntimeError from inside torch (a bug or out of memory)
    is flagged as unexpected with exit 1 instead of passing for a user mistake; a KeyError (always a bug) is not
    swallowed at all."""
    import repvit.weights.commands as wc

    def torch_fails(args):
        torch.zeros(2) @ torch.zeros(3)          # raises RuntimeError inside torch
    def ours_fails(args):
        from repvit.train.dist import init_distributed
        init_distributed("cuda")                 # raises our RuntimeError here (no GPU on the test machine)
    def bug(args):
        return {}["val_top1"]
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA for the package-raised error")
    for fn, rc, said in [(ours_fails, 2, "repvit convert: error: run.device=cuda"),
                         (torch_fails, 1, "unexpected RuntimeError")]:
        monkeypatch.setattr(wc, "_convert", fn)
        assert main(["convert", "a.safetensors", "b.safetensors"]) == rc
        assert said in capsys.readouterr().err
    monkeypatch.setattr(wc, "_convert", bug)
    with pytest.raises(KeyError):
        main(["convert", "a.safetensors", "b.safetensors"])
