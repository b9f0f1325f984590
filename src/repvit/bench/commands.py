"""``repvit bench`` and ``repvit roadmap`` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils.files import probe_writable
from .runtimes import DEFAULT_RUNTIMES, RUNTIMES


# defaults of the options whose meaning differs between the CPU harness and --gpu mode
_CPU_DEFAULTS = {"warmup": 10, "iters": 10, "rounds": 5}
_GPU_DEFAULTS = {"warmup": 20, "iters": 30}
# options of the CPU harness that --gpu mode does not use (it would silently ignore them): flag -> "was it given?"
_CPU_ONLY_FLAGS = {
    "--runtimes": lambda a: a.runtimes is not None,
    "--threads": lambda a: a.threads is not None,
    "--rounds": lambda a: a.rounds is not None,
    "--markdown": lambda a: a.markdown is not None,
    "--plot": lambda a: a.plot is not None,
    "--plot-runtime": lambda a: a.plot_runtime is not None,
    "--downstream": lambda a: a.downstream,
    "--downstream-size": lambda a: a.downstream_size != 512,
    "--downstream-models": lambda a: a.downstream_models is not None,
    "--downstream-runtimes": lambda a: a.downstream_runtimes is not None,
    "--no-peak": lambda a: a.no_peak,
}


def _csv(s: str) -> list[str]:
    return [x for x in s.replace(",", " ").split() if x]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="batch-1 CPU latency of RepViT and timm peers across runtimes (JSON, Markdown, plot)",
        description="Batch-1 latency, interleaved, with warm-up; median, p10/p90 and spread; threads pinned. "
                    "Models: variant names, timm peer names, timm:repvit_* or groups default/repvit/peers/all.")
    p.add_argument("--models", nargs="+", type=str, default=None, metavar="M",
                   help="models or groups (default: repvit_m0_9 timm:repvit_m0_9 mobilenetv3_large_100); 'all' = full peer list")
    p.add_argument("--runtimes", nargs="+", type=str, default=None, metavar="R",
                   help=f"runtimes (default: {' '.join(DEFAULT_RUNTIMES)}; available: {', '.join(RUNTIMES)})")
    p.add_argument("--json", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown tables here (default: next to --json)")
    p.add_argument("--plot", type=Path, default=None, help="write the latency-vs-top-1 PNG here (default: next to --json)")
    p.add_argument("--plot-runtime", default=None, help="runtime whose latency the plot uses (default onnxruntime)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads, pinned (default: all CPUs available)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=None,
                   help=f"warm-up iterations (default {_CPU_DEFAULTS['warmup']}; --gpu: {_GPU_DEFAULTS['warmup']})")
    p.add_argument("--iters", type=int, default=None,
                   help=f"timed iterations per round (default {_CPU_DEFAULTS['iters']}; --gpu: timed batches, "
                        f"default {_GPU_DEFAULTS['iters']})")
    p.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds (default {_CPU_DEFAULTS['rounds']})")
    p.add_argument("--downstream", action="store_true",
                   help="also time features-only backbones at --downstream-size (paper: 512)")
    p.add_argument("--downstream-size", type=int, default=512)
    p.add_argument("--downstream-models", nargs="+", default=None, help="default: the RepViT models of this run")
    p.add_argument("--downstream-runtimes", nargs="+", default=None,
                   help="default: eager/onnxruntime/openvino among --runtimes")
    p.add_argument("--no-peak", action="store_true", help="skip the 2048^3 matmul peak measurement")
    p.add_argument("--gpu", action="store_true", help="GPU throughput mode (speed_gpu.py style); needs CUDA")
    p.add_argument("--gpu-batch", type=int, default=None, help="--gpu: batch size (default 256)")
    p.set_defaults(func=_bench)

    r = sub.add_parser(
        "roadmap", help="the paper's MobileNetV3-L -> RepViT-M0.9 walk: params, MACs, latency per step",
        description="Builds each roadmap step (one config per step, one generic builder), fuses it and "
                    "times it; prints a table next to the published iPhone 12 latency and top-1.")
    r.add_argument("--json", type=Path, default=None, help="write the steps as a JSON list here")
    r.add_argument("--markdown", type=Path, default=None)
    r.add_argument("--plot", type=Path, default=None, help="PNG plot (default: next to --json)")
    r.add_argument("--runtime", default="eager", choices=RUNTIMES)
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--input-size", type=int, default=224)
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--iters", type=int, default=10)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--no-measure", action="store_true", help="only params and MACs (no timing)")
    r.set_defaults(func=_roadmap)


def _sibling(base: Path | None, explicit: Path | None, suffix: str) -> Path | None:
    if explicit is not None:
        return explicit
    return base.with_suffix(suffix) if base is not None else None


def _check_outputs(args: argparse.Namespace) -> None:
    """Before a run that may take many minutes: the output paths must be writable files, and distinct (a --json
    ending in .md would be overwritten by the Markdown written next to it)."""
    paths = [p for p in (args.json, _sibling(args.json, args.markdown, ".md"), _sibling(args.json, args.plot, ".png"))
             if p is not None]
    for p in paths:
        if Path(p).is_dir():
            raise ValueError(f"output path {p} is a directory; give a file name")
        parent = Path(p).parent
        if str(parent) and parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot write {p}: {parent} is not a directory")
        probe_writable(Path(p))
    if len({Path(p).resolve() for p in paths}) < len(paths):
        raise ValueError(f"output paths coincide ({', '.join(map(str, paths))}): give --json a .json name, or "
                         "--markdown / --plot paths of their own")


def _write_outputs(args: argparse.Namespace, obj, md: str, plot) -> None:
    """Print the Markdown; write JSON, Markdown and PNG where asked (or next to --json)."""
    from .report import write_json, write_text
    print(md)
    if args.json:
        print(f"wrote {write_json(args.json, obj)}")
    mdp = _sibling(args.json, args.markdown, ".md")
    if mdp:
        print(f"wrote {write_text(mdp, md)}")
    png = _sibling(args.json, args.plot, ".png")
    if png and plot is not None:
        try:
            print(f"wrote {plot(png)}")
        except RuntimeError as e:  # no matplotlib / nothing plottable: the numbers are still written
            print(f"plot skipped: {e}")


def _bench(args: argparse.Namespace) -> int:
    from .report import bench_markdown, plot_bench, write_json
    models = [m for s in args.models for m in _csv(s)] if args.models else None
    if args.gpu:
        bad = [flag for flag, used in _CPU_ONLY_FLAGS.items() if used(args)]
        if bad:
            raise ValueError(f"{', '.join(bad)} do not apply to --gpu (GPU throughput mode takes --models, "
                             "--input-size, --gpu-batch, --warmup, --iters and --json)")
        _check_outputs(args)
        from .gpu import gpu_throughput
        warmup = _GPU_DEFAULTS["warmup"] if args.warmup is None else args.warmup
        iters = _GPU_DEFAULTS["iters"] if args.iters is None else args.iters
        batch = 256 if args.gpu_batch is None else args.gpu_batch
        rows = gpu_throughput(models, batch=batch, input_size=args.input_size, warmup=warmup, iters=iters)
        for r in rows:
            print(f"{r['display']:<28} {r['images_per_s']:10.0f} images/s  (batch {r['batch']}, {r['device']})")
        if args.json:
            write_json(args.json, {"schema": "repvit.bench.gpu/1", "results": rows,
                                   "settings": {"batch": batch, "input_size": args.input_size, "warmup": warmup,
                                                "iters": iters}})
        return 0
    if args.gpu_batch is not None:
        raise ValueError("--gpu-batch applies to --gpu only")
    from .harness import run_bench
    _check_outputs(args)
    runtimes = [x for s in args.runtimes for x in _csv(s)] if args.runtimes else None
    ds_models = [m for s in args.downstream_models for m in _csv(s)] if args.downstream_models else None
    ds_runtimes = [x for s in args.downstream_runtimes for x in _csv(s)] if args.downstream_runtimes else None
    opt = {k: (v if getattr(args, k) is None else getattr(args, k)) for k, v in _CPU_DEFAULTS.items()}
    res = run_bench(models, runtimes, threads=args.threads, input_size=args.input_size, warmup=opt["warmup"],
                    iters=opt["iters"], rounds=opt["rounds"], downstream=args.downstream,
                    downstream_size=args.downstream_size, downstream_models=ds_models,
                    downstream_runtimes=ds_runtimes,
                    peak=not args.no_peak)
    _write_outputs(args, res, bench_markdown(res), lambda png: plot_bench(res, png, args.plot_runtime))
    return 0


def _roadmap(args: argparse.Namespace) -> int:
    from .report import plot_roadmap, roadmap_markdown
    from .roadmap import run_roadmap
    if args.no_measure and args.plot is not None:
        raise ValueError("--plot draws the measured latencies, which --no-measure skips: drop one of them")
    _check_outputs(args)
    steps, meta = run_roadmap(runtime=args.runtime, threads=args.threads, input_size=args.input_size,
                              warmup=args.warmup, iters=args.iters, rounds=args.rounds, measure=not args.no_measure)
    plot = None if args.no_measure else (lambda png: plot_roadmap(steps, png))
    _write_outputs(args, steps, roadmap_markdown(steps, meta), plot)
    return 0
