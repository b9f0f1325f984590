"""Training speed on small inputs: depthwise convs on tiny maps, plain oneDNN conv vs the small-map matrix path.

At a 32x32 input (Fashion-MNIST, CIFAR) RepViT's stages 3 and 4 run on 2x2 and 1x1 maps. There, oneDNN's
depthwise 3x3 *backward* is pathologically slow on CPU, so ``repvit.models.repvit.DepthwiseConv2d`` computes
those convs as a per-channel matrix product while training (``SMALL_MAP_PIXELS``). This script measures, side
by side in one process (interleaved, order alternated, median and spread):

  layers  one depthwise 3x3 conv forward+backward at RepViT-M0.9's 32x32-input shapes, both paths
  step    a whole M0.9 training step (forward, backward, AdamW) with the path off vs on, and timm's
          repvit_m0_9 in the same loop (the ours/timm training-throughput ratio)

    python benchmarks/small_map_dwconv.py --threads 2 --batch 256 --rounds 7

Writes OUT/small_map_dwconv.json and OUT/small_map_dwconv.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import repvit.models.repvit as rv  # noqa: E402
from repvit.bench.machine import machine_info  # noqa: E402
from repvit.models import build_model  # noqa: E402
from repvit.utils.files import atomic_write_text  # noqa: E402


def median_spread(ts: list[float]) -> dict:
    return {"median_ms": round(1000 * statistics.median(ts), 2), "min_ms": round(1000 * min(ts), 2),
            "max_ms": round(1000 * max(ts), 2)}


def layers(args) -> list[dict]:
    rows = []
    for c, hw in ((48, 8), (96, 4), (192, 2), (384, 1)):
        conv = torch.nn.Conv2d(c, c, 3, 1, 1, groups=c).to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, c, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()
        fns = {"plain": lambda: conv(x),
               "small_map": lambda: rv.small_map_depthwise_conv(x, conv.weight, conv.bias, 1, 1)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(args.rounds + 1):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                fns[name]().sum().backward()
                if r:                                   # round 0 is warm-up
                    times[name].append(time.perf_counter() - t0)
        ratio = [a / b for a, b in zip(times["plain"], times["small_map"])]
        rows.append({"shape": [args.batch, c, hw, hw], "plain": median_spread(times["plain"]),
                     "small_map": median_spread(times["small_map"]),
                     "speedup_median": round(statistics.median(ratio), 2),
                     "speedup_range": [round(min(ratio), 2), round(max(ratio), 2)]})
    return rows


def step(args) -> dict:
    import timm
    x = torch.randn(args.batch, 1, args.res, args.res).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    arms = {}
    for name in ("ours_plain", "ours_small_map", "timm"):
        torch.manual_seed(0)
        # timm's RepViT has a second (distillation) BN+Linear head by default; one head, as ours
        m = (timm.create_model("repvit_m0_9", num_classes=10, in_chans=1, distillation=False) if name == "timm"
             else build_model("repvit_m0_9", num_classes=10, in_chans=1)).to(memory_format=torch.channels_last)
        arms[name] = (m, torch.optim.AdamW(m.parameters(), 1e-3))

    default = rv.SMALL_MAP_PIXELS

    def run(name: str) -> float:
        rv.SMALL_MAP_PIXELS = default if name == "ours_small_map" else 0
        m, opt = arms[name]
        t0 = time.perf_counter()
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.rounds + 1):
        order = list(arms)
        order = order[r % len(order):] + order[:r % len(order)]
        for name in order:
            t = run(name)
            if r:
                times[name].append(t)
    rv.SMALL_MAP_PIXELS = default
    out: dict = {k: {**median_spread(v), "img_per_s": round(args.batch / statistics.median(v), 1)} for k, v in times.items()}
    out["small_map_pixels"] = default
    pairs = {"small_map_over_plain": ("ours_plain", "ours_small_map"), "ours_over_timm": ("timm", "ours_small_map")}
    for key, (slow, fast) in pairs.items():
        r = [a / b for a, b in zip(times[slow], times[fast])]
        out[key] = {"median": round(statistics.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}
    return out


def render(res: dict) -> str:
    m = res["machine"]
    out = [f"Machine: {m['cpu_model']}, {m['threads']} thread(s), torch {m['torch']}; batch {res['batch']}, "
           f"input {res['res']}x{res['res']}, {res['rounds']} interleaved rounds; load "
           f"{m.get('load_avg_1m_start')} -> {m.get('load_avg_1m_end')}", "",
           "| depthwise 3x3 fwd+bwd | plain ms (min..max) | small-map ms (min..max) | speed-up (range) |",
           "|---|---|---|---|"]
    for r in res["layers"]:
        p, s = r["plain"], r["small_map"]
        out.append(f"| {'x'.join(map(str, r['shape']))} | {p['median_ms']} ({p['min_ms']}..{p['max_ms']}) | "
                   f"{s['median_ms']} ({s['min_ms']}..{s['max_ms']}) | {r['speedup_median']}x "
                   f"({r['speedup_range'][0]}..{r['speedup_range'][1]}) |")
    st = res["step"]
    out += ["", "| M0.9 training step | median ms (min..max) | img/s |", "|---|---|---|"]
    for k in ("ours_plain", "ours_small_map", "timm"):
        out.append(f"| {k} | {st[k]['median_ms']} ({st[k]['min_ms']}..{st[k]['max_ms']}) | {st[k]['img_per_s']} |")
    out += ["", f"small-map / plain speed-up: {st['small_map_over_plain']}; ours / timm: {st['ours_over_timm']}"]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results" / "small_map_dwconv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"batch": args.batch, "res": args.res, "rounds": args.rounds, "machine": machine_info(args.threads)}
    res["layers"] = layers(args)
    res["step"] = step(args)
    if hasattr(os, "getloadavg"):
        res["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "small_map_dwconv.json", json.dumps(res, indent=2))
    atomic_write_text(out / "small_map_dwconv.md", render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
