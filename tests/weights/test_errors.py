"""Bad checkpoints and mismatches give errors that say what is wrong and what to do."""

import os
import pickle

import pytest
import torch

import repvit
from repvit.weights import CheckpointFormatError, CheckpointMismatchError


def test_checkpoint_of_another_variant(tmp_path):
    repvit.save_checkpoint(repvit.create_model("repvit_m1_1"), tmp_path / "m11.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"repvit_m1_1.*model is repvit_m0_9.*create_model\('repvit_m1_1'"):
        repvit.create_model("repvit_m0_9", checkpoint=tmp_path / "m11.safetensors")
    with pytest.raises(CheckpointMismatchError, match="repvit_m1_1"):
        repvit.load_checkpoint(repvit.create_model("repvit_m0_9"), tmp_path / "m11.safetensors")


def test_legacy_layout_into_current_variant(tmp_path):
    repvit.save_checkpoint(repvit.create_model("repvit_m1"), tmp_path / "m1.safetensors")
    with pytest.raises(CheckpointMismatchError, match="repvit_m1"):
        repvit.create_model("repvit_m0_9", checkpoint=tmp_path / "m1.safetensors")


def test_deploy_file_into_train_model_and_reverse(tmp_path):
    m = repvit.create_model("repvit_m0_6")
    repvit.save_checkpoint(repvit.reparameterize(m), tmp_path / "d.safetensors")
    repvit.save_checkpoint(m, tmp_path / "t.safetensors")
    with pytest.raises(CheckpointMismatchError, match="deploy-form.*cannot be un-fused.*deploy=True"):
        repvit.load_checkpoint(repvit.create_model("repvit_m0_6"), tmp_path / "d.safetensors")
    with pytest.raises(CheckpointMismatchError, match="cannot be un-fused"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "d.safetensors", deploy=False)
    with pytest.raises(CheckpointMismatchError, match="train-form.*reparameterize"):
        repvit.load_checkpoint(repvit.create_model("repvit_m0_6", deploy=True), tmp_path / "t.safetensors")


def test_head_mismatch_names_keys_and_suggests_num_classes(tmp_path):
    repvit.save_checkpoint(repvit.create_model("repvit_m0_6", num_classes=10), tmp_path / "c10.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"head\.head\.l\.weight.*num_classes=N"):
        repvit.load_checkpoint(repvit.create_model("repvit_m0_6"), tmp_path / "c10.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['head\.head_dist"):
        repvit.load_checkpoint(repvit.create_model("repvit_m0_6", num_classes=10, distillation=True),
                               tmp_path / "c10.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file(tmp_path, suffix):
    p = tmp_path / f"m{suffix}"
    m = repvit.create_model("repvit_m0_6")
    if suffix == ".pth":
        torch.save({"model": m.state_dict()}, p)
    else:
        repvit.save_checkpoint(m, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        repvit.create_model("repvit_m0_6", checkpoint=p)


def test_missing_empty_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "empty.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointFormatError, match="does not look like a RepViT checkpoint"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "other.pth")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    with open(p, "wb") as f:
        pickle.dump({"model": {}, "payload": _Evil(marker)}, f, protocol=2)  # torch.save's protocol
    with pytest.raises(CheckpointFormatError, match=r"refusing to unpickle.*(?i:global) posix\.system"):
        repvit.create_model("repvit_m0_6", checkpoint=p)
    assert not marker.exists()


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write .*x.safetensors"):
        repvit.save_checkpoint(repvit.create_model("repvit_m0_6"), blocker / "x.safetensors")


@pytest.mark.parametrize("arch", ["convnext_atto", "fastvit_t8"])
def test_foreign_timm_checkpoint_with_stem_and_stages_keys(tmp_path, arch):
    """Other timm models also use 'stem.*' / 'stages.N.blocks.M.*' keys: a clear format error, not a KeyError."""
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model(arch).state_dict(), tmp_path / f"{arch}.pth")
    with pytest.raises(CheckpointFormatError, match=rf"{arch}\.pth: .*do not follow the RepViT layout.*another timm"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / f"{arch}.pth")


def test_foreign_stage_keys_without_timm(tmp_path):
    sd = {"stem.conv1.c.weight": torch.zeros(20, 3, 3, 3), "stem.conv1.bn.running_mean": torch.zeros(20),
          "stages.0.blocks.0.conv_dw.weight": torch.zeros(40, 1, 7, 7)}
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointFormatError, match=r"stages\.0\.blocks\.0\.channel_mixer\.conv2\.c\.weight"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "odd.pth")


def test_ema_only_file_with_use_ema_false_says_so(tmp_path):
    m = repvit.create_model("repvit_m0_6")
    torch.save({"model_ema": m.state_dict(), "epoch": 3}, tmp_path / "ema_only.pth")
    with pytest.raises(CheckpointFormatError, match=r"only EMA weights \('model_ema'.*use_ema=True"):
        repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "ema_only.pth", use_ema=False)
    # unset (None) and True take the EMA weights
    for use_ema in (None, True):
        got = repvit.create_model("repvit_m0_6", checkpoint=tmp_path / "ema_only.pth", use_ema=use_ema).state_dict()
        assert all(torch.equal(got[k], v) for k, v in m.state_dict().items())
