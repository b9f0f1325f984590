"""What a (torchrun) launch checks before any work: the batch layout against the process count, and one run
directory for every rank when --out is not given."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import repvit.train.loop as loop
from repvit.cli import main
from repvit.train.commands import default_run_dir
from repvit.train.config import config_to_dict
from repvit.train.dist import DistInfo

from trainhelpers import tiny_config


class _Reached(Exception):
    pass


@pytest.fixture
def fake_world(monkeypatch):
    """``loop.train`` as one rank of an N-process launch (no process group), whose data building must not run."""
    def set_world(n: int) -> list:
        calls: list = []
        monkeypatch.setattr(loop, "init_distributed", lambda device="auto": DistInfo(0, n, 0, torch.device("cpu")))
        monkeypatch.setattr(loop, "cleanup", lambda: calls.append("cleanup"))

        def build_data(*a, **k):
            raise _Reached("build_data was called")
        monkeypatch.setattr(loop, "build_data", build_data)
        return calls
    return set_world


def test_a_global_batch_the_processes_cannot_fill_fails_before_the_data_is_built(tmp_path, fake_world):
    cfg = tiny_config("run.batch_size=8", "run.global_batch=24")    # 24 = 3 x 8: fine for 1 or 3 processes
    calls = fake_world(2)
    with pytest.raises(ValueError, match=r"global batch 24 is not a multiple of batch_size x world size = 16"):
        loop.train(cfg, tmp_path / "run")
    assert calls == ["cleanup"] and not (tmp_path / "run").exists()
    fake_world(3)                       # a layout that works goes on to the data (the check is not always failing)
    with pytest.raises(_Reached):
        loop.train(cfg, tmp_path / "run3")


def test_resume_of_a_run_without_global_batch_checks_the_saved_layout_first(tmp_path, fake_world, monkeypatch):
    """run.global_batch=null on resume means the saved run's batch_size x world: 2 x 8 cannot be filled by 3."""
    cfg = tiny_config("run.batch_size=8", "run.global_batch=null")
    state = {"config": config_to_dict(cfg), "world_size": 2}
    monkeypatch.setattr(loop, "load_train_state", lambda path: state)
    fake_world(3)
    with pytest.raises(ValueError, match=r"global batch 16 is not a multiple of batch_size x world size = 24"):
        loop.train(None, resume=tmp_path)      # type: ignore[arg-type]
    fake_world(4)                       # 4 x 8 = 32 per step > 16
    with pytest.raises(ValueError, match=r"= 32"):
        loop.train(None, resume=tmp_path)      # type: ignore[arg-type]
    fake_world(1)                       # 1 x 8 with 2 accumulation steps: goes on to the data
    with pytest.raises(_Reached):
        loop.train(None, resume=tmp_path)      # type: ignore[arg-type]


@pytest.mark.parametrize("env,want", [
    ({}, r"runs/digits-\d{8}-\d{6}"),                                        # one process: timestamped
    ({"WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "none"}, r"runs/digits-\d{8}-\d{6}"),
    ({"WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "job42"}, r"runs/digits-job42"),
    ({"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "0b5e0c3a-9f1d-4c1e-8d0b-3f1f9e2a7c11"},
     r"runs/digits-0b5e0c3a-9f1d-4c1e-8d0b-3f1f9e2a7c11"),                   # torchrun --standalone: a uuid
    ({"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}, None),              # torchrun's default --rdzv-id
    ({"WORLD_SIZE": "2"}, None),
    ({"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "../x"}, None),              # not usable in a path
])
def test_default_run_dir_is_the_same_on_every_rank_or_an_error(monkeypatch, env, want):
    for k in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if want is None:
        with pytest.raises(ValueError, match="pass --out DIR"):
            default_run_dir("digits")
    else:
        assert re.fullmatch(want, default_run_dir("digits"))
        assert default_run_dir("some/dir/digits.yaml").startswith("runs/digits-")


def test_train_cli_under_torchrun_without_out_stops_before_training(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("training started"))
    assert main(["train", "--recipe", "digits"]) == 2
    assert "--out" in capsys.readouterr().err and not Path("runs").exists()
