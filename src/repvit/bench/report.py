"""Write benchmark results: JSON, Markdown tables, and the paper-style latency/top-1 plot."""

from __future__ import annotations

import os
from pathlib import Path

from ..utils.files import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["write_json", "write_text", "bench_markdown", "roadmap_markdown", "plot_bench", "plot_roadmap"]


write_text = atomic_write_text
write_json = atomic_write_json


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def machine_line(m: dict) -> str:
    flags = ", ".join(k for k, v in m.get("cpu_flags", {}).items() if v)
    load = ""
    if "load_avg_1m_start" in m:
        load = f"; load avg (1 min) {m['load_avg_1m_start']:.2f} at start, {m.get('load_avg_1m_end', float('nan')):.2f} at end"
    return (f"{m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['threads']} threads pinned to CPUs "
            f"{m.get('cpus')}; ISA: {flags}; native bf16: {m.get('native_bf16')}; torch {m['torch']}, "
            f"onnxruntime {m.get('onnxruntime')}, openvino {m.get('openvino')}, executorch {m.get('executorch')}, timm {m.get('timm')}{load}")


def _rows_table(rows: list[dict]) -> list[str]:
    out = ["| Model | Runtime | dtype | Params (M) | GMACs | median ms | p10 | p90 | spread | GFLOP/s | % peak | top-1 (published) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat = r.get("latency_ms")
        if lat is None:
            out.append(f"| {r['display']} | {r['runtime']} | {r.get('dtype', '-')} | - | - | {r['status']}: "
                       f"{str(r.get('reason', ''))[:80]} | | | | | | |")
            continue
        pf = r.get("peak_fraction")
        out.append(
            f"| {r['display']} | {r['runtime']} | {r.get('dtype')} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | "
            f"{lat['median']:.2f} | {lat['p10']:.2f} | {lat['p90']:.2f} | {lat['spread']:.2f} | "
            f"{_f(r.get('gflops'), '.1f')} | {_f(None if pf is None else 100 * pf, '.1f')} | {_f(r.get('published_top1'), '.1f')} |")
    return out


def bench_markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"Machine: {machine_line(res['machine'])}.", "",
             f"Batch 1, {s['input_size'][0]}x{s['input_size'][1]}, warm-up {s['warmup']}, {s['rounds']} interleaved "
             f"rounds x {s['iters']} iterations; spread = (p90 - p10) / median.", ""]
    if res.get("peak"):
        lines.append("Matmul peak (" + ", ".join(
            f"{k}: {v['gflops']:.1f} GFLOP/s" for k, v in res["peak"].items()) + f", n={next(iter(res['peak'].values()))['n']}).")
        lines.append("")
    lines += _rows_table(res["results"])
    if res.get("downstream"):
        dp = res.get("downstream_peak") or {}
        peak_txt = f" (interleaved fp32 matmul peak: {dp['fp32']['gflops']:.1f} GFLOP/s)" if "fp32" in dp else ""
        lines += ["", f"Downstream backbones (features only) at {s['downstream_size']}x{s['downstream_size']}, "
                  f"{s.get('downstream_rounds', s['rounds'])} rounds x {s.get('downstream_iters', s['iters'])} "
                  f"iterations{peak_txt}:", ""]
        lines += _rows_table(res["downstream"])
    if res.get("ratios"):
        lines += ["", "| Comparison | ratio (median of per-round ratios) | min | max |", "|---|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['ratio']:.3f} | {r['min']:.3f} | {r['max']:.3f} |" for r in res["ratios"]]
    t = res.get("targets") or {}
    if t:
        lines += ["", f"Targets for {t['model']}:", "", "| Target | value | goal | met |", "|---|---:|---|---|"]
        for k, v in t.items():
            if isinstance(v, dict):
                lines.append(f"| {k}{' (' + v['runtime'] + ')' if 'runtime' in v else ''} | {v['value']:.3f} | "
                             f"{v['target']} | {'yes' if v['met'] else 'no'} |")
    sources = sorted({(r['display'], r.get('top1_source')) for r in res["results"] if r.get("published_top1")})
    if sources:
        lines += ["", "Published top-1 sources: " + "; ".join(f"{d}: {src}" for d, src in sources) + "."]
    return "\n".join(lines) + "\n"


def roadmap_markdown(steps: list[dict], meta: dict) -> str:
    lines = [f"Machine: {machine_line(meta)}.", "",
             f"Fused models, batch 1, {meta.get('input_size', 224)}, runtime {meta.get('runtime', 'eager')}, "
             "interleaved; published columns: the paper's iPhone 12 latency and ImageNet-1K top-1 without "
             "distillation (arXiv 2307.09283, section 3).", "",
             "| # | Step | Params (M) | GMACs | median ms | p90 | published iPhone 12 ms | published top-1 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in steps:
        lines.append(f"| {s['index']} | {s['step']} | {s['params'] / 1e6:.2f} | {s['macs'] / 1e9:.3f} | "
                     f"{_f(s.get('latency_ms'))} | {_f(s.get('latency_p90_ms'))} | {_f(s['published_latency_ms'])} | "
                     f"{_f(s['published_top1'], '.1f')} |")
    return "\n".join(lines) + "\n"


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'repvit[plot]'") from e


def plot_bench(res: dict, path: str | os.PathLike, runtime: str | None = None) -> Path:
    """Latency (one runtime, all models) vs published top-1, one line per family (paper Fig. 1 style)."""
    plt = _plt()
    rows = [r for r in res["results"] if "latency_ms" in r and r.get("published_top1")]
    rts = [r["runtime"] for r in rows]
    runtime = runtime or ("onnxruntime" if "onnxruntime" in rts else (rts[0] if rts else None))
    rows = [r for r in rows if r["runtime"] == runtime]
    if not rows:
        raise RuntimeError("nothing to plot: no model with a published top-1 was timed")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    # red is reserved for our RepViT: peers take the other tab10 colours
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 3]
    for k, (fam, rs) in enumerate(sorted(fams.items())):
        rs.sort(key=lambda r: r["latency_ms"]["median"])
        ours = fam.startswith("RepViT (ours)")
        ax.plot([r["latency_ms"]["median"] for r in rs], [r["published_top1"] for r in rs],
                marker="*" if ours else "o", markersize=12 if ours else 6, linewidth=2.5 if ours else 1.2,
                color="tab:red" if ours else palette[k % len(palette)], label=fam, zorder=3 if ours else 2)
        for r in rs:
            ax.annotate(r["display"].replace(" (timm)", ""), (r["latency_ms"]["median"], r["published_top1"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"batch-1 latency (ms), {runtime}, {res['machine']['threads']} threads, "
                  f"{res['machine']['cpu_model'][:40]}")
    ax.set_ylabel("ImageNet-1k top-1 (%), published")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Latency on this CPU vs published accuracy (random weights timed)")
    fig.tight_layout()
    out = atomic_write(path, lambda t: fig.savefig(t, dpi=130, format="png"))
    plt.close(fig)
    return out


def plot_roadmap(steps: list[dict], path: str | os.PathLike) -> Path:
    """Measured latency per step next to the published iPhone 12 latency (two y axes) and top-1."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    xs = [s["index"] for s in steps]
    ax.plot(xs, [s.get("latency_ms") for s in steps], "o-", color="tab:blue", label="measured CPU latency (ms)")
    ax.set_ylabel("measured latency (ms)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [s["published_latency_ms"] for s in steps], "s--", color="tab:orange",
             label="published iPhone 12 latency (ms)")
    ax2.set_ylabel("published iPhone 12 latency (ms)", color="tab:orange")
    for s in steps:
        if s["published_top1"] is not None:
            ax2.annotate(f"{s['published_top1']:.1f}%", (s["index"], s["published_latency_ms"]), fontsize=7,
                         xytext=(0, 6), textcoords="offset points", ha="center")
    ax.set_xticks(xs)
    ax.set_xticklabels([s["step"] for s in steps], rotation=35, ha="right", fontsize=7)
    ax.set_title("MobileNetV3-L -> RepViT-M0.9 roadmap (labels: published top-1)")
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=7)
    fig.tight_layout()
    out = atomic_write(path, lambda t: fig.savefig(t, dpi=130, format="png"))
    plt.close(fig)
    return out
