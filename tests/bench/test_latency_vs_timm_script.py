"""benchmarks/latency_vs_timm.py: both session-creation orders run, each in its own process, and are pooled."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script

pytest.importorskip("timm")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "latency_vs_timm.py"


def _script():
    return load_script("latency_vs_timm")


def test_strip_removes_flags_and_their_values():
    strip = _script()._strip
    argv = ["--variants", "a", "--first", "both", "--json", "x.json", "--markdown=y.md", "--rounds", "3"]
    assert strip(argv, "--first", "--json", "--markdown") == ["--variants", "a", "--rounds", "3"]


def test_both_orders_are_measured_and_pooled(tmp_path):
    out = tmp_path / "lvt.json"
    cmd = [sys.executable, str(SCRIPT), "--variants", "repvit_m0_9", "--runtimes", "eager", "--threads", "1",
           "--warmup", "0", "--iters", "1", "--rounds", "2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # one fresh process per order
    assert "ours first: timing" in done.stdout and "timm first: timing" in done.stdout
    res = json.loads(out.read_text())
    assert res["settings"]["first"] == "both"
    (row,) = res["results"]
    assert set(row["ratio_by_first"]) == {"ours", "timm"}
    a, b = row["ours_ms"], row["timm_ms"]
    assert len(a["phases"]) == len(b["phases"]) == 2 and len(a["round_medians"]) == len(b["round_medians"]) == 4
    # the pooled ratio is the median over the per-round ratios of both phases
    pooled = statistics.median(x / y for x, y in zip(a["round_medians"], b["round_medians"]))
    assert row["ratio"] == pytest.approx(pooled)
    for first, pa, pb in zip(("ours", "timm"), a["phases"], b["phases"]):
        per = statistics.median(x / y for x, y in zip(pa["round_medians"], pb["round_medians"]))
        assert row["ratio_by_first"][first] == pytest.approx(per)
    assert row["max_abs_diff_fused"] < 1e-3
    md = out.with_suffix(".md").read_text()
    assert "ours first" in md
    # pooled statistics are over the per-round medians, each phase's over its per-iteration times: labelled so
    assert res["settings"]["ms_statistic"] == a["statistic"] == b["statistic"] == "per-round medians of both orders"
    assert a["median"] == pytest.approx(statistics.median(a["round_medians"])) and a["n_rounds"] == 4
    assert {ph["statistic"] for ph in a["phases"] + b["phases"]} == {"per-iteration times"}
    assert "ours median of round medians, ms" in md and "median of the 4 per-round medians" in md


def test_pooled_statistics_are_labelled_as_round_medians():
    pool = _script().pool
    phase = {"median": 1.0, "min": 0.5, "max": 9.0, "n": 30, "round_medians": [1.0, 2.0, 3.0],
             "statistic": "per-iteration times"}
    pooled = pool([phase, dict(phase, round_medians=[4.0, 5.0, 6.0])])
    assert pooled["statistic"] == "per-round medians of both orders"
    assert (pooled["median"], pooled["min"], pooled["max"], pooled["n_rounds"]) == (3.5, 1.0, 6.0, 6)
