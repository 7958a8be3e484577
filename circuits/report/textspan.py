"""Report section: TextSpan runs (Gandelsman, Efros & Steinhardt 2024, "Interpreting CLIP's
Image Representation via Text-Based Decomposition", https://arxiv.org/abs/2310.05916): per
head, the variance of its direct contribution explained by its texts (layer x head heatmap),
and each head's texts in rank order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from circuits.plot import quantise
from circuits.report.html import figure_html, table_html

ANALYSES = ("textspan",)


def report_section(runs: dict[str, Path], images: int = 8) -> list[str]:
    """images: unused (the section draws no per-image figure); kept for the section contract."""
    out = ["<h2>TextSpan: the texts each head's output spans</h2>",
           "<p>For every head, its direct contributions to the image embedding over the run's images; "
           "TextSpan picks greedily the texts whose directions explain most of their variance, "
           "projecting each out before the next. Explained variance: the share of the head's variance "
           "its texts explain together.</p>"]
    for label, run in runs.items():
        table = pd.read_parquet(run / "textspan.parquet")
        n_images = json.loads((run / "summary.json").read_text())["n_images"]
        out.append(figure_html(_heatmap(label, table, n_images)))
        out.append(table_html(_rows(table), f"{label}: each head's texts, best first "
                                            "(explained variance of each after the earlier ones)"))
    return out


def _heatmap(label: str, table: pd.DataFrame, n_images: int) -> go.Figure:
    total = table.groupby(["layer", "head"])["explained_variance"].sum().unstack("head").sort_index()
    fig = go.Figure(go.Heatmap(z=quantise(total.to_numpy()), x=[f"head {h}" for h in total.columns],
                               y=[f"layer {l}" for l in total.index], colorscale="Viridis", zmin=0,
                               hovertemplate="%{y} %{x}<br>explained %{z}<extra></extra>"))
    fig.update_layout(title=f"{label}: variance explained by each head's texts ({n_images} images)",
                      height=120 + 40 * len(total), yaxis=dict(autorange="reversed"))
    return fig


def _rows(table: pd.DataFrame) -> list[dict]:
    rows = []
    for (layer, head), g in table.sort_values("rank").groupby(["layer", "head"], sort=True):
        texts = "; ".join(f"{t} ({v:.3f})" for t, v in zip(g["text"], np.asarray(g["explained_variance"])))
        rows.append({"layer": int(layer), "head": int(head), "texts": texts,
                     "explained": float(g["explained_variance"].sum())})
    return rows
