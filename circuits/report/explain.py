"""Report section: explanation maps and their benchmarks (Chefer, Gur & Wolf 2021;
docs/explanations.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from circuits.plot import method_colors, quantise, token_maps
from circuits.report.assets import read_labels, read_thumbnails
from circuits.report.html import figure_html, table_html

ANALYSES = ("explain",)


def report_section(runs: dict[str, Path], images: int = 4) -> list[str]:
    """images: how many images get their relevance maps drawn (those the run kept thumbnails of)."""
    from circuits.runs.explain import summarize_benchmark

    tables = {label: summarize_benchmark(run) for label, run in runs.items()}
    has_masks = any("pixel_accuracy" in t for t in tables.values())
    segmentation = ("Segmentation test: the map upsampled to pixels, thresholded at its mean, against the object "
                    "mask (pixel accuracy, mIoU over object and background, mAP). ") if has_masks else ""
    reference = ("Reference shape (ImageNet, ViT-B/16, Chefer et al. 2021): rollout 73.5 / 55.4 / 84.8 and "
                 "transformer attribution 79.7 / 62.0 / 86.0 (pixAcc / mIoU / mAP).") if has_masks else ""
    out = ["<h2>Explanation maps and their benchmarks</h2>",
           f"<p>Relevance of every image token for the explained class. {segmentation}Perturbation test: remove "
           "0, 10, ..., 90% of the patches, most relevant first (positive: lower AUC is better) or least relevant "
           "first (negative: higher is better); AUC = mean top-1 accuracy over the curve. Keep-AUC (Vilas et al.): "
           "sum(acc) / (max(acc) * steps) of the same curves. 'random' is a random token order (grey). "
           f"{reference}</p>"]
    for label, run in runs.items():
        table = tables[label]
        out.append(table_html(_table_rows(table), f"{label}: benchmark (one row per method)"))
        out.append(figure_html(_curves_figure(label, table)))
        maps = _overlay_figure(label, run, images)
        if maps is not None:
            out.append(figure_html(maps))
        sanity = Path(run) / "sanity.json"
        if sanity.exists():
            out.append(figure_html(_sanity_figure(label, json.loads(sanity.read_text()), method_colors(table["method"]))))
    return out


def _table_rows(table: pd.DataFrame) -> list[dict]:
    names = {"pixel_accuracy": "pixel accuracy", "miou": "mIoU", "map": "mAP",
             "positive_auc": "positive AUC (lower better)", "negative_auc": "negative AUC (higher better)",
             "keep_auc_most": "keep-AUC most important", "keep_auc_least": "keep-AUC least important"}
    return [{"method": r["method"], **{v: r[k] for k, v in names.items() if k in r}} for r in table.to_dict("records")]


def _curves_figure(label: str, table: pd.DataFrame) -> go.Figure:
    """Perturbation curves: one colour per method, solid = most relevant removed first."""
    colors = method_colors(list(table["method"]))
    fig = go.Figure()
    for r in table.to_dict("records"):
        x = np.round(np.linspace(0, 0.1 * (len(r["positive_curve"]) - 1), len(r["positive_curve"])), 3)
        for order, dash in (("positive", "solid"), ("negative", "dash")):
            fig.add_scatter(x=x, y=quantise(r[f"{order}_curve"]), name=f"{r['method']} · {order}",
                            mode="lines+markers", legendgroup=r["method"],
                            line=dict(dash=dash, color=colors[r["method"]]))
    fig.update_layout(title=f"{label}: top-1 accuracy as patches are removed<br><sup>solid: most relevant first "
                            "(positive), dashed: least relevant first (negative)</sup>",
                      xaxis_title="fraction of patches removed", yaxis_title="top-1 accuracy", yaxis_range=[0, 1.02],
                      margin=dict(t=80), height=max(420, 200 + 45 * len(table)))  # the whole legend visible
    return fig


def _overlay_figure(label: str, run: Path, n: int = 4):
    """The first images with every method's token map (min-max normalised) over them."""
    from circuits.runs.explain import load_maps
    from circuits.runs.results import read_table

    thumbs = read_thumbnails(run)
    if not thumbs:
        return None
    images = read_table(run, "images")
    index = images["index"].to_numpy()
    labels = read_labels(run)
    maps = load_maps(run)
    methods = list(maps)
    picks = [i for i in range(len(index)) if int(index[i]) in thumbs][:n]
    grid = labels.grid
    values, imgs, titles = [], [], []
    for i in picks:
        for m in methods:
            rel = np.asarray(maps[m][i], dtype=np.float64)
            span = rel.max() - rel.min()
            values.append((rel - rel.min()) / span if span > 0 else np.zeros_like(rel))
            imgs.append(thumbs[int(index[i])])
            titles.append(f"#{int(index[i])} {labels.cls(images['label'].iloc[i])} · {m}")
    return token_maps(values, imgs, titles=titles, title=f"{label}: relevance maps (min-max normalised per map)",
                      grid=grid, zmin=0, zmax=1, colorscale="Jet", colorbar_title="relevance", cols=len(methods),
                      cell=170, opacity=0.5)


def _sanity_figure(label: str, rows: list[dict], colors: dict[str, str]) -> go.Figure:
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for method, sel in df.groupby("method", sort=False):
        sel = sel.sort_values("step")
        fig.add_scatter(x=sel["stage"], y=quantise(sel["spearman"]), name=method, mode="lines+markers",
                        line=dict(color=colors.get(method)))
    fig.update_layout(title=f"{label}: model-parameter randomisation (cascading from the top): rank correlation "
                            "with the original maps; it must fall", xaxis_title="re-initialised down to",
                      yaxis_title="Spearman correlation", yaxis_range=[-0.2, 1.05])
    return fig
