"""Report sections: key-value memories and linear probes (Vilas et al. 2023;
docs/memories_and_probes.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.report.html import figure_html, table_html
from circuits.runs.results import atomic_write_text

ANALYSES = ("memories", "probes")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def report_section(runs: dict[str, Path], images: int = 8) -> list[str]:
    """images: unused (no per-image figures here); part of every section's signature."""
    from circuits.runs.results import read_manifest

    by_analysis: dict[str, dict[str, Path]] = {}
    for label, run in runs.items():
        by_analysis.setdefault(read_manifest(run)["settings"]["analysis"], {})[label] = run
    out: list[str] = []
    if "memories" in by_analysis:
        out += _memories_section(by_analysis["memories"])
    if "probes" in by_analysis:
        out += _probes_section(by_analysis["probes"])
    return out


def _is_random(label: str, settings: dict) -> bool:
    return "random" in label or "random" in str(settings.get("model", ""))


def _memories_section(runs: dict[str, Path]) -> list[str]:
    from circuits.memories import summarize_memories
    from circuits.runs.memories import load_memory_results

    results = {label: load_memory_results(run) for label, run in runs.items()}
    summaries = {label: summarize_memories(res) for label, res in results.items()}
    for label, s in summaries.items():
        atomic_write_text(runs[label] / "summary.json", json.dumps(s, indent=2, default=float))
    k = next(iter(results.values())).settings["k"]
    out = [
        "<h2>Key-value memories (Vilas et al. 2023)</h2>",
        f"<p>Values: rows of W_out (MLP) and of W_O flattened over heads (attention); keys: the MLP "
        f"pre-activation and the attention z. A token <i>agrees</i> when any of its {k} most activated memories "
        f"is among the {k} memories whose value projection W_U<sup>T</sup>v is largest for the target class "
        f"(baseline: a seeded random other class). <i>Composition</i>: any of its {k} most activated memories "
        "has the sublayer output's top-1 class as its own top-1 class. Class-value agreement: per class, the "
        "largest cosine between the class embedding and any value vector, averaged over classes.</p>",
    ]
    rows = []
    for label, s in summaries.items():
        df = pd.DataFrame(s["by_layer"])
        img = df[df["token"] == "image"].groupby("sublayer")[["agreement", "agreement_random", "composition",
                                                                 "composition_random"]].mean()
        for sublayer, r in img.iterrows():
            rows.append({"run": label, "sublayer": sublayer, "images": s["n_images"], "accuracy": s["accuracy"],
                         "agreement (image tokens, mean over layers)": r["agreement"],
                         "random class": r["agreement_random"], "composition": r["composition"],
                         "composition, random class": r["composition_random"]})
    out.append(table_html(rows, "Key-value agreement and composition, averaged over layers"))
    out.append(figure_html(_agreement_figure(summaries, "agreement", "Key-value agreement by layer")))
    out.append(figure_html(_agreement_figure(summaries, "composition", "Composition by layer")))
    out.append(figure_html(_class_value_figure(summaries)))
    out.append(_class_value_test(results))
    for label, s in summaries.items():
        cw = pd.DataFrame([r for r in s["correct_vs_wrong"] if r["n_correct"] and r["n_wrong"]])
        for token, what in (("cls", "class token (the paper's comparison)"), ("image", "image tokens")):
            rows = cw[cw["token"] == token].to_dict("records") if len(cw) else []
            out.append(table_html(rows, f"{label}: key-value agreement of the {what}, correctly vs wrongly "
                                        "classified images (two-sided permutation test of the difference of means)"))
    return out


def _agreement_figure(summaries: dict, metric: str, title: str) -> go.Figure:
    sublayers = sorted({r["sublayer"] for s in summaries.values() for r in s["by_layer"]})
    fig = make_subplots(rows=1, cols=len(sublayers), subplot_titles=[f"{s} memories" for s in sublayers],
                        shared_yaxes=True)
    for i, (label, s) in enumerate(summaries.items()):
        df = pd.DataFrame(s["by_layer"])
        for col, sublayer in enumerate(sublayers, start=1):
            for token, dash in (("image", "solid"), ("cls", "dash")):
                d = df[(df["sublayer"] == sublayer) & (df["token"] == token)]
                if d.empty:
                    continue
                color = COLORS[i % len(COLORS)]
                fig.add_scatter(x=d["layer"], y=d[metric], name=f"{label} · {token}", mode="lines+markers",
                                line=dict(dash=dash, color=color), legendgroup=label, showlegend=col == 1,
                                row=1, col=col)
                fig.add_scatter(x=d["layer"], y=d[f"{metric}_random"], name=f"{label} · {token} · random class",
                                mode="lines", line=dict(dash="dot", color=color, width=1), opacity=0.6,
                                legendgroup=label, showlegend=col == 1, row=1, col=col)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="share of tokens", range=[0, 1.02], col=1)
    fig.update_layout(title=f"{title} (dotted: random-class baseline)", height=420)
    return fig


def _class_value_figure(summaries: dict) -> go.Figure:
    sublayers = sorted({r["sublayer"] for s in summaries.values() for r in s["class_value"]})
    fig = make_subplots(rows=1, cols=len(sublayers), subplot_titles=[f"{s} values" for s in sublayers],
                        shared_yaxes=True)
    for i, (label, s) in enumerate(summaries.items()):
        df = pd.DataFrame(s["class_value"])
        for col, sublayer in enumerate(sublayers, start=1):
            d = df[df["sublayer"] == sublayer]
            fig.add_scatter(x=d["layer"], y=d["max_cosine"], name=label, mode="lines+markers",
                            line=dict(color=COLORS[i % len(COLORS)]), showlegend=col == 1, row=1, col=col)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="mean over classes of max cosine", col=1)
    fig.update_layout(title="Class-value agreement: class embeddings vs value vectors", height=420)
    return fig


def _class_value_test(results: dict) -> str:
    """Trained > random weights, one-sided Wilcoxon over classes: per block, as the paper tests
    it (Vilas et al. 2023, section 5), then pooled over every (sublayer, layer, class) pair."""
    from circuits.memories import class_value_vs_random, class_value_vs_random_pooled

    per_block, pooled = [], []
    random = [l for l, r in results.items() if _is_random(l, r.settings)]
    trained = [l for l in results if l not in random]
    for r in random:
        for t in trained:
            a, b = results[t].class_value, results[r].class_value
            pair = {"trained": t, "random": r}
            per_block += [{**pair, **row} for row in class_value_vs_random(a, b).to_dict("records")]
            pooled += [{**pair, **row} for row in class_value_vs_random_pooled(a, b).to_dict("records")]
    return (table_html(per_block, "Class-value agreement per block, trained vs random weights: one-sided "
                                  "Wilcoxon signed-rank test over classes (the paper's test)")
            + table_html(pooled, "Summary: the same test pooled over (sublayer, layer, class) pairs"))


def _probes_section(runs: dict[str, Path]) -> list[str]:
    from circuits.probes import summarize_probes
    from circuits.runs.probe import load_probe_results

    results = {label: load_probe_results(run) for label, run in runs.items()}
    summaries = {label: summarize_probes(res) for label, res in results.items()}
    for label, s in summaries.items():
        atomic_write_text(runs[label] / "summary.json", json.dumps(s, indent=2, default=float))
    first = next(iter(results.values())).settings
    out = [
        "<h2>Linear probes vs projection (Vilas et al. 2023)</h2>",
        f"<p>One ridge probe (alpha {first['alpha']}, targets +1/-1, unpenalised intercept) per site, layer "
        f"and token position, trained on {first['per_class']} images per class; tested on held-out images, "
        "side by side with the projection onto the class embedding space (final norm + head) at the same "
        "sites. Accuracy: share of tokens whose top-1 class is the label.</p>",
    ]
    rows = []
    for label, s in summaries.items():
        df = pd.DataFrame(s["by_layer"])
        last = df[(df["layer"] == df["layer"].max())]
        for _, r in last.iterrows():
            rows.append({"run": label, "site": r["site"], "layer": int(r["layer"]), "token": r["token"],
                         "probe accuracy": r["probe_accuracy"], "projection accuracy": r["projection_accuracy"],
                         "probe rank": r["probe_rank"], "projection rank": r["projection_rank"]})
    out.append(table_html(rows, "Last layer: probe vs projection"))
    out.append(figure_html(_probe_figure(summaries)))
    return out


def _probe_figure(summaries: dict) -> go.Figure:
    sites = list(dict.fromkeys(r["site"] for s in summaries.values() for r in s["by_layer"]))
    fig = make_subplots(rows=1, cols=len(sites), subplot_titles=[f"{s} output" for s in sites], shared_yaxes=True)
    for i, (label, s) in enumerate(summaries.items()):
        df = pd.DataFrame(s["by_layer"])
        for col, site in enumerate(sites, start=1):
            for token, symbol in (("image", "circle"), ("cls", "diamond")):
                d = df[(df["site"] == site) & (df["token"] == token)]
                if d.empty:
                    continue
                for method, dash in (("probe", "solid"), ("projection", "dash")):
                    fig.add_scatter(x=d["layer"], y=d[f"{method}_accuracy"], name=f"{label} · {token} · {method}",
                                    mode="lines+markers", marker=dict(symbol=symbol),
                                    line=dict(dash=dash, color=COLORS[(2 * i + (token == "cls")) % len(COLORS)]),
                                    showlegend=col == 1, row=1, col=col)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="top-1 accuracy per token", range=[0, 1.02], col=1)
    fig.update_layout(title="Linear probes (solid) vs projection (dashed) by layer", height=420)
    return fig
