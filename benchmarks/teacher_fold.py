"""Distillation teacher forward: folded (how the training loop runs it) vs un-folded, side by side.

A frozen teacher only runs in eval mode, so ``repvit.train.distill.build_teacher`` folds it
(``inference_form``: RepViT's deploy form, timm's ``reparameterize_model`` for timm's re-parameterisable
models). This script times the teacher's forward both ways on one batch, interleaved (order reversed every
other round), under the same autocast and memory format as training, and reports the per-round ratio
folded / un-folded (median and range), plus the largest difference of the two softmax outputs.

    python benchmarks/teacher_fold.py --teacher runs/a/last.pt,runs/b/last.pt --in-chans 1 --num-classes 10 \\
        --res 64 --batch 256 --amp bf16 --json benchmarks/results/teacher_fold/amx_r64.json

Without ``--teacher`` it builds two random RepViT-M0.9 models (random BatchNorm statistics) and times their
ensemble: speed does not depend on trained weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without an install
import repvit  # noqa: E402
from repvit.bench.machine import machine_info, pin_threads  # noqa: E402
from repvit.bench.report import machine_line, write_json, write_text  # noqa: E402
from repvit.bench.timing import measure_interleaved, paired_ratio  # noqa: E402
from repvit.train import distill  # noqa: E402


def random_teachers(workdir: Path, variant: str, n: int, num_classes: int, in_chans: int) -> str:
    """``n`` random checkpoints of ``variant`` with non-trivial BatchNorm statistics; their comma-separated paths."""
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = repvit.create_model(variant, num_classes=num_classes, in_chans=in_chans)
        for b in m.modules():
            if isinstance(b, torch.nn.modules.batchnorm._BatchNorm):
                b.running_mean.uniform_(-0.1, 0.1)
                b.running_var.uniform_(0.5, 1.5)
        paths.append(workdir / f"teacher{seed}.safetensors")
        repvit.save_checkpoint(m, paths[-1])
    return ",".join(str(p) for p in paths)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", help="distill.teacher value (file, run dir, variant, timm name, or A,B ensemble)")
    ap.add_argument("--variant", default="repvit_m0_9", help="random teachers' variant (without --teacher)")
    ap.add_argument("--members", type=int, default=2, help="random teachers in the ensemble (without --teacher)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/teacher_fold/teacher_fold.json"))
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        spec = args.teacher or random_teachers(Path(tmp), args.variant, args.members, args.num_classes,
                                               args.in_chans)
        folded = distill.build_teacher(spec, None, num_classes=args.num_classes, in_chans=args.in_chans)
        with mock.patch.object(distill, "inference_form", lambda m: m.eval()):
            plain = distill.build_teacher(spec, None, num_classes=args.num_classes, in_chans=args.in_chans)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for t in (folded, plain):
        t.to(memory_format=fmt)
    x = torch.randn(args.batch, args.in_chans, args.res, args.res).contiguous(memory_format=fmt)

    def runner(t):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                return t(x).float()
        return run

    with pin_threads(args.threads) as pinned:
        machine = {**machine_info(pinned["threads"]), "cpus": pinned["cpus"]}
        diff = (torch.softmax(runner(folded)(), -1) - torch.softmax(runner(plain)(), -1)).abs().max().item()
        stats = measure_interleaved({"folded": runner(folded), "unfolded": runner(plain)}, warmup=args.warmup,
                                    iters=args.iters, rounds=args.rounds, rewarm=0)
        machine["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ratio = paired_ratio(stats["folded"], stats["unfolded"])
    result = {"teacher": args.teacher or f"{args.members} random {args.variant}", "settings": vars(args) | {
        "json": str(args.json), "threads": pinned["threads"]}, "machine": machine, "stats": stats,
        "ratio_folded_over_unfolded": ratio, "max_softmax_diff": diff}
    write_json(args.json, result)
    ms = {k: v["median"] for k, v in stats.items()}                      # already in ms
    md = (f"Teacher forward, {result['teacher']}, batch {args.batch}, {args.res}x{args.res}, amp {args.amp}, "
          f"{pinned['threads']} thread(s); {machine_line(machine)}\n\n"
          "| folded ms | un-folded ms | folded / un-folded (median; min-max of per-round ratios) | max softmax diff |\n"
          "|---:|---:|---:|---:|\n"
          f"| {ms['folded']:.1f} | {ms['unfolded']:.1f} | {ratio['ratio']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})"
          f" | {diff:.2g} |\n")
    write_text(args.json.with_suffix(".md"), md)
    print(md)
    return result


if __name__ == "__main__":
    main()
