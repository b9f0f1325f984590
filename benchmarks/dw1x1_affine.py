"""The token mixer's 1x1 branch while training: a 1x1 depthwise conv plus the identity, or one affine map?

RepViT's token mixer is ``bn(dwconv3x3_bn(x) + dwconv1x1(x) + x)``. The last two terms are a per-channel affine
map, ``x * (w + 1) + b``, which one ``torch.addcmul`` computes with the same parameters (rounded once to the
stream's dtype). This script times both forms, forward + backward, at RepViT-M0.9's stage shapes for a given input
size, in NCHW and channels_last, fp32 and bf16 autocast (bf16 activations in, as in the network): interleaved in
one process, order alternated per round, median and spread of the per-round ratios. It decided against the
affine form: faster in NCHW float32 only, slower in the channels_last / bf16 settings that train fastest on CPU,
so ``repvit.models.repvit.RepDWConv`` keeps the conv (as the official code and timm do).

    python benchmarks/dw1x1_affine.py --threads 2 --batch 256 --res 64 --rounds 9

Writes OUT/dw1x1_affine.json and OUT/dw1x1_affine.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from repvit.bench.machine import machine_info  # noqa: E402
from repvit.utils.files import atomic_write_text  # noqa: E402

WIDTHS = (48, 96, 192, 384)   # RepViT-M0.9, stages 1-4 (strides 4, 8, 16, 32)


def _forms(c: int):
    conv = torch.nn.Conv2d(c, c, 1, groups=c, bias=True)
    return {"conv_plus_identity": lambda x: conv(x) + x,
            # as RepDWConv._conv1_plus_identity: float32 parameters, rounded once to the stream's dtype
            "affine": lambda x: torch.addcmul(conv.bias.view(1, c, 1, 1), x, conv.weight.view(1, c, 1, 1) + 1).to(x.dtype)}


def measure(args) -> list[dict]:
    rows = []
    for stage, c in enumerate(WIDTHS):
        hw = max(1, args.res // (4 * 2 ** stage))
        for layout in ("nchw", "channels_last"):
            for dtype in ("fp32", "bf16"):
                fns = _forms(c)
                # under bf16 autocast the activations reaching the token mixer are bf16 (the previous conv's output)
                x0 = torch.randn(args.batch, c, hw, hw, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
                if layout == "channels_last":
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                times: dict[str, list[float]] = {k: [] for k in fns}
                for r in range(args.rounds + 1):
                    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                        x = x0.clone().requires_grad_()
                        t0 = time.perf_counter()
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                            y = fns[name](x)
                        y.float().sum().backward()
                        if r:                               # round 0 is warm-up
                            times[name].append(time.perf_counter() - t0)
                ratios = [a / b for a, b in zip(times["affine"], times["conv_plus_identity"])]
                rows.append({"stage": stage + 1, "shape": [args.batch, c, hw, hw], "layout": layout, "dtype": dtype,
                             "conv_ms": round(1000 * statistics.median(times["conv_plus_identity"]), 3),
                             "affine_ms": round(1000 * statistics.median(times["affine"]), 3),
                             "affine_over_conv": round(statistics.median(ratios), 3),
                             "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--res", type=int, default=64, help="input size of the network (stage maps are res/4 ... res/32)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results" / "dw1x1_affine")
    args = ap.parse_args()
    if args.rounds < 1 or args.batch < 1 or args.res < 4 or args.threads < 1:
        ap.error("--rounds, --batch and --threads must be >= 1 and --res >= 4")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = measure(args)
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": machine_info(args.threads), "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "dw1x1_affine.json", json.dumps(out, indent=2) + "\n")
    md = ["| stage | shape | layout | dtype | conv+identity ms | affine ms | affine/conv (median) | min | max |",
          "|---|---|---|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['stage']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['dtype']} | {r['conv_ms']} | "
           f"{r['affine_ms']} | {r['affine_over_conv']} | {r['ratio_min']} | {r['ratio_max']} |" for r in rows]
    atomic_write_text(args.out_dir / "dw1x1_affine.md", "\n".join(md) + "\n")
    print(f"wrote {args.out_dir / 'dw1x1_affine.json'} and .md")


if __name__ == "__main__":
    main()
