"""`hooked-vit explain`: explanation maps benchmarked over a dataset; report section, demo step."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.commands import DemoContext
from circuits.commands._common import add_model_args, add_run_args, say_done
from circuits.report import figure_html, table_html

ORDER = 50
ANALYSES = ("explain",)
DEMO_IMAGES = 128


def add_parser(sub) -> None:
    from circuits.explain import DEFAULT_METHODS, METHODS

    p = sub.add_parser("explain", help="explanation maps and their benchmarks over a dataset",
                       description="Explain every image with each method, then the segmentation test (datasets "
                                   "with masks), positive / negative perturbation and keep-the-most-important "
                                   f"AUCs. Methods: {', '.join(METHODS)}; options as name:key=value "
                                   "(e.g. tokentm:necc=none).")
    add_model_args(p)
    add_run_args(p)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods or name:key=value specs")
    p.add_argument("--mode", choices=["remove", "zero"], default="remove",
                   help="perturb by dropping tokens (remove) or zeroing their pixels (zero)")
    p.add_argument("--target", choices=["label", "predicted"], default="label", help="the class to explain")
    p.add_argument("--thumbnails", type=int, default=4, help="images kept for the report's map overlays")
    p.add_argument("--sanity-images", type=int, default=16,
                   help="images for the model-parameter randomisation check (0: skip)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from circuits.explain import benchmark, parse_method, summarize_benchmark
    from circuits.sources import load_dataset, load_model

    for spec in args.methods:  # before the (slow) model loading
        parse_method(spec)
    model = load_model(args.model, args.arch, args.device, args.random_weights)
    dataset = load_dataset(args.data, model)
    store = benchmark(model, dataset, args.out, args.methods, batch_size=args.batch_size, limit=args.limit,
                      mode=args.mode, target=args.target, thumbnails=args.thumbnails,
                      sanity_images=args.sanity_images, num_workers=args.workers, overwrite=args.overwrite)
    say_done(store)
    print(summarize_benchmark(store.root).drop(columns=["positive_curve", "negative_curve"]).to_string(index=False))
    return 0


def demo(ctx: DemoContext) -> None:
    from circuits.explain import benchmark

    benchmark(ctx.trained, ctx.data, ctx.out / "explain" / "trained", batch_size=ctx.batch_size,
              limit=DEMO_IMAGES, sanity_images=16, overwrite=ctx.overwrite)


# ----------------------------------------------------------------------------- report
def report_section(runs: dict[str, Path]) -> list[str]:
    from circuits.explain import summarize_benchmark

    out = ["<h2>Explanation maps and their benchmarks</h2>",
           "<p>Relevance of every image token for the explained class. Segmentation test: the map upsampled "
           "to pixels, thresholded at its mean, against the object mask (pixel accuracy, mIoU over object and "
           "background, mAP). Perturbation test: remove 0, 10, ..., 90% of the patches, most relevant first "
           "(positive: lower AUC is better) or least relevant first (negative: higher is better); AUC = mean "
           "top-1 accuracy over the curve. Keep-AUC (Vilas et al.): sum(acc) / (max(acc) * steps) of the same "
           "curves. 'random' is a random token order. Reference shape (ImageNet, ViT-B/16, Chefer et al. "
           "2021): rollout 73.5 / 55.4 / 84.8 and transformer attribution 79.7 / 62.0 / 86.0 "
           "(pixAcc / mIoU / mAP).</p>"]
    for label, run in runs.items():
        table = summarize_benchmark(run)
        out.append(table_html(_table_rows(table), f"{label}: benchmark (one row per method)"))
        out.append(figure_html(_curves_figure(label, table)))
        maps = _overlay_figure(label, run)
        if maps is not None:
            out.append(figure_html(maps))
        sanity = Path(run) / "sanity.json"
        if sanity.exists():
            out.append(figure_html(_sanity_figure(label, json.loads(sanity.read_text()))))
    return out


def _table_rows(table: pd.DataFrame) -> list[dict]:
    names = {"pixel_accuracy": "pixel accuracy", "miou": "mIoU", "map": "mAP",
             "positive_auc": "positive AUC (lower better)", "negative_auc": "negative AUC (higher better)",
             "keep_auc_most": "keep-AUC most important", "keep_auc_least": "keep-AUC least important"}
    return [{"method": r["method"], **{v: r[k] for k, v in names.items() if k in r}} for r in table.to_dict("records")]


def _curves_figure(label: str, table: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for r in table.to_dict("records"):
        x = np.linspace(0, 0.1 * (len(r["positive_curve"]) - 1), len(r["positive_curve"]))
        for order, dash in (("positive", "solid"), ("negative", "dash")):
            fig.add_scatter(x=x, y=r[f"{order}_curve"], name=f"{r['method']} · {order}", mode="lines+markers",
                            line=dict(dash=dash, color="grey" if r["method"].startswith("random") else None))
    fig.update_layout(title=f"{label}: top-1 accuracy as patches are removed (solid: most relevant first)",
                      xaxis_title="fraction of patches removed", yaxis_title="top-1 accuracy", yaxis_range=[0, 1.02])
    return fig


def _overlay_figure(label: str, run: Path, n: int = 4):
    """The first images with every method's map (upsampled, min-max normalised) on top."""
    import torch

    from circuits.explain import load_maps, upsample
    from circuits.results import read_manifest, read_table

    if not any((Path(run) / "thumbnails").glob("part-*.parquet")):
        return None
    thumbs = read_table(run, "thumbnails").head(n)
    maps = load_maps(run)
    index = read_table(run, "images")["index"].to_numpy()
    grid = tuple(read_manifest(run)["settings"]["grid"])
    methods = list(maps)
    fig = make_subplots(rows=len(thumbs), cols=len(methods) + 1, horizontal_spacing=0.01, vertical_spacing=0.02,
                        column_titles=["image"] + methods)
    for i, row in enumerate(thumbs.to_dict("records")):
        h, w = int(row["height"]), int(row["width"])
        rgb = np.asarray(row["pixels"], dtype=np.uint8).reshape(h, w, 3)
        pos = int(np.nonzero(index == row["index"])[0][0])
        for j in range(len(methods) + 1):
            fig.add_trace(go.Image(z=rgb), row=i + 1, col=j + 1)
            if j:
                rel = torch.from_numpy(maps[methods[j - 1]][pos : pos + 1])
                pix = upsample(rel, (h, w), grid)[0].numpy()
                fig.add_trace(go.Heatmap(z=pix, colorscale="Jet", opacity=0.5, showscale=False, zmin=0, zmax=1),
                              row=i + 1, col=j + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=f"{label}: maps of the first images (red = relevant)", height=150 * len(thumbs) + 80,
                      width=max(600, 130 * (len(methods) + 1)), margin=dict(l=10, r=10, t=90, b=10))
    return fig


def _sanity_figure(label: str, rows: list[dict]) -> go.Figure:
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for method, sel in df.groupby("method", sort=False):
        sel = sel.sort_values("step")
        fig.add_scatter(x=sel["stage"], y=sel["spearman"], name=method, mode="lines+markers")
    fig.update_layout(title=f"{label}: model-parameter randomisation (cascading from the top): rank correlation "
                            "with the original maps; it must fall", xaxis_title="re-initialised down to",
                      yaxis_title="Spearman correlation", yaxis_range=[-0.2, 1.05])
    return fig
