"""``repvit bench --gpu`` argument handling, without a GPU: --warmup/--iters reach the GPU function and its JSON,
and CPU-harness options that GPU mode would ignore are refused."""

import json

import pytest

import repvit.bench.gpu as gpu
from repvit.cli import main

REAL_GPU_THROUGHPUT = gpu.gpu_throughput


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = []

    def fake(models, *, batch, input_size, warmup, iters):
        calls.append({"models": models, "batch": batch, "input_size": input_size, "warmup": warmup, "iters": iters})
        return [{"model": "repvit_m0_6", "display": "RepViT-M0.6", "batch": batch, "images_per_s": 1.0,
                 "device": "fake", "warmup": warmup, "iters": iters}]

    monkeypatch.setattr(gpu, "gpu_throughput", fake)
    return calls


def test_warmup_and_iters_reach_the_gpu_function(fake_gpu, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["bench", "--gpu", "--models", "repvit_m0_6", "--warmup", "3", "--iters", "4", "--gpu-batch", "8",
                 "--json", str(out)]) == 0
    assert fake_gpu[-1] == {"models": ["repvit_m0_6"], "batch": 8, "input_size": 224, "warmup": 3, "iters": 4}
    assert json.loads(out.read_text())["settings"] == {"batch": 8, "input_size": 224, "warmup": 3, "iters": 4}
    assert main(["bench", "--gpu", "--models", "repvit_m0_6"]) == 0  # GPU defaults, as speed_gpu.py
    assert (fake_gpu[-1]["warmup"], fake_gpu[-1]["iters"], fake_gpu[-1]["batch"]) == (20, 30, 256)


@pytest.mark.parametrize("extra,flag", [
    (["--threads", "1"], "--threads"), (["--runtimes", "eager"], "--runtimes"), (["--rounds", "5"], "--rounds"),
    (["--markdown", "x.md"], "--markdown"), (["--plot", "x.png"], "--plot"), (["--downstream"], "--downstream"),
    (["--no-peak"], "--no-peak"), (["--plot-runtime", "eager"], "--plot-runtime"),
])
def test_cpu_only_options_are_refused_in_gpu_mode(fake_gpu, tmp_path, capsys, extra, flag):
    assert main(["bench", "--gpu", "--models", "repvit_m0_6", *extra]) == 2
    err = capsys.readouterr().err
    assert f"{flag} do not apply to --gpu" in err, err
    assert not fake_gpu and not list(tmp_path.iterdir())


def test_gpu_batch_without_gpu_and_bad_counts_are_refused(fake_gpu, capsys):
    assert main(["bench", "--models", "repvit_m0_6", "--gpu-batch", "8"]) == 2
    assert "--gpu-batch applies to --gpu only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="warmup >= 0"):  # checked before looking for CUDA
        REAL_GPU_THROUGHPUT(["repvit_m0_6"], warmup=-1)
