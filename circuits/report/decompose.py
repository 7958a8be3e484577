"""Report section: component decomposition and spurious-feature removal (Balasubramanian et al.
2024, "Decomposing and Interpreting Image Representations via Text in ViTs Beyond CLIP";
docs/decomposition.md).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from circuits.plot import token_maps
from circuits.report.assets import read_labels
from circuits.report.html import figure_html, table_html
from circuits.runs.results import read_manifest

ANALYSES = ("decompose",)


def report_section(runs: dict[str, Path], images: int = 8) -> list[str]:
    """images: how many images the token heatmaps draw (of those the run kept)."""
    out = ["<h2>Component decomposition and spurious-feature removal (Balasubramanian et al. 2024)</h2>",
           "<p>The final representation written exactly as a sum of the embedding, every attention head, every "
           "MLP and the bias terms (final LayerNorm linearised with its real statistics). Feature directions in "
           "the model's own representation space from a held-out reference set: the class (balanced class-mean "
           "differences) and the spurious attribute (balanced attribute-mean differences). Score = mean "
           "correlation of a component's projection with the total's. The components whose spurious score most "
           "exceeds their class score are replaced by their reference mean; k is chosen on the reference set.</p>"]
    for label, root in runs.items():
        info = json.loads((root / "reference.json").read_text())
        summary = json.loads((root / "summary.json").read_text()) if (root / "summary.json").exists() else None
        settings = read_manifest(root)["settings"]
        out.append(f"<h3>{html.escape(label)}</h3>")
        if settings.get("planted"):
            out.append(f"<p>Ground truth: head {html.escape(settings['planted'])} was turned into a background "
                       "detector (a linear read-out of the mean patch embedding) writing towards the classes whose "
                       "parity matches the background, the shortcut of the spurious training data "
                       "(circuits.decomposition.planted). Removal should rank it first.</p>")
        out.append(table_html(_top_rows(info), "Top components by spurious minus class score (reference set)"))
        out.append(figure_html(_scores_figure(label, info)))
        if summary is not None and info["order"]:
            out.append(table_html(_before_after_rows(summary), f"Group accuracy on {summary['n_images']} images, "
                                  f"before and after mean-ablating the top {summary['k']}"))
            out.append(figure_html(_curve_figure(label, info, summary)))
        if (root / "heatmaps.json").exists():
            labels = read_labels(root)
            out.append(figure_html(_heatmap_figure(label, json.loads((root / "heatmaps.json").read_text()),
                                                   labels.grid, labels.cls, images)))
    return out


def _top_rows(info: dict, top: int = 10) -> list[dict]:
    names = [c["name"] for c in info["components"]]
    core = info["core_scores"]
    spur = info["spurious_scores"]
    if spur is None:
        order = np.argsort(core)[::-1][:top]
        return [{"component": names[i], "class score": core[i]} for i in order]
    return [{"rank": j + 1, "component": names[i], "spurious score": spur[i], "class score": core[i],
             "spurious - class": spur[i] - core[i], "ablated": "yes" if j < info["k"] else ""}
            for j, i in enumerate(info["order"][:top])]


def _before_after_rows(summary: dict) -> list[dict]:
    return [{"": name, **{key: row[key] for key in ("accuracy", "avg_group", "worst_group")}}
            for name, row in (("before", summary["before"]), (f"after (k={summary['k']})", summary["after"]))]


def _scores_figure(label: str, info: dict) -> go.Figure:
    names = [c["name"] for c in info["components"]]
    fig = go.Figure()
    fig.add_bar(x=names, y=info["core_scores"], name="class")
    if info["spurious_scores"] is not None:
        fig.add_bar(x=names, y=info["spurious_scores"], name="spurious attribute")
    fig.update_layout(title=f"{label}: component scores ({info['mode']})", barmode="group",
                      xaxis_title="component", yaxis_title="score", height=380)
    return fig


def _curve_figure(label: str, info: dict, summary: dict) -> go.Figure:
    fig = go.Figure()
    for rows, dash, where in ((summary["curve"], "solid", "data"), (info["reference_curve"], "dot", "reference")):
        for key in ("worst_group", "avg_group"):
            fig.add_scatter(x=[r["k"] for r in rows], y=[r[key] for r in rows], mode="lines+markers",
                            name=f"{where} · {key.replace('_', '-')}", line=dict(dash=dash))
    fig.add_vline(x=summary["k"], line=dict(color="grey", dash="dash"), annotation_text="chosen k")
    fig.update_layout(title=f"{label}: accuracy after mean-ablating the top k spurious components",
                      xaxis_title="k (components ablated)", yaxis_title="accuracy", height=380)
    return fig


def _heatmap_figure(label: str, heat: dict, grid, names, images: int) -> go.Figure:
    """Each top head's per-token terms on a feature direction, over the images (a sample of them)."""
    n_img = min(len(heat["index"]), images)
    pictures = [np.asarray(img, dtype=np.uint8) for img in heat["images"][:n_img]] if "images" in heat else None
    values, imgs, titles = [], [], []
    for m in heat["maps"]:
        for j in range(n_img):
            z = np.asarray(m["maps"][j], dtype=np.float64).ravel()
            values.append(z / (float(np.abs(z).max()) or 1.0))  # each map on its own scale: shapes, not sizes
            imgs.append(None if pictures is None else pictures[j])
            titles.append(f"{m['component']} · {m['feature']}<br>#{heat['index'][j]} {names(heat['label'][j])}")
    return token_maps(values, imgs if pictures is not None else None, titles=titles, grid=grid, symmetric=True,
                      colorscale="RdBu_r", colorbar_title="term / max |term|", cols=n_img, cell=190,
                      title=f"{label}: head x token terms projected on the feature direction<br><sup>red: towards "
                            "the image's own class / attribute value; each map scaled by its largest |term|</sup>")
