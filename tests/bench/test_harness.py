"""Latency harness: statistics, the documented JSON fields, CLI outputs. No timing assertions."""

import json
from pathlib import Path

import pytest

from repvit.bench.harness import run_bench
from repvit.bench.timing import latency_stats, measure_interleaved, paired_ratio
from repvit.cli import main

STAT_KEYS = {"median", "p10", "p90", "mean", "std", "min", "max", "spread", "n", "round_medians"}


def test_measure_interleaved_stats_with_a_fake_clock():
    ticks = iter(range(10_000))
    order = []

    def make(name):
        return lambda: order.append(name)

    # each call of the clock advances one unit: every timed iteration lasts exactly one unit
    stats = measure_interleaved({"a": make("a"), "b": make("b")}, warmup=1, iters=3, rounds=2, rewarm=1,
                                clock=lambda: float(next(ticks)))
    assert stats["a"]["n"] == 6 and stats["a"]["median"] == pytest.approx(1000.0)  # ms
    assert stats["a"]["round_medians"] == [pytest.approx(1000.0)] * 2
    # interleaved: warm-ups, then a round of a, b; the next round in reverse order (b, a)
    assert order == ["a", "b"] + ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4


def test_latency_stats_and_paired_ratio():
    s = latency_stats([0.001, 0.002, 0.003, 0.004], [0.002, 0.004])
    assert s["median"] == pytest.approx(2.5) and s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(4.0)
    assert s["p10"] < s["median"] < s["p90"]
    r = paired_ratio({"median": 2, "round_medians": [1.0, 2.0, 4.0]}, {"median": 4, "round_medians": [2.0, 2.0, 2.0]})
    assert r["ratio"] == pytest.approx(1.0) and r["min"] == pytest.approx(0.5) and r["max"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        latency_stats([])


def test_run_bench_produces_documented_fields():
    # one thread: on a loaded shared machine two spinning OpenMP threads can stall for seconds
    res = run_bench(["repvit_m0_6"], ["eager", "onnxruntime"], threads=1, input_size=64, warmup=0, iters=2, rounds=1,
                    peak=True, peak_n=64, downstream=True, downstream_size=64, log=lambda s: None)
    assert res["schema"] == "repvit.bench/1"
    for k in ("cpu_model", "logical_cpus", "threads", "cpus", "cpu_flags", "native_bf16", "torch", "onnxruntime"):
        assert k in res["machine"]
    assert res["settings"]["batch"] == 1 and res["settings"]["input_size"] == [64, 64]
    assert res["peak"]["fp32"]["gflops"] > 0 and res["peak"]["fp32"]["n"] == 64
    assert [r["runtime"] for r in res["results"]] == ["eager", "onnxruntime"]
    st = res["settings"]
    assert res["downstream_peak"]["fp32"]["gflops"] > 0  # the peak runs interleaved with each group
    for r in res["results"] + res["downstream"]:
        assert r["status"] == "ok", r.get("reason")
        assert STAT_KEYS <= set(r["latency_ms"])
        n_expected = 2 if r in res["results"] else st["downstream_iters"] * st["downstream_rounds"]
        assert r["latency_ms"]["n"] == n_expected
        assert r["gflops"] == pytest.approx(2 * r["macs"] / (r["latency_ms"]["median"] * 1e-3) / 1e9)
        assert 0 < r["peak_fraction"]
        assert r["params"] > 0 and r["macs"] > 0 and r["dtype"] == "fp32"
    assert res["results"][0]["published_top1"] is not None and res["results"][0]["top1_source"]
    # the features-only backbone has no classifier: fewer parameters than the classifier model
    assert res["downstream"][0]["params"] < res["results"][0]["params"]
    # same input size for both groups: the backbone must still get its own exported file, not the classifier's
    ort = [r["model_file"] for r in res["results"] + res["downstream"] if r["runtime"] == "onnxruntime"]
    assert len(ort) == 2 and ort[0] != ort[1], ort
    assert res["targets"] == {}  # the targets are about RepViT-M0.9, which this run did not time


def _row(model, source, runtime, dtype, ms, peak_fraction=None):
    r = {"model": model, "source": source, "runtime": runtime, "dtype": dtype,
         "latency_ms": {"median": ms, "round_medians": [ms, ms * 1.1]}}
    if peak_fraction is not None:
        r["peak_fraction"] = peak_fraction
    return r


def test_ratios_and_targets_from_rows():
    from repvit.bench.harness import _ratios, _targets
    rows = [_row("repvit_m0_9", "repvit", "onnxruntime", "fp32", 4.0, 0.5),
            _row("timm:repvit_m0_9", "timm", "onnxruntime", "fp32", 5.0),
            _row("repvit_m0_9", "repvit", "eager", "fp32", 8.0, 0.25),
            _row("repvit_m0_9", "repvit", "onnxruntime_int8", "int8", 2.0),
            _row("timm:repvit_m0_9", "timm", "onnxruntime_int8", "int8", 3.0)]   # other pipeline: no ratio
    ratios = _ratios(rows)
    assert len(ratios) == 1 and ratios[0]["ratio"] == pytest.approx(0.8) and ratios[0]["runtime"] == "onnxruntime"
    t = _targets(rows, ratios)
    assert t["ort_ours_over_timm"]["met"] is True
    assert t["best_fp32_latency_ms"]["runtime"] == "onnxruntime" and t["best_fp32_latency_ms"]["met"] is True
    assert t["best_fp32_peak_fraction"]["value"] == pytest.approx(0.5) and t["best_fp32_peak_fraction"]["met"] is False
    assert t["int8_speedup_vs_best_fp32"]["value"] == pytest.approx(2.0) and "bf16_speedup_vs_best_fp32" not in t
    assert t["best_latency_ms"]["runtime"] == "onnxruntime_int8" and t["best_latency_ms"]["dtype"] == "int8"
    assert t["best_latency_ms"]["value"] == pytest.approx(2.0)


def test_unknown_model_and_runtime_are_clean_cli_errors(capsys):
    assert main(["bench", "--models", "resnet50x"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["bench", "--models", "repvit_m0_6", "--runtimes", "tensorrt"]) == 2
    assert "unknown runtime" in capsys.readouterr().err


def test_bench_cli_writes_json_markdown_plot(tmp_path: Path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--models", "repvit_m0_6", "--runtimes", "eager", "--threads", "1", "--input-size", "64", "--warmup", "0",
               "--iters", "1", "--rounds", "1", "--no-peak", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["results"][0]["model"] == "repvit_m0_6" and "latency_ms" in res["results"][0]
    assert "RepViT-M0.6" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_roadmap_cli_json_is_a_list_of_steps(tmp_path: Path):
    out = tmp_path / "roadmap.json"
    rc = main(["roadmap", "--threads", "1", "--input-size", "64", "--warmup", "0", "--iters", "1", "--rounds", "1", "--json", str(out)])
    assert rc == 0
    steps = json.loads(out.read_text())
    assert isinstance(steps, list) and len(steps) == 10
    for s in steps:
        assert {"step", "params", "macs", "latency_ms", "published_latency_ms", "published_top1"} <= set(s)
        assert s["latency_ms"] > 0 and s["params"] > 0
    assert steps[-1]["params"] == 5067056  # fused RepViT-M0.9, reference sheet exact count
    assert all("2307.09283" in s["published_source"] for s in steps)
    try:
        import matplotlib  # noqa: F401
    except ImportError:    # the plot is skipped (and said) without matplotlib; the numbers are still written
        return
    assert out.with_suffix(".png").exists()


def test_roadmap_cli_refuses_an_unwritable_output_and_a_plot_without_timings_before_running(tmp_path: Path,
                                                                                            monkeypatch, capsys):
    import repvit.bench.roadmap as rm
    monkeypatch.setattr(rm, "run_roadmap", lambda **k: pytest.fail("the run started before the outputs were checked"))
    if Path("/proc/self").exists():      # not writable even for root (a permission check would pass there)
        assert main(["roadmap", "--json", "/proc/roadmap.json"]) != 0
        assert "/proc is not a writable directory" in capsys.readouterr().err
    assert main(["roadmap", "--no-measure", "--plot", str(tmp_path / "r.png")]) != 0
    assert "--no-measure" in capsys.readouterr().err


def test_pin_threads_sets_and_restores():
    import os

    import torch

    from repvit.bench.machine import pin_threads
    before_threads = torch.get_num_threads()
    before_aff = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with pin_threads(1) as p:
        assert p["threads"] == 1 and len(p["cpus"]) == 1 and torch.get_num_threads() == 1
        if before_aff is not None:
            assert os.sched_getaffinity(0) == set(p["cpus"])
    assert torch.get_num_threads() == before_threads
    if before_aff is not None:
        assert os.sched_getaffinity(0) == before_aff
    with pytest.raises(ValueError, match="threads"):
        with pin_threads(10_000):
            pass


def test_int8_runtime_prepares_and_runs(tmp_path: Path):
    pytest.importorskip("onnxruntime")
    import torch

    from repvit import reparameterize
    from repvit.bench.runtimes import prepare
    from repvit.models import build_model
    model = reparameterize(build_model("repvit_m0_6", num_classes=10).eval())
    x = torch.randn(1, 3, 64, 64)
    run, facts = prepare("onnxruntime_int8", model, x, tmp_path, threads=1, tag="m06")
    out = run()[0]
    assert facts["dtype"] == "int8" and facts["note"]
    assert out.shape == (1, 10)
    # a quantised model, not the fp32 file under another name
    assert (tmp_path / "m06.int8.onnx").exists()
    import onnx
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m06.int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops or "QLinearConv" in ops


@pytest.mark.parametrize("source", ["repvit", "timm"])
def test_nchwc_runtime_runs_the_rewritten_graph_of_any_model(tmp_path: Path, source):
    """onnxruntime_nchwc: the SE pass applied to our export and to a peer's plain torch.onnx export alike, the
    outputs those of the fp32 model."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnx
    import torch

    from repvit import reparameterize
    from repvit.bench.runtimes import prepare
    from repvit.models import build_model
    torch.manual_seed(0)
    if source == "repvit":
        model = reparameterize(build_model("repvit_m0_6", num_classes=10).eval())
    else:
        timm = pytest.importorskip("timm")
        model = timm.create_model("repvit_m0_9", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    run, facts = prepare("onnxruntime_nchwc", model, x, tmp_path, threads=1, tag="m")
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(run()[0], want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.nchwc.onnx")).graph.node]
    assert facts["dtype"] == "fp32" and facts["model_file"] == "m.nchwc.onnx"
    assert ops.count("Resize") == ops.count("GlobalAveragePool") > 0 and f"{ops.count('Resize')} gates" in facts["note"]


def test_openvino_int8_runtime_prepares_and_runs(tmp_path: Path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import numpy as np
    import torch

    from repvit import reparameterize
    from repvit.bench.runtimes import prepare
    from repvit.export.openvino_int8 import openvino_session, precision_summary
    from repvit.models import build_model
    model = reparameterize(build_model("repvit_m0_6", num_classes=10).eval())
    x = torch.randn(1, 3, 64, 64)
    run, facts = prepare("openvino_int8", model, x, tmp_path, threads=1, tag="m06")
    out = np.asarray(run()[0])
    assert facts["dtype"] == "int8" and "NNCF" in facts["note"]
    assert out.shape == (1, 10) and np.isfinite(out).all()
    # the timed model is the INT8 IR, whose convolutions run in 8-bit
    prims = precision_summary(openvino_session(tmp_path / "m06.ov_int8.xml", threads=1))
    assert prims.get("u8", 0) + prims.get("i8", 0) > 10, prims


def test_executorch_runtimes_prepare_and_run_any_model(tmp_path: Path):
    """The generic path (peers from timm take it): fp32 XNNPACK program equal to eager, and an INT8 one."""
    pytest.importorskip("executorch.runtime")
    import torch
    from torch import nn

    from repvit.bench.runtimes import prepare
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(1, 3, 32, 32)
    run, facts = prepare("executorch", model, x, tmp_path, threads=1, tag="tiny")
    with torch.no_grad():
        ref = model(x)
    assert facts["dtype"] == "fp32" and facts["threads_runtime"] in (1, None)
    assert torch.allclose(run()[0], ref, atol=1e-4)
    run8, facts8 = prepare("executorch_int8", model, x, tmp_path, threads=1, tag="tiny")
    out8 = run8()[0]
    assert facts8["dtype"] == "int8" and "random calibration" in facts8["note"]
    # an INT8 program: near fp32 (in range) but not the fp32 program under another name
    assert out8.shape == (1, 10) and not torch.equal(out8, run()[0])
    assert (out8 - ref).abs().max() < ref.abs().max()
    assert (tmp_path / "tiny.executorch_int8.pte").stat().st_size < (tmp_path / "tiny.executorch.pte").stat().st_size


def test_gpu_mode_is_guarded(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the guard does not apply")
    assert main(["bench", "--gpu", "--models", "repvit_m0_6"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_bad_settings_are_refused_before_anything_is_prepared(tmp_path: Path, monkeypatch, capsys):
    """Preparing and timing can take minutes: iteration counts, downstream options, runtime names and output
    paths are checked first (they used to fail after the main group had run, losing its results)."""
    import repvit.bench.harness as harness
    from repvit.bench.runtimes import prepare

    def no_prepare(*a, **k):
        raise AssertionError("prepared before the settings were checked")
    monkeypatch.setattr(harness, "prepare", no_prepare)
    with pytest.raises(ValueError, match="need --iters >= 1"):
        run_bench(["repvit_m0_6"], ["eager"], iters=0, input_size=64)
    with pytest.raises(ValueError, match="add --downstream"):
        run_bench(["repvit_m0_6"], ["eager"], input_size=64, downstream_runtimes=["eager"])
    with pytest.raises(ValueError, match="unknown runtime"):
        run_bench(["repvit_m0_6"], ["eager"], input_size=64, downstream=True, downstream_runtimes=["onnxruntime_cuda"])
    with pytest.raises(ValueError, match="unknown runtime"):                     # not run as its prefix's runtime
        prepare("onnxruntime_cuda", None, None, tmp_path, threads=1)
    (tmp_path / "out").mkdir()
    for extra, says in ((["--json", str(tmp_path / "out")], "is a directory"),
                        (["--json", str(tmp_path / "r.md")], "output paths coincide")):
        rc = main(["bench", "--models", "repvit_m0_6", "--runtimes", "eager", "--input-size", "64", *extra])
        assert rc == 2 and says in capsys.readouterr().err


def test_every_row_timing_the_fp32_onnx_file_names_its_exporter(tmp_path: Path):
    pytest.importorskip("onnxruntime")
    import torch

    from repvit import reparameterize
    from repvit.bench.runtimes import prepare
    from repvit.models import build_model
    model = reparameterize(build_model("repvit_m0_6", num_classes=10).eval())
    x = torch.randn(1, 3, 64, 64)
    facts = {rt: prepare(rt, model, x, tmp_path, threads=1, tag="m")[1]
             for rt in ("onnxruntime_int8", "onnxruntime", "onnxruntime_nchwc")}
    assert "exporter" not in facts["onnxruntime_int8"]          # its file is the quantizer's (see its note)
    assert facts["onnxruntime"]["exporter"].startswith("repvit.export")
    assert facts["onnxruntime_nchwc"]["exporter"].endswith("ort_layout")


def test_a_runtime_failing_on_its_first_inference_is_that_rows_error(monkeypatch):
    """The runners are called once when prepared: a runtime that fails on its first call marks its row, and the
    other rows are still timed (it used to crash the interleaved loop for every row)."""
    import repvit.bench.harness as harness
    real = harness.prepare

    def flaky(rt, *a, **k):
        fn, facts = real(rt, *a, **k)
        if rt == "eager_cl":
            def boom():
                raise RuntimeError("kernel not supported on this CPU")
            return boom, facts
        return fn, facts
    monkeypatch.setattr(harness, "prepare", flaky)
    res = run_bench(["repvit_m0_6"], ["eager", "eager_cl"], threads=1, input_size=64, warmup=0, iters=1, rounds=1,
                    peak=False, log=lambda s: None)
    rows = {r["runtime"]: r for r in res["results"]}
    assert rows["eager_cl"]["status"] == "error" and "kernel not supported" in rows["eager_cl"]["reason"]
    assert rows["eager"]["status"] == "ok" and "latency_ms" in rows["eager"]
