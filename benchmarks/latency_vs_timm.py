"""Batch-1 CPU latency: our fused RepViT vs timm's fused RepViT, same weights, side by side.

timm's train-form state dict is saved to a file and loaded into our model through
``repvit.load_checkpoint`` (the key layouts are identical in train form); both models are
then fused (ours: ``repvit.reparameterize``, timm: ``timm.utils.reparameterize_model``),
checked to give the same outputs, and timed interleaved. Result: median of per-round
latency ratios ours/timm (target <= 1.0), written as JSON + Markdown.

    python benchmarks/latency_vs_timm.py --variants repvit_m0_9 repvit_m1_1 --json results/latency_vs_timm.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from repvit import load_checkpoint, reparameterize
from repvit.bench.machine import machine_info, pin_threads
from repvit.bench.report import machine_line, write_json, write_text
from repvit.bench.runtimes import prepare
from repvit.bench.timing import measure_interleaved, paired_ratio
from repvit.models import build_model


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    # non-trivial BN statistics, so fusing actually changes the weights being compared
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)


@torch.no_grad()
def pair(variant: str, workdir: Path) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(ours fused, timm fused, parity facts) with identical weights."""
    import timm
    from timm.utils.model import reparameterize_model
    theirs = timm.create_model(variant, pretrained=False).eval()
    _randomise_bn(theirs)
    path = workdir / f"{variant}_timm.pth"
    torch.save(theirs.state_dict(), path)
    ours = build_model(variant, distillation=getattr(theirs.head, "head_dist", None) is not None).eval()
    load_checkpoint(ours, path)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    train_diff = (ours(x) - theirs(x)).abs().max().item()
    ours_f, theirs_f = reparameterize(ours), reparameterize_model(theirs).eval()
    fused_diff = (ours_f(x) - theirs_f(x)).abs().max().item()
    facts = {"max_abs_diff_train_form": train_diff, "max_abs_diff_fused": fused_diff,
             "params_ours_fused": sum(p.numel() for p in ours_f.parameters()),
             "params_timm_fused": sum(p.numel() for p in theirs_f.parameters())}
    if train_diff > 1e-3 or fused_diff > 1e-3:
        raise RuntimeError(f"{variant}: ours and timm disagree after loading the same weights ({facts})")
    return ours_f, theirs_f, facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["repvit_m0_9"])
    ap.add_argument("--runtimes", nargs="+", default=["eager"], help="eager (default), eager_cl, onnxruntime, ...")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=Path("latency_vs_timm.json"))
    ap.add_argument("--markdown", type=Path, default=None, help="default: --json with .md")
    ap.add_argument("--first", choices=("ours", "timm"), default="ours",
                    help="whose runtime session is created first (in ONNX Runtime the first-created one ran ~1%% "
                         "slower on the AMX Xeon; run both to separate that from the model)")
    args = ap.parse_args(argv)

    example = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with pin_threads(args.threads) as pinned, tempfile.TemporaryDirectory() as tmp:
        info = {**machine_info(pinned["threads"]), "cpus": pinned["cpus"]}
        runners, facts = {}, {}
        for v in args.variants:
            ours, theirs, facts[v] = pair(v, Path(tmp))
            arms = {"ours": ours, "timm": theirs}
            order = ("ours", "timm") if args.first == "ours" else ("timm", "ours")
            for rt in args.runtimes:
                for who in order:
                    runners[f"{v}|{who}|{rt}"] = prepare(rt, arms[who], example, Path(tmp), pinned["threads"],
                                                         tag=f"{v}_{who}")[0]
        print(f"timing {len(runners)} candidates interleaved ({args.rounds} rounds x {args.iters} iterations)")
        stats = measure_interleaved(runners, warmup=args.warmup, iters=args.iters, rounds=args.rounds)
    import os
    info["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for v in args.variants:
        for rt in args.runtimes:
            a, b = stats[f"{v}|ours|{rt}"], stats[f"{v}|timm|{rt}"]
            rows.append({"variant": v, "runtime": rt, "ours_ms": a, "timm_ms": b, **paired_ratio(a, b),
                         "target": "<= 1.0", **facts[v]})
    res = {"schema": "repvit.latency_vs_timm/1", "machine": info,
           "settings": {"warmup": args.warmup, "iters": args.iters, "rounds": args.rounds, "batch": 1, "first": args.first,
                        "input_size": [224, 224]}, "results": rows}
    md = [f"Machine: {machine_line(info)}.", "",
          "| Variant | Runtime | ours median ms | timm median ms | ratio ours/timm | min | max | max abs diff (fused) |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['runtime']} | {r['ours_ms']['median']:.2f} | {r['timm_ms']['median']:.2f} | "
                  f"{r['ratio']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {r['max_abs_diff_fused']:.1e} |")
    text = "\n".join(md) + "\n"
    print(text)
    write_json(args.json, res)
    write_text(args.markdown or args.json.with_suffix(".md"), text)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
