"""Report section: class identifiability (Vilas et al. 2023, "Analyzing Vision Transformers for Image
Classification in Class Embedding Space"; docs/class_identifiability.md).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.identifiability import chance_identifiability, identifiability
from circuits.plot import layer_curves, logit_lens_grid, method_colors, token_maps
from circuits.report.assets import read_labels, read_thumbnails
from circuits.report.html import figure_html, table_html
from circuits.runs.results import atomic_write_text

ANALYSES = ("identify",)


def report_section(runs: dict[str, Path], images: int = 8) -> list[str]:
    """images: how many images get a token map (those the run kept thumbnails of come first)."""
    from circuits.identifiability import per_image_identifiable_rate, pretrained_vs_random, summarize
    from circuits.runs.identify import load_results

    results = {label: load_results(run) for label, run in runs.items()}
    summaries = {label: summarize(res) for label, res in results.items()}
    chances = {label: chance_identifiability(res.n_classes) for label, res in results.items()}
    classes = ", ".join(sorted({f"{res.n_classes} classes: chance {chances[l]:.4g}" for l, res in results.items()}))
    out = ["<h2>Class identifiability (Vilas et al. 2023)</h2>",
           "<p>Every token at every block projected onto the classes with the model's final norm and "
           "head. Identifiability = 1 - rank / n_classes; a random rank gives 0.5 + 1 / (2 n_classes) "
           f"on average ({html.escape(classes)}). Identifiable token: rank 0.</p>"]
    rows = [{"run": label, "images": s["n_images"], "classes": results[label].n_classes, "accuracy": s["accuracy"],
             "identifiable image tokens (last block)": s["identifiable_token_rate"],
             "images with >= 1 identifiable token": s["images_with_identifiable_token"]}
            for label, s in summaries.items()]
    out.append(table_html(rows, "Last-block summary"))
    out.append(_wilcoxon_rows(results, per_image_identifiable_rate, pretrained_vs_random))
    colors = method_colors(list(results))
    out.append(figure_html(_by_layer_figure(summaries, chances, colors)))
    out.append(figure_html(_sublayer_figure(summaries, colors)))
    for label, res in results.items():
        labels = read_labels(runs[label], res.n_classes)
        thumbs = read_thumbnails(runs[label])
        if labels.is_video:  # pictures over the clip's frames (circuits.report.video)
            out += _video_html(label, runs[label], res, labels, thumbs, images)
        else:
            out += _token_map_html(label, res, labels, thumbs, images)
        out.append(figure_html(_lens_figure(label, res, labels)))
        if "context_vs_object" in summaries[label]:
            c = summaries[label]["context_vs_object"]
            out.append(table_html([{"run": label, **c}], "Object vs context tokens, last block identifiability"))
    out.append(_conventions_table(results, summaries, summarize))
    for label, s in summaries.items():
        atomic_write_text(runs[label] / "summary.json", json.dumps(s, indent=2, default=float))
    return out


def _conventions_table(results, summaries: dict, summarize) -> str:
    """The last block's headline numbers under ours and the original code's conventions
    (docs/class_identifiability.md, "Conventions"), for runs with the attn and mlp sites."""
    rows = []
    for label, res in results.items():
        if not {"attn", "mlp"} <= set(res.sites):
            continue
        ours, orig = summaries[label], summarize(res, "original")
        for name, pick in _CONVENTION_METRICS:
            a, b = pick(ours), pick(orig)
            if a is not None:
                rows.append({"run": label, "metric (last block)": name, "ours": a, "original code": b})
    return table_html(rows, "The same runs under the original code's conventions (convention='original'): "
                            "recomputed from the stored ranks and target logits")


def _image_sublayer_rate(sublayer: str):
    def pick(s: dict):
        rates = [r["rate"] for r in s["sublayer_change_rates"] if r["token"] == "image" and r["sublayer"] == sublayer]
        return rates[-1] if rates else None
    return pick


_CONVENTION_METRICS = (
    ("identifiable image tokens", lambda s: s["identifiable_token_rate"]),
    ("images with >= 1 identifiable token", lambda s: s["images_with_identifiable_token"]),
    ("block change rate", lambda s: s["block_change_rate"][-1]),
    ("attention change rate (image tokens)", _image_sublayer_rate("attn")),
    ("MLP change rate (image tokens)", _image_sublayer_rate("mlp")),
    ("object vs context p-value", lambda s: s["context_vs_object"]["p_value"] if "context_vs_object" in s else None),
)


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


def _by_layer_figure(summaries: dict, chances: dict[str, float], colors: dict[str, str]) -> go.Figure:
    """Block-output identifiability by layer: one colour per run, dash for the class token, each
    run's own chance line."""
    curves, groups, dashes = {}, {}, {}
    for label, s in summaries.items():
        for token, dash in (("image", "solid"), ("cls", "dash")):
            pts = [r for r in s["by_layer"] if r["site"] == "block" and r["token"] == token]
            if pts:
                name = f"{label} · {token} tokens" if token == "image" else f"{label} · class token"
                curves[name] = ([r["layer"] for r in pts], [r["identifiability"] for r in pts])
                groups[name], dashes[name] = label, dash
    shown = chances if len(set(chances.values())) > 1 else next(iter(chances.values()))
    return layer_curves(curves, title="Class identifiability of block outputs by layer (dashed: class token)",
                        xaxis_title="block", yaxis_title="mean identifiability", chance=shown, colors=colors,
                        groups=groups, dashes=dashes, yaxis_range=[0, 1.02])


def _sublayer_figure(summaries: dict, colors: dict[str, str]) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Identifiability of sublayer outputs (image tokens)",
                                                        "Share of image tokens whose target logit rises"))
    for label, s in summaries.items():
        for site, dash in (("attn", "solid"), ("mlp", "dash")):
            pts = [r for r in s["by_layer"] if r["site"] == site and r["token"] == "image"]
            style = dict(line=dict(color=colors[label], dash=dash), mode="lines+markers", legendgroup=label)
            if pts:
                fig.add_scatter(x=[r["layer"] for r in pts], y=[round(r["identifiability"], 4) for r in pts],
                                name=f"{label} · {site}", row=1, col=1, **style)
            rates = [r for r in s["sublayer_change_rates"] if r["sublayer"] == site and r["token"] == "image"]
            if rates:
                fig.add_scatter(x=[r["layer"] for r in rates], y=[round(r["rate"], 4) for r in rates],
                                name=f"{label} · {site} rises", showlegend=False, row=1, col=2, **style)
    fig.update_xaxes(title_text="block")
    fig.update_yaxes(title_text="mean identifiability", col=1)
    fig.update_yaxes(title_text="share of image tokens", col=2)
    fig.update_layout(title="Sublayer contributions (solid: attention, dashed: MLP)", height=440)
    return fig


def _sample(res, thumbs: dict, n: int) -> list[int]:
    """Positions of up to n images to draw: only those with a thumbnail when the run kept any
    (every map over its image), spread over the labels (round-robin, not the first n of one
    class), in run order."""
    from circuits.data.samples import stratified_order

    index = res.images["index"].to_numpy()
    candidates = [i for i in range(len(index)) if int(index[i]) in thumbs] or list(range(len(index)))
    labels = res.images["label"].to_numpy()[candidates]
    return sorted(candidates[j] for j in stratified_order(labels, seed=0)[:n])


def _video_html(label: str, run: Path, res, labels, thumbs: dict, n: int) -> list[str]:
    """A video run's pictures: per-frame curves, frame strips of sampled clips, attention across frames."""
    from circuits.report import video

    return [f"<h3>{html.escape(label)}: over the frames ({labels.n_time} time positions of "
            f"{labels.grid[0]} x {labels.grid[1]} patches, {labels.num_frames} frames)</h3>",
            *video.per_frame_html(label, res, labels),
            *video.frame_strips_html(label, res, labels, thumbs, _sample(res, thumbs, n)),
            *video.attention_html(label, run, res, labels, thumbs)]


def _token_map_html(label: str, res, labels, thumbs: dict, n: int) -> list[str]:
    """Last-block identifiability of every image token over its image, for a sample of images."""
    picks = _sample(res, thumbs, n)
    if not picks:
        return []
    blk = res.site("block")
    index = res.images["index"].to_numpy()
    maps = [identifiability(res.rank[i, blk, -1, res.n_prefix:], res.n_classes) for i in picks]
    imgs = [thumbs.get(int(index[i])) for i in picks]
    titles = [f"#{int(index[i])} {labels.cls(res.images['label'].iloc[i])}<br>"
              f"pred {labels.cls(res.images['pred'].iloc[i])}" for i in picks]
    outlines = None if res.object_tokens is None else [res.object_tokens[i, res.n_prefix:] for i in picks]
    drawn = [img for img in imgs if img is not None]
    fig = token_maps(maps, imgs if len(drawn) == len(imgs) else None, titles=titles, grid=labels.grid,
                     title=f"{label}: last-block identifiability of every image token", zmin=0, zmax=1,
                     colorbar_title="identifiability", outlines=outlines)
    notes = [f"{len(picks)} of {len(index)} images (label, prediction); colour: identifiability of the token's "
             "last-block output (1: the label is its top class)."]
    if drawn and len(picks) < n:
        notes.append(f"The run kept thumbnails of {len(thumbs)} images; a run with more (the thumbnails "
                     "argument of circuits.runs.identify.identify) draws more.")
    if outlines is not None:
        notes.append("Red squares: object tokens (from the dataset's masks).")
    if not drawn:
        notes.append("The run kept no thumbnails, so the maps are drawn without their images (rerun identify).")
    return [figure_html(fig), f"<p class='caption'>{html.escape(' '.join(notes))}</p>"]


def _lens_figure(label: str, res, labels) -> go.Figure:
    """Logit lens of the first image: identifiability of every token's block output at every block,
    the top class on hover."""
    blk = res.site("block")
    names = labels.token_names(res.rank.shape[-1], res.n_prefix)
    i = 0
    return logit_lens_grid(identifiability(res.rank[i, blk], res.n_classes), res.topk[i, blk, :, :, 0],
                           token_names=names, classes=labels.classes,
                           title=f"{label}: logit lens of image #{int(res.images['index'].iloc[i])} "
                                 f"({labels.cls(res.images['label'].iloc[i])}), block outputs",
                           layer_names=[f"block {l}" for l in range(res.rank.shape[2])])
