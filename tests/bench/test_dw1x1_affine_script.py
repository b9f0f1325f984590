"""benchmarks/dw1x1_affine.py: the two forms it times are the same function, and it writes what it documents."""

import json
import sys

import torch

from tests.conftest import load_script


def test_the_two_forms_agree_in_value_and_gradient():
    mod = load_script("dw1x1_affine")
    torch.manual_seed(0)
    forms = mod._forms(16)
    x = torch.randn(4, 16, 5, 5)
    outs = {}
    for name, f in forms.items():
        xi = x.clone().requires_grad_()
        y = f(xi)
        y.pow(2).sum().backward()
        outs[name] = (y.detach(), xi.grad)
    (ya, ga), (yb, gb) = outs.values()
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)
    assert (ya - x).abs().max() > 1e-2           # not the identity: the branch does something


def test_writes_json_and_markdown(tmp_path, monkeypatch):
    mod = load_script("dw1x1_affine")
    monkeypatch.setattr(sys, "argv", ["dw1x1_affine.py", "--rounds", "1", "--batch", "2", "--res", "32",
                                      "--threads", "1", "--out-dir", str(tmp_path)])
    mod.main()
    rows = json.loads((tmp_path / "dw1x1_affine.json").read_text())["rows"]
    assert len(rows) == 4 * 2 * 2                 # 4 stages x 2 layouts x 2 dtypes
    assert {r["shape"][2] for r in rows} == {8, 4, 2, 1}
    assert all(r["conv_ms"] > 0 and r["affine_ms"] > 0 and r["ratio_min"] <= r["affine_over_conv"] <= r["ratio_max"]
               for r in rows)
    assert (tmp_path / "dw1x1_affine.md").read_text().count("\n") == 2 + len(rows)
