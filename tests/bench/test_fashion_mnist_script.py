"""benchmarks/fashion_mnist.py runs, and reports the weights named before the run (never the better on test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from repvit.data.builtin import FASHION_MNIST_DIR

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fashion_mnist.py"


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(),
                    reason=f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR}: optional system data "
                           "package, not a failure (Debian/Ubuntu: apt-get install dataset-fashion-mnist)")
def test_parallel_main_comparison_reports_the_declared_weights(tmp_path):
    out = tmp_path / "fm"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--epochs", "0.05", "--parts", "main", "--parallel",
           "--main-models", "repvit_m0_6,mobilenetv3_large_100", "--weights", "ema", "--threads", "2",
           "--out-dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((out / "fashion_mnist.json").read_text())
    rows = {r["model"]: r for r in res["main"]}
    assert set(rows) == {"repvit_m0_6", "mobilenetv3_large_100"}
    for r in rows.values():
        assert r["weights"] == "ema" and r["top1"] == r["ema_top1"] and r["updates"] == 2
    # the arms ran in separate processes on bit-identical batches
    assert rows["repvit_m0_6"]["data_digest"] == rows["mobilenetv3_large_100"]["data_digest"]
    md = (out / "fashion_mnist.md").read_text()
    assert "| repvit_m0_6 |" in md
    # the arms trained in 1-thread processes: that is the recorded thread count, not the parent's --threads
    assert (res["settings"]["threads"], res["settings"]["parent_threads"]) == (1, 2)
    assert "1 thread(s) per arm process" in md
    # a second run into the same folder refuses instead of overwriting the first one's numbers
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "--overwrite" in (again.stderr + again.stdout)
