"""benchmarks/teacher_fold.py: it times the folded teacher against the un-folded one and writes what it documents."""

import json

from tests.conftest import load_script


def test_writes_json_and_markdown_for_a_folded_and_an_unfolded_teacher(tmp_path):
    mod = load_script("teacher_fold")
    out = tmp_path / "tf.json"
    res = mod.main(["--variant", "repvit_m0_6", "--res", "32", "--batch", "2", "--rounds", "2", "--warmup", "1",
                    "--threads", "1", "--amp", "none", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["stats"]) == {"folded", "unfolded"}
    r = data["ratio_folded_over_unfolded"]
    assert r["rounds"] == 2 and r["min"] <= r["ratio"] <= r["max"]
    # fp32: the fold is the same function (bf16 would round the two differently)
    assert data["max_softmax_diff"] < 1e-4 and res["teacher"] == "2 random repvit_m0_6"
    assert "| folded ms |" in out.with_suffix(".md").read_text()
