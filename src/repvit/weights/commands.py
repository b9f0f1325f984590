"""``repvit models`` (variant table) and ``repvit convert`` (between checkpoint formats)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list every variant with params, MACs, published top-1 and latency")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (faster)")
    p.set_defaults(func=_models)

    p = sub.add_parser("convert", help="convert a checkpoint between official, timm and repvit formats")
    p.add_argument("source", help="checkpoint file in any supported format")
    p.add_argument("out", help="output path")
    p.add_argument("--to", choices=["repvit", "timm", "official"], default="repvit", help="target format")
    p.add_argument("--variant", help="variant name (default: inferred from the file)")
    p.add_argument("--deploy", action="store_true", help="fuse to the deploy form before writing")
    p.add_argument("--use-ema", action="store_true", help="take the EMA weights of a training checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing OUT (never the SOURCE itself)")
    p.set_defaults(func=_convert)


def model_table(with_macs: bool = True) -> list[dict]:
    from ..models import FACTS, build_model, list_models
    from ..reparam import reparameterize
    from ..utils.complexity import count_macs, count_params

    rows = []
    for name in list_models():
        train = build_model(name)
        fused = reparameterize(train)
        f = FACTS[name]
        rows.append({
            "variant": name, "legacy": train.spec.legacy,
            "train_params": count_params(train), "deploy_params": count_params(fused),
            "macs": count_macs(fused) if with_macs else None,
            "top1_300e": f.top1_300e, "top1_450e": f.top1_450e, "latency_ms_iphone12": f.latency_ms_iphone12,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    def fmt(v, spec=""):
        return "-" if v is None else format(v, spec)

    head = "| variant | train params (M) | deploy params (M) | GMACs | top-1 300e | top-1 450e | iPhone 12 ms |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        name = r["variant"] + (" (legacy)" if r["legacy"] else "")
        macs = None if r["macs"] is None else r["macs"] / 1e9
        lines.append(f"| {name} | {r['train_params'] / 1e6:.2f} | {r['deploy_params'] / 1e6:.2f} | {fmt(macs, '.2f')} | "
                     f"{fmt(r['top1_300e'])} | {fmt(r['top1_450e'])} | {fmt(r['latency_ms_iphone12'])} |")
    return "\n".join(lines)


def _models(args: argparse.Namespace) -> int:
    rows = model_table(with_macs=not args.no_macs)
    print(format_table(rows))
    print("\ntrain params: single head; deploy: fused. MACs: fused model, 224x224, fvcore convention. "
          "top-1 (ImageNet-1K, distilled) and iPhone 12 latency: published (paper / official README).")
    if args.json:
        from ..utils.files import atomic_write_json
        atomic_write_json(args.json, rows)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..models.specs import default_preprocessing
    from ..reparam import reparameterize
    from .api import create_model, save_checkpoint
    from .io import PICKLE_SUFFIXES, read_checkpoint

    src, out = Path(args.source), Path(args.out)
    # checked before anything is read: a convert onto its own source (with --deploy, or to a format without
    # metadata) would destroy what cannot be recovered - train-form weights, the EMA, the recorded preprocessing
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise ValueError(f"OUT is the SOURCE file ({args.out}); write the converted checkpoint to another path")
    if out.exists() and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to replace it, or choose another OUT")
    ck = read_checkpoint(args.source, use_ema=args.use_ema or None)
    variant = args.variant or ck.variant
    model = create_model(variant, checkpoint=args.source, use_ema=args.use_ema or None)
    if args.deploy and not model.deploy:
        model = reparameterize(model)
    save_checkpoint(model, args.out, format=args.to)
    form = "deploy" if model.deploy else "train"
    print(f"read {ck.describe()}\nwrote {args.out}: {args.to} format, {variant}, {form} form")
    recorded = "preprocessing" in ck.metadata
    dropped = args.to == "official" or (args.to == "timm" and out.suffix.lower() in PICKLE_SUFFIXES)
    if dropped and recorded and model.preprocessing != default_preprocessing(model.in_chans):
        print(f"note: a {args.to}-format pickle records no preprocessing; {args.source}'s (input size "
              f"{model.preprocessing.get('input_size')}, mean {model.preprocessing.get('mean')}) is not in "
              f"{args.out}: keep SOURCE, or pass the size and mean/std again when you use the file")
    if args.to == "repvit" and not recorded:
        print(f"note: {args.source} records no preprocessing; {args.out} holds the defaults for {model.in_chans}-"
              f"channel input ({model.preprocessing.get('input_size')}): set the right ones with "
              "repvit.save_checkpoint(model, path, preprocessing=...) if the weights were trained otherwise")
    return 0
