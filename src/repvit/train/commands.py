"""CLI: ``repvit train``, ``repvit eval`` and ``repvit plot``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

__all__ = ["register", "resolve_train_config", "default_run_dir"]


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative_int(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    from repvit.data import DATA_FORMATS

    from .config import RESUME_OVERRIDABLE
    p = sub.add_parser("train", help="train a RepViT (default: a few-minute run on Fashion-MNIST)",
                       description="Train with a shipped recipe or a YAML file. With no arguments: a real, "
                                   "few-minute training on Fashion-MNIST that ends with a fused deploy model.")
    p.add_argument("--recipe", help="shipped recipe name (e.g. repvit_m0_9_300e_distill) or a YAML file; "
                                    "default: fashion_mnist")
    p.add_argument("--data", help="dataset: built-in name (fashion-mnist, digits) or a path (ImageNet layout, "
                                  ".tar, ...); overrides data.dataset")
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<time>; under torchrun: "
                                 "runs/<recipe>-<rdzv id> with --rdzv-id or --standalone, else required)")
    p.add_argument("--epochs", type=int, help="override schedule.epochs")
    p.add_argument("--seed", type=int, help="override run.seed")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt (or from a given "
                                                       "checkpoint file in it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set optim.base_lr=5e-4 (repeatable); with --resume "
                        "only these: " + ", ".join(RESUME_OVERRIDABLE))
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--list-recipes", action="store_true", help="list shipped recipes and exit")
    p.set_defaults(func=_train)

    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint (raw and EMA, train or deploy form)")
    e.add_argument("checkpoint", help="our .safetensors, any checkpoint repvit reads, or a run's last.pt / run dir; "
                   "a comma-separated list evaluates each member and their ensemble (mean probability)")
    e.add_argument("--data", required=True, help="built-in name (fashion-mnist, digits) or dataset path")
    e.add_argument("--split", default="val", help="split folder of the dataset (default: val)")
    e.add_argument("--format", dest="data_format", choices=DATA_FORMATS, default="auto",
                   help="how to read --data, as data.format in training (default: auto, detected from the files "
                        "of --split)")
    e.add_argument("--download-dir", help="folder of the Fashion-MNIST IDX files (or the Hugging Face datasets "
                   "cache); default: a run's data.download_dir for its last.pt / run dir, else the Debian path")
    e.add_argument("--form", choices=("train", "deploy"), default="train", help="evaluate as trained or fused")
    e.add_argument("--preprocessing", choices=("official", "timm"), default=None,
                   help="official: resize 256 / crop 224 (crop 0.875); timm: crop 0.95 (default: the crop the "
                        "checkpoint records, else official)")
    e.add_argument("--img-size", type=_positive_int, help="default: the checkpoint's preprocessing input size")
    e.add_argument("--batch-size", type=_positive_int, default=128)
    e.add_argument("--workers", type=_non_negative_int, default=4, help="data loader worker processes")
    e.add_argument("--max-samples", type=int, help="evaluate a deterministic subset")
    e.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="flip: average the probabilities of each image and its horizontal mirror (2x compute)")
    e.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    e.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    e.set_defaults(func=_eval)

    pl = sub.add_parser("plot", help="draw loss/accuracy/lr curves of a run to PNG")
    pl.add_argument("run_dir", help="a run directory (or its metrics.jsonl)")
    pl.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
    pl.set_defaults(func=_plot)


def resolve_train_config(args: argparse.Namespace):
    """Recipe -> --data/--epochs/--seed -> --set, validated."""
    from .config import apply_overrides
    from .recipes import load_recipe

    cfg = load_recipe(args.recipe)
    if args.data:
        cfg.data.dataset = args.data
    if args.epochs is not None:
        cfg.schedule.epochs = args.epochs
        cfg.schedule.warmup_epochs = min(cfg.schedule.warmup_epochs, args.epochs)
    if args.seed is not None:
        cfg.run.seed = args.seed
    return apply_overrides(cfg, args.overrides)


def _train(args: argparse.Namespace) -> int:
    from .config import dump_yaml
    from .recipes import DEFAULT_RECIPE, list_recipes

    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    if args.resume:
        given = [flag for flag, v in (("--recipe", args.recipe), ("--data", args.data),
                                      ("--dry-run", args.dry_run), ("--epochs", args.epochs is not None),
                                      ("--seed", args.seed is not None), ("--out", args.out)) if v]
        if given:
            raise ValueError(f"--resume continues a run with its saved config and directory; drop {', '.join(given)} "
                             "(to train longer, start a new run from the result with --set model.pretrained=...)")
        from .config import check_resume_overrides
        from .loop import train
        check_resume_overrides(args.overrides)     # --set: only keys that may change mid-run (error lists them)
        res = train(None, resume=args.resume, overrides=args.overrides)  # type: ignore[arg-type]
        _print_summary(res)
        return 0
    cfg = resolve_train_config(args)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    out = args.out or default_run_dir(args.recipe or DEFAULT_RECIPE)
    if (Path(out) / "last.pt").exists():
        raise ValueError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    from .loop import train
    res = train(cfg, out)
    _print_summary(res)
    return 0


def default_run_dir(recipe: str) -> str:
    """``runs/<recipe>-<time>`` for one process. Under torchrun (WORLD_SIZE > 1) every rank must name the same
    directory, and their clocks need not agree: ``runs/<recipe>-<TORCHELASTIC_RUN_ID>`` when torchrun was given a
    ``--rdzv-id`` (or ``--standalone``, which sets one), else a ValueError asking for ``--out``."""
    import os
    import re
    stem = Path(recipe).stem
    if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "").strip()
        if run_id.lower() != "none" and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", run_id):
            return f"runs/{stem}-{run_id}"     # torchrun --standalone sets a uuid shared by its workers
        raise ValueError("under torchrun every process must write the same run directory: pass --out DIR (or "
                         "give torchrun --rdzv-id ID or --standalone: the directory is then runs/<recipe>-<rdzv id>)")
    return f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _print_summary(res) -> None:
    import os
    if int(os.environ.get("RANK", "0")) != 0:
        return
    s = res.summary
    lines = [f"run directory   {res.run_dir}",
             f"best top-1      {res.best_top1:.2f}% ({res.best_source} weights, epoch {res.best_epoch})"]
    if res.deploy_top1 is not None:
        lines.append(f"deploy top-1    {res.deploy_top1:.2f}% (fused model, {s.get('deploy_params', 0):,} params)")
    lines += [f"wall time       {res.wall_s / 60:.1f} min",
              f"saved           {res.run_dir}/best.safetensors (train form), {res.run_dir}/deploy.safetensors (fused)",
              f"next            repvit eval {res.run_dir}/deploy.safetensors --data <data>; repvit plot {res.run_dir}"]
    print("\n".join(lines))


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint
    res = evaluate_checkpoint(args.checkpoint, args.data, form=args.form, eval_crop=args.preprocessing,
                              batch_size=args.batch_size, device=args.device, img_size=args.img_size,
                              num_workers=args.workers, max_samples=args.max_samples, split=args.split,
                              tta=args.tta, data_format=args.data_format, download_dir=args.download_dir)
    print(f"data: {res['data']}")
    for note in res.get("notes", []):
        print(note)
    for r in res["results"]:
        print(f"{r['weights']:>7} ({r['form']}): top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  "
              f"on {r['n']} images" + (f", {r['skipped']} unreadable skipped" if r["skipped"] else ""))
    if args.json:
        print(json.dumps(res))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_run
    if args.out and not Path(args.out).is_dir() and Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: the curves are written as PNG; give a path ending in .png")
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0
