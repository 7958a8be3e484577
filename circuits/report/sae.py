"""HTML of the sparse-dictionary runs: training curves, evaluation table, feature dashboards
(top images with the most active patch outlined, activation histogram, logit lens) and the
features that pick out the ground-truth attributes."""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go

from circuits.report.html import figure_html, table_html
from circuits.runs.results import read_manifest

ANALYSES = ("sae_train", "sae_eval", "sae_features", "sae_activations")  # stores: listed, not drawn


def report_section(runs: dict[str, Path], images: int = 8) -> list[str]:
    """images: top-activating images shown per feature dashboard."""
    by: dict[str, dict[str, Path]] = {}
    for label, run in runs.items():
        by.setdefault(read_manifest(run)["settings"]["analysis"], {})[label] = run
    out = ["<h2>Sparse autoencoders and transcoders</h2>"]
    for label, run in by.get("sae_train", {}).items():
        out += _train(label, run)
    if by.get("sae_eval"):
        out.append(_eval_table(by["sae_eval"]))
    for label, run in by.get("sae_features", {}).items():
        out += _features(label, json.loads((run / "features.json").read_text()), images)
    return out


def _eval_table(runs: dict[str, Path]) -> str:
    """One row per metric and one column per run (a row per run was wider than the page),
    metric names in words, missing values as "n/a"."""
    evals = {label: json.loads((run / "eval.json").read_text()) for label, run in runs.items()}
    metrics = list(dict.fromkeys(k for e in evals.values() for k, v in e.items() if not isinstance(v, (list, dict))))
    rows = [{"metric": metric.replace("_", " "), **{label: _shown(e.get(metric)) for label, e in evals.items()}}
            for metric in metrics]
    return table_html(rows, "Evaluation on the images of each sae eval run (its --data): reconstruction, "
                            "sparsity, and the model with the dictionary spliced in (without and with the error term)")


def _shown(value):
    return "n/a" if value is None else value


def _train(label: str, run: Path) -> list[str]:
    summary = json.loads((run / "train_summary.json").read_text())
    log = summary["log"]
    fig = go.Figure()
    for key, axis in (("mse", "y"), ("l0", "y2"), ("dead", "y2")):
        fig.add_scatter(x=[r["step"] for r in log], y=[r[key] for r in log], name=key, yaxis=axis)
    fig.update_layout(title=f"{label}: training (mse left; L0 and dead features right)", height=360,
                      yaxis=dict(type="log", title="mse"), yaxis2=dict(overlaying="y", side="right"))
    final = summary["final"]
    return [figure_html(fig), table_html([{"run": label, "rows stored": summary["store_rows"],
                                           "store s": summary["store_seconds"], "train s": summary["train_seconds"],
                                           "final mse": final["mse"], "L0": final["l0"], "dead": final["dead"],
                                           "rows/s": final["rows_per_s"]}], "Training")]


def _features(label: str, s: dict, images: int) -> list[str]:
    out = [f"<h3>{html.escape(label)}: features of {html.escape(s['hook_name'])} ({s['n_images']} images)</h3>"]
    rows = []
    for attr, entries in s["identified"].items():
        for r in entries:
            value = (f"{s['class_names'][r['value']]} ({r['value']})" if attr == "label" and s.get("class_names")
                     else r["value"])  # the id too: two classes may share a name ("crane" 134, 517)
            rows.append({"attribute": attr, "value": value, "feature": r["feature"], "correlation": r["correlation"],
                         "share of its top images": r["top_image_share"], "identified": r["identified"]})
    out.append(table_html(rows, f"Ground-truth attributes: the most correlated feature per value (point-biserial "
                                f"correlation of the per-image max activation; identified at >= {s['identified_at']})"))
    edges = s["hist_edges"]
    for f, entry in s["features"].items():
        out.append(_dashboard(int(f), entry, edges, images))
    return out


def _dashboard(f: int, e: dict, edges: list, images: int) -> str:
    imgs = "".join(_thumb(t) for t in e["top"][:images])
    fig = go.Figure(go.Bar(x=[f"{lo:.3g}" for lo in edges[1:]], y=e["histogram"][1:]))
    fig.update_layout(title=f"feature {f}: nonzero activations", height=220, margin=dict(t=30, b=30))
    lens = ", ".join(f"{html.escape(str(r['class']))} ({r['logit']:.2f})" for r in e.get("logit_lens", []))
    return (f"<div style='border:1px solid #ddd;padding:6px;margin:8px 0'><b>feature {f}</b> · active on "
            f"{100 * e['frequency']:.2f}% of tokens · logit lens: {lens or 'n/a'}<div>{imgs}</div>"
            f"{figure_html(fig)}</div>")


def _thumb(t: dict) -> str:
    box = ""
    if t["box"]:
        x, y, w, h = t["box"]
        box = (f"<rect x='{x}' y='{y}' width='{w}' height='{h}' fill='none' stroke='red' stroke-width='2'/>")
    return (f"<svg width='96' height='96' style='margin:2px' viewBox='0 0 96 96'><title>image {t['image']} token "
            f"{t['token']}: {t['value']:.3g}</title><image href='data:image/png;base64,{t['png']}' width='96' "
            f"height='96'/>{box}</svg>")
