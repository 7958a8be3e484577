"""`hooked-vit decompose`: component scores and spurious-feature removal over a dataset,
its report section and demo step (Balasubramanian et al. 2024)."""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.commands import DemoContext
from circuits.commands._common import add_model_args, add_run_args, say_done
from circuits.report import figure_html, table_html
from circuits.results import read_manifest

ORDER = 40
ANALYSES = ("decompose",)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "decompose", help="decompose the representation into components; score them; remove a spurious feature",
        description="Exact component decomposition of the final representation (heads, MLPs, biases). Feature "
                    "directions and component scores come from a held-out reference set with class and attribute "
                    "labels; the components that carry the attribute (e.g. the background) more than the class "
                    "are mean-ablated and group accuracies are reported before and after.")
    add_model_args(p)
    add_run_args(p)
    p.add_argument("--reference", default=None,
                   help="held-out reference set (same spec forms as --data); default: the synthetic val split")
    p.add_argument("--reference-limit", type=int, default=512, help="reference images (held in memory)")
    p.add_argument("--core-key", default="label", help="item key of the core feature (the class)")
    p.add_argument("--spurious-key", default="background", help="item key of the spurious attribute")
    p.add_argument("--max-k", type=int, default=10, help="largest number of ablated components tried")
    p.add_argument("--mode", choices=["correlation", "covariance"], default="correlation")
    p.add_argument("--start-layer", type=int, default=0)
    p.add_argument("--heatmaps", type=int, default=4, help="images with token heatmaps in the report")
    p.set_defaults(run=run)


def _dataset(spec: str, model, model_spec: str):
    """Synthetic data for an embedded model uses the difficulty it was trained on."""
    from circuits.decomposition.run import synthetic_for
    from circuits.sources import load_dataset

    if (spec == "synthetic" or spec.startswith("synthetic:")) and model_spec.startswith("embedded"):
        parts = spec.split(":")
        return synthetic_for(model_spec, parts[1] if len(parts) > 1 and parts[1] else "test",
                             int(parts[2]) if len(parts) > 2 else 512)
    return load_dataset(spec, model)


def run(args: argparse.Namespace) -> int:
    from circuits.decomposition.run import decompose_run
    from circuits.sources import load_model

    model = load_model(args.model, args.arch, args.device, args.random_weights)
    dataset = _dataset(args.data, model, args.model)
    reference = _dataset(args.reference or "synthetic:val:512", model, args.model)
    store = decompose_run(model, dataset, reference, args.out, core_key=args.core_key,
                          spurious_key=args.spurious_key, max_k=args.max_k, mode=args.mode,
                          start_layer=args.start_layer, batch_size=args.batch_size, limit=args.limit,
                          reference_limit=args.reference_limit, n_heatmaps=args.heatmaps,
                          num_workers=args.workers, overwrite=args.overwrite)
    summary = json.loads((store.root / "summary.json").read_text())
    b, a = summary["before"], summary["after"]
    if not json.loads((store.root / "reference.json").read_text())["order"]:
        print(f"no {args.spurious_key!r} attribute in the reference items: class scores only; accuracy {b['accuracy']:.3f}")
    else:
        print(f"worst-group accuracy {b['worst_group']:.3f} -> {a['worst_group']:.3f}, average-group "
              f"{b['avg_group']:.3f} -> {a['avg_group']:.3f} (ablated {', '.join(summary['ablated']) or 'nothing'})")
    say_done(store)
    return 0


def demo(ctx: DemoContext) -> None:
    """The spurious embedded model (reference = synthetic val split, data = test split), and
    the default model with a planted background-shortcut head, as ground truth."""
    from circuits.decomposition.planted import plant_background_shortcut
    from circuits.decomposition.run import decompose_run, synthetic_for
    from circuits.sources import load_model

    model = load_model("embedded:spurious", device=ctx.device)
    n = len(ctx.data)
    decompose_run(model, synthetic_for("embedded:spurious", "test", n), synthetic_for("embedded:spurious", "val", n),
                  ctx.out / "decompose" / "spurious", batch_size=ctx.batch_size, overwrite=ctx.overwrite,
                  progress=False)
    reference = synthetic_for("embedded", "val", n)
    hooks, head = plant_background_shortcut(ctx.trained, reference)
    decompose_run(ctx.trained, ctx.data, reference, ctx.out / "decompose" / "default with a planted shortcut",
                  batch_size=ctx.batch_size, n_heatmaps=0, fwd_hooks=hooks, overwrite=ctx.overwrite,
                  progress=False, settings={"planted": head})


# ----------------------------------------------------------------------------- report
def report_section(runs: dict[str, Path]) -> list[str]:
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
            out.append(figure_html(_heatmap_figure(label, json.loads((root / "heatmaps.json").read_text()))))
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


def _heatmap_figure(label: str, heat: dict) -> go.Figure:
    n_img = len(heat["index"])
    rows = len(heat["maps"]) + ("images" in heat)
    titles = []
    if "images" in heat:
        titles += [f"image {i} (label {l})" for i, l in zip(heat["index"], heat["label"])]
    for m in heat["maps"]:
        titles += [f"{m['component']} · {m['feature']}"] + [""] * (n_img - 1)
    fig = make_subplots(rows=rows, cols=n_img, subplot_titles=titles, vertical_spacing=0.04)
    row = 1
    if "images" in heat:
        for j, img in enumerate(heat["images"]):
            fig.add_image(z=np.asarray(img, dtype=np.uint8), row=1, col=j + 1)
        row = 2
    for m in heat["maps"]:
        for j, grid in enumerate(m["maps"]):
            z = np.asarray(grid)
            lim = float(np.abs(z).max()) or 1.0
            fig.add_heatmap(z=z[::-1], zmin=-lim, zmax=lim, colorscale="RdBu", reversescale=True,
                            showscale=False, row=row, col=j + 1)
        row += 1
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=f"{label}: head x token terms projected on the feature direction "
                            "(red: towards the image's own class / attribute value)", height=170 * rows + 80)
    return fig
