"""Batch-1 CPU latency: our fused RepViT vs timm's fused RepViT, same weights, side by side.

timm's train-form state dict is saved to a file and loaded into our model through
``repvit.load_checkpoint`` (the key layouts are identical in train form); both models are
then fused (ours: ``repvit.reparameterize``, timm: ``timm.utils.reparameterize_model``),
checked to give the same outputs, and timed interleaved. Result: median of per-round
latency ratios ours/timm (target <= 1.0), written as JSON + Markdown.

By default (``--first both``) the measurement runs twice, each time in a fresh process: once
with our runtime session created first, once with timm's, ``--rounds`` rounds each; the per-round
ratios are pooled. In ONNX Runtime the session created first ran ~1% slower on the AMX Xeon,
whatever model it held (ours/timm 1.008 with ours first, 0.995 with timm's first); balancing the
order cancels that bias instead of handing it to one side.

    python benchmarks/latency_vs_timm.py --variants repvit_m0_9 repvit_m1_1 --json results/latency_vs_timm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without an install
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


# what "median", "min" and "max" of an arm's milliseconds are: one order (one phase) keeps every timed iteration
# (repvit.bench.timing.latency_stats); pooled orders keep only each round's median, so their statistics are over those
STAT_PER_ITERATION = "per-iteration times"
STAT_ROUND_MEDIANS = "per-round medians of both orders"


def pool(arms: list[dict]) -> dict:
    """One arm's statistics over several phases: per-round medians concatenated, median and range over them (the
    per-iteration samples are not kept); each phase's own statistics are kept under ``phases``."""
    rounds = [r for st in arms for r in st["round_medians"]]
    return {"median": float(statistics.median(rounds)), "min": float(min(rounds)), "max": float(max(rounds)),
            "statistic": STAT_ROUND_MEDIANS, "n_rounds": len(rounds),
            "n": sum(st["n"] for st in arms), "round_medians": rounds, "phases": arms}


def measure(args: argparse.Namespace) -> dict:
    """One phase in this process: sessions created in ``args.first`` order, timed interleaved."""
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
        print(f"{args.first} first: timing {len(runners)} candidates interleaved ({args.rounds} rounds x "
              f"{args.iters} iterations)", flush=True)
        stats = measure_interleaved(runners, warmup=args.warmup, iters=args.iters, rounds=args.rounds)
    info["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for v in args.variants:
        for rt in args.runtimes:
            a, b = ({**stats[f"{v}|{who}|{rt}"], "statistic": STAT_PER_ITERATION} for who in ("ours", "timm"))
            ratio = paired_ratio(a, b)
            rows.append({"variant": v, "runtime": rt, "ours_ms": a, "timm_ms": b, **ratio,
                         "ratio_by_first": {args.first: ratio["ratio"]}, "target": "<= 1.0", **facts[v]})
    return {"machine": info, "rows": rows}


def measure_both_orders(args: argparse.Namespace, argv: list[str]) -> dict:
    """Both creation orders, each in a fresh process (the bias may be per process), pooled per round."""
    phases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for first in ("ours", "timm"):
            out = Path(tmp) / f"{first}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--first", first, "--json", str(out)]
            subprocess.run(cmd, check=True)
            phases[first] = json.loads(out.read_text())
    rows = []
    for ra, rb in zip(*(ph["results"] for ph in phases.values())):
        a, b = pool([ra["ours_ms"], rb["ours_ms"]]), pool([ra["timm_ms"], rb["timm_ms"]])
        facts = {k: ra[k] for k in ra if k.startswith(("max_abs_diff", "params_"))}
        rows.append({"variant": ra["variant"], "runtime": ra["runtime"], "ours_ms": a, "timm_ms": b,
                     **paired_ratio(a, b), "ratio_by_first": {"ours": ra["ratio"], "timm": rb["ratio"]},
                     "target": "<= 1.0", **facts})
    machine = phases["timm"]["machine"]
    machine["load_avg_1m_end_by_phase"] = {k: ph["machine"].get("load_avg_1m_end") for k, ph in phases.items()}
    return {"machine": machine, "rows": rows}


def _strip(argv: list[str], *flags: str) -> list[str]:
    """argv without ``flags`` and their values (the phases get their own --first/--json)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["repvit_m0_9"])
    ap.add_argument("--runtimes", nargs="+", default=["eager"], help="eager (default), eager_cl, onnxruntime, ...")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7, help="rounds per phase")
    ap.add_argument("--json", type=Path, default=Path("latency_vs_timm.json"))
    ap.add_argument("--markdown", type=Path, default=None, help="default: --json with .md")
    ap.add_argument("--first", choices=("both", "ours", "timm"), default="both",
                    help="whose runtime session is created first; both (default): one fresh process each way, "
                         "per-round ratios pooled (in ONNX Runtime the first-created session ran ~1%% slower on "
                         "the AMX Xeon)")
    args = ap.parse_args(argv)
    from repvit.bench.runtimes import check_runtimes
    check_runtimes(args.runtimes)   # before any model is built: a misspelt runtime must not run another one

    res = measure_both_orders(args, _strip(argv, "--first", "--json", "--markdown")) if args.first == "both" \
        else measure(args)
    rows = res["rows"]
    pooled = args.first == "both"
    statistic = STAT_ROUND_MEDIANS if pooled else STAT_PER_ITERATION
    out = {"schema": "repvit.latency_vs_timm/1", "machine": res["machine"],
           "settings": {"warmup": args.warmup, "iters": args.iters, "rounds": args.rounds, "batch": 1,
                        "first": args.first, "input_size": [224, 224], "ms_statistic": statistic}, "results": rows}
    order = "in both orders (one fresh process each, pooled)" if pooled else f"{args.first} first"
    what = (f"ours/timm ms: median of the {2 * args.rounds} per-round medians ({args.iters} iterations each) of both "
            "orders" if pooled else
            f"ours/timm ms: median of all {args.rounds * args.iters} per-iteration times")
    label = "median of round medians, ms" if pooled else "median ms"
    md = [f"Machine: {machine_line(res['machine'])}.", "",
          f"Runtime sessions created {order}; {args.rounds} interleaved rounds per order. {what}; the ratio, min and "
          "max are over the per-round ratios ours/timm.", "",
          f"| Variant | Runtime | ours {label} | timm {label} | ratio ours/timm | min | max | ratio by first-created "
          "| max abs diff (fused) |",
          "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        by = ", ".join(f"{k} first {x:.3f}" for k, x in r["ratio_by_first"].items())
        md.append(f"| {r['variant']} | {r['runtime']} | {r['ours_ms']['median']:.2f} | {r['timm_ms']['median']:.2f} | "
                  f"{r['ratio']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {by} | {r['max_abs_diff_fused']:.1e} |")
    text = "\n".join(md) + "\n"
    print(text)
    write_json(args.json, out)
    write_text(args.markdown or args.json.with_suffix(".md"), text)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
