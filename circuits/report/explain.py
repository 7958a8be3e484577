"""Report section: explanation maps and their benchmarks (Chefer, Gur & Wolf 2021;
docs/explanations.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.report.html import figure_html, table_html

ANALYSES = ("explain",)


def report_section(runs: dict[str, Path]) -> list[str]:
    from circuits.runs.explain import summarize_benchmark

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

    from circuits.explain import upsample
    from circuits.runs.explain import load_maps
    from circuits.runs.results import read_manifest, read_table

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
