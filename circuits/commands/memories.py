"""`hooked-vit memories` and `hooked-vit probe`: key-value memories and linear probes
(Vilas et al. 2023, SPEC 2.4 and 2.5), their report sections and demo steps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.commands import DemoContext
from circuits.commands._common import add_model_args, add_run_args, say_done
from circuits.report import figure_html, table_html

ORDER = 30
ANALYSES = ("memories", "probes")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


# ------------------------------------------------------------------ command line
def add_parser(sub) -> None:
    p = sub.add_parser("memories", help="key-value memories of attention and MLP layers over a dataset",
                       description="Key-value agreement, composition and class-value agreement of the "
                                   "attention and MLP memories (Vilas et al. 2023); results as parquet.")
    add_model_args(p)
    add_run_args(p)
    p.add_argument("--sublayers", nargs="+", default=["attn", "mlp"], choices=["attn", "mlp"])
    p.add_argument("--topk", type=int, default=5, help="memories per token and per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-class baseline")
    p.set_defaults(run=run_memories)

    p = sub.add_parser("probe", help="linear probes per token position vs the projection",
                       description="Ridge probes (alpha 1, +1/-1 targets) per site, layer and token position, "
                                   "trained on a few images per class and compared with the projection "
                                   "onto the class embedding space on held-out images.")
    add_model_args(p)
    add_run_args(p)
    p.add_argument("--per-class", type=int, default=10, help="training images per class")
    p.add_argument("--alpha", type=float, default=1.0, help="ridge penalty")
    p.add_argument("--sites", nargs="+", default=["block", "attn", "mlp"])
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="only these layers (bounds memory for large models: 8 * positions * d_model^2 bytes "
                        "per site and layer)")
    p.add_argument("--train-data", default=None,
                   help="training images (same syntax as --data); default: the synthetic train split when "
                        "--data is synthetic, else --data itself with the training images left out of the test")
    p.set_defaults(run=run_probe)


def run_memories(args: argparse.Namespace) -> int:
    from circuits.memories import memories
    from circuits.sources import load_dataset, load_model

    model = load_model(args.model, args.arch, args.device, args.random_weights)
    store = memories(model, load_dataset(args.data, model), args.out, sublayers=args.sublayers, k=args.topk,
                     seed=args.seed, batch_size=args.batch_size, limit=args.limit, num_workers=args.workers,
                     overwrite=args.overwrite)
    say_done(store)
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from circuits.probes import run_probes
    from circuits.sources import load_dataset, load_model

    model = load_model(args.model, args.arch, args.device, args.random_weights)
    test = load_dataset(args.data, model)
    train_spec = args.train_data
    if train_spec is None and args.data.startswith("synthetic"):
        # Enough synthetic training images that every class has --per-class of them.
        train_spec = f"synthetic:train:{max(4 * args.per_class * model.cfg.n_classes, 100)}"
    train = test if train_spec is None else load_dataset(train_spec, model)
    store = run_probes(model, train, test, args.out, per_class=args.per_class, alpha=args.alpha, sites=args.sites,
                       layers=args.layers, batch_size=args.batch_size, limit=args.limit,
                       num_workers=args.workers, overwrite=args.overwrite)
    say_done(store)
    return 0


# ------------------------------------------------------------------ demo
def demo(ctx: DemoContext) -> None:
    from circuits.embedded import SyntheticShapes, normalize
    from circuits.memories import memories
    from circuits.probes import run_probes

    for label, model in (("trained", ctx.trained), ("random weights", ctx.random)):
        memories(model, ctx.data, str(ctx.out / "memories" / label), batch_size=ctx.batch_size,
                 overwrite=ctx.overwrite, progress=False)
    per_class = 10
    train = SyntheticShapes(4 * per_class * ctx.trained.cfg.n_classes, seed=0, split="train", transform=normalize)
    run_probes(ctx.trained, train, ctx.data, str(ctx.out / "probes" / "trained"), per_class=per_class,
               batch_size=ctx.batch_size, overwrite=ctx.overwrite, progress=False)


# ------------------------------------------------------------------ report
def report_section(runs: dict[str, Path]) -> list[str]:
    from circuits.results import read_manifest

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
    from circuits.memories import load_memory_results, summarize_memories

    results = {label: load_memory_results(run) for label, run in runs.items()}
    summaries = {label: summarize_memories(res) for label, res in results.items()}
    for label, s in summaries.items():
        (runs[label] / "summary.json").write_text(json.dumps(s, indent=2, default=float))
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
        cw = [r for r in s["correct_vs_wrong"] if r["n_correct"] and r["n_wrong"]]
        out.append(table_html(cw, f"{label}: key-value agreement of image tokens, correctly vs wrongly "
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
    """One-sided Wilcoxon, trained > random, on the per (sublayer, layer, class) max cosines."""
    from circuits.identifiability import pretrained_vs_random

    rows = []
    random = [l for l, r in results.items() if _is_random(l, r.settings)]
    trained = [l for l in results if l not in random]
    for r in random:
        for t in trained:
            a, b = results[t].class_value, results[r].class_value
            if len(a) == len(b):
                rows.append({"trained": t, "random": r, **pretrained_vs_random(a["max_cosine"].to_numpy(),
                                                                               b["max_cosine"].to_numpy())})
    return table_html(rows, "Class-value agreement, trained vs random weights: one-sided Wilcoxon signed-rank "
                            "test over (sublayer, layer, class) pairs")


def _probes_section(runs: dict[str, Path]) -> list[str]:
    from circuits.probes import load_probe_results, summarize_probes

    results = {label: load_probe_results(run) for label, run in runs.items()}
    summaries = {label: summarize_probes(res) for label, res in results.items()}
    for label, s in summaries.items():
        (runs[label] / "summary.json").write_text(json.dumps(s, indent=2, default=float))
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
