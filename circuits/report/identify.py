"""Report section: class identifiability (Vilas et al. 2023, "Analyzing Vision Transformers for Image
Classification in Class Embedding Space"; docs/class_identifiability.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.identifiability import identifiability
from circuits.report.html import figure_html, table_html
from circuits.runs.results import atomic_write_text

ANALYSES = ("identify",)


def report_section(runs: dict[str, Path]) -> list[str]:
    from circuits.identifiability import per_image_identifiable_rate, pretrained_vs_random, summarize
    from circuits.runs.identify import load_results

    results = {label: load_results(run) for label, run in runs.items()}
    summaries = {label: summarize(res) for label, res in results.items()}
    out = ["<h2>Class identifiability (Vilas et al. 2023)</h2>",
           "<p>Every token at every block projected onto the classes with the model's final norm and "
           "head. Identifiability = 1 - rank / n_classes (chance 0.5 + 1 / (2 n_classes): 0.55 for 10 classes). "
           "Identifiable token: rank 0.</p>"]
    rows = [{"run": label, "images": s["n_images"], "accuracy": s["accuracy"],
             "identifiable image tokens (last block)": s["identifiable_token_rate"],
             "images with >= 1 identifiable token": s["images_with_identifiable_token"]}
            for label, s in summaries.items()]
    out.append(table_html(rows, "Last-block summary"))
    out.append(_wilcoxon_rows(results, per_image_identifiable_rate, pretrained_vs_random))
    chance = 0.5 + 0.5 / next(iter(results.values())).n_classes
    out.append(figure_html(_by_layer_figure(summaries, chance)))
    out.append(figure_html(_sublayer_figure(summaries)))
    for label, res in results.items():
        out.append(figure_html(_token_maps(label, res)))
        if "context_vs_object" in summaries[label]:
            c = summaries[label]["context_vs_object"]
            out.append(table_html([{"run": label, **c}], "Object vs context tokens, last block identifiability"))
    for label, s in summaries.items():
        atomic_write_text(runs[label] / "summary.json", json.dumps(s, indent=2, default=float))
    return out


def _wilcoxon_rows(results, per_image, test) -> str:
    random = [l for l in results if "random" in l]
    trained = [l for l in results if "random" not in l]
    rows = []
    for r in random:
        for t in trained:
            a = per_image(results[t].rank[:, results[t].site("block"), -1], results[t].n_prefix)
            b = per_image(results[r].rank[:, results[r].site("block"), -1], results[r].n_prefix)
            if a.shape == b.shape:
                rows.append({"trained": t, "random": r, **test(a, b)})
    return table_html(rows, "Trained vs random weights: one-sided Wilcoxon on per-image identifiable-token rates")


def _by_layer_figure(summaries: dict, chance: float) -> go.Figure:
    fig = go.Figure()
    for label, s in summaries.items():
        for token, dash in (("cls", "dash"), ("image", "solid")):
            pts = [r for r in s["by_layer"] if r["site"] == "block" and r["token"] == token]
            if pts:
                fig.add_scatter(x=[r["layer"] for r in pts], y=[r["identifiability"] for r in pts],
                                name=f"{label} · {token}", line=dict(dash=dash), mode="lines+markers")
    fig.add_hline(y=chance, line=dict(color="grey", dash="dot"), annotation_text=f"chance ({chance:.3g})")
    fig.update_layout(title="Class identifiability of block outputs by layer", xaxis_title="block",
                      yaxis_title="mean identifiability", yaxis_range=[0, 1.02])
    return fig


def _sublayer_figure(summaries: dict) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Identifiability of sublayer outputs (image tokens)",
                                                        "Share of tokens whose target logit rises"))
    for label, s in summaries.items():
        for site in ("attn", "mlp"):
            pts = [r for r in s["by_layer"] if r["site"] == site and r["token"] == "image"]
            if pts:
                fig.add_scatter(x=[r["layer"] for r in pts], y=[r["identifiability"] for r in pts],
                                name=f"{label} · {site}", mode="lines+markers", row=1, col=1)
            rates = [r for r in s["sublayer_change_rates"] if r["sublayer"] == site and r["token"] == "image"]
            fig.add_scatter(x=[r["layer"] for r in rates], y=[r["rate"] for r in rates],
                            name=f"{label} · {site} rises", mode="lines+markers", line=dict(dash="dash"), row=1, col=2)
    fig.update_xaxes(title_text="block")
    fig.update_layout(title="Sublayer contributions", height=420)
    return fig


def _token_maps(label: str, res, n: int = 4) -> go.Figure:
    """Last-block identifiability of every image token, on the token grid, for a few images."""
    blk = res.site("block")
    n = min(n, res.rank.shape[0])
    n_patch = res.rank.shape[-1] - res.n_prefix
    side = int(round(np.sqrt(n_patch)))
    titles = [f"image {int(res.images['index'][i])}, label {int(res.images['label'][i])}" for i in range(n)]
    fig = make_subplots(rows=1, cols=n, subplot_titles=titles)
    for i in range(n):
        ident = identifiability(res.rank[i, blk, -1, res.n_prefix:], res.n_classes)
        fig.add_heatmap(z=ident.reshape(side, -1)[::-1], zmin=0, zmax=1, colorscale="Viridis",
                        showscale=i == n - 1, row=1, col=i + 1)
        if res.object_tokens is not None:
            obj = res.object_tokens[i, res.n_prefix:].reshape(side, -1)[::-1]
            ys, xs = np.nonzero(obj)
            fig.add_scatter(x=xs, y=ys, mode="markers", marker=dict(symbol="square-open", color="red", size=6),
                            showlegend=False, row=1, col=i + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=f"{label}: last-block identifiability per token (red squares: object tokens)", height=340)
    return fig
