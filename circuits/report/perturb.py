"""Report section: attention perturbations and token removal (Vilas et al. 2023;
docs/interventions.md).
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from circuits.report.html import figure_html, table_html

ANALYSES = ("attention_perturbation", "token_removal")
# Vilas et al. 2023 (ViT-B/32 on ImageNet-S, their reported numbers): identifiable image tokens at the last block.
PAPER_PERTURBATION = {"none": 0.607, "self_only": 0.0013, "no_cls": 0.607}
PAPER_REMOVAL = {"context": (0.447, 0.719), "class_label": (0.387, 0.562)}  # (removed, unperturbed)

REMOVAL_LABELS = {"context": "context removed (object tokens remain)",
                  "class_label": "object removed (background tokens remain)"}


def report_section(runs: dict[str, Path], images: int = 8) -> list[str]:
    """images: unused (no per-image figures here); part of every section's signature."""
    from circuits.runs.results import read_manifest

    by_analysis: dict[str, dict[str, Path]] = {}
    for label, run in runs.items():
        by_analysis.setdefault(read_manifest(run)["settings"]["analysis"], {})[label] = run
    out = []
    if "attention_perturbation" in by_analysis:
        out += _attention_section(by_analysis["attention_perturbation"])
    if "token_removal" in by_analysis:
        out += _removal_section(by_analysis["token_removal"])
    return out


def _attention_section(runs: dict[str, Path]) -> list[str]:
    from circuits.interventions import summarize_rates
    from circuits.runs.perturb import perturbation_rates
    from circuits.runs.results import read_manifest

    groups: dict[str, dict[str, Path]] = {}
    for label, run in runs.items():
        settings = read_manifest(run)["settings"]
        group = f"{Path(label).parent} ({settings['model']}, layers {settings['layers'] or 'all'})"
        groups.setdefault(group, {})[settings["perturbation"]] = run
    rows, fig, frames = [], go.Figure(), []
    order = {k: i for i, k in enumerate(PAPER_PERTURBATION)}
    for group, kinds in groups.items():
        kinds = dict(sorted(kinds.items(), key=lambda kv: order.get(kv[0], len(order))))
        frames += _per_frame_html(group, kinds)
        summary = summarize_rates(perturbation_rates(kinds))
        fig.add_bar(x=summary["kind"], y=summary["identifiable_token_rate"], name=group)
        rows += [{"run": group, **r, "Vilas et al. B/32": PAPER_PERTURBATION.get(r["kind"], float("nan"))}
                 for r in summary.to_dict("records")]
    fig.add_bar(x=list(PAPER_PERTURBATION), y=list(PAPER_PERTURBATION.values()),
                name="Vilas et al. B/32, ImageNet-S", marker_color="lightgrey")
    fig.update_layout(title="Identifiable image tokens at the last block under attention perturbation",
                      yaxis_title="share of image tokens with rank 0", yaxis_range=[0, 1], barmode="group")
    return ["<h2>Attention perturbation (Vilas et al. 2023)</h2>",
            "<p>After the softmax, without renormalisation, in the chosen blocks: <b>self_only</b> makes every "
            "image-token query attend only to itself; <b>no_cls</b> gives image-token queries zero weight on "
            "the class token. The class token's own row is untouched. If image tokens carry class "
            "information mostly through their own updates, self_only collapses the rate; if they do not "
            "read it from the class token, no_cls leaves it almost unchanged. <b>no_cross_frame</b> (video "
            "models) sets the attention scores of image-token queries on patch tokens of other time positions "
            "to -inf, so the softmax renormalises over their own frame and the prefix tokens.</p>",
            figure_html(fig), table_html(rows, "Last-block identifiable-token rate per perturbation"), *frames]


def _per_frame_html(group: str, kinds: dict[str, Path]) -> list[str]:
    """A video model's rates per time position and perturbation (none for image runs)."""
    from circuits.report.assets import read_labels
    from circuits.report.video import per_frame_rates

    labels = read_labels(next(iter(kinds.values())))
    if not labels.is_video:
        return []
    df = per_frame_rates(kinds, labels.n_time)
    fig = go.Figure()
    for kind, part in df.groupby("kind", sort=False):
        fig.add_bar(x=part["time"], y=part["rate"].round(4), name=kind)
    fig.update_layout(title=f"{group}: identifiable patch tokens at the last block per time position",
                      xaxis_title="time position", yaxis_title="share of its patch tokens with rank 0",
                      yaxis_range=[0, 1], barmode="group")
    return [figure_html(fig)]


def _removal_section(runs: dict[str, Path]) -> list[str]:
    from circuits.runs.results import read_manifest, read_table
    from circuits.token_removal import removal_summary

    rows, fig = [], go.Figure()
    for label, run in runs.items():
        model = read_manifest(run)["settings"]["model"]
        summary = removal_summary(read_table(run, "removal"))
        names = [REMOVAL_LABELS[r] for r in summary["removal"]]
        fig.add_bar(x=names, y=summary["rate_unperturbed"], name=f"{label}: unperturbed, same tokens")
        fig.add_bar(x=names, y=summary["rate_removed"], name=f"{label}: after removal")
        for r in summary.to_dict("records"):
            paper = PAPER_REMOVAL.get(r["removal"], (float("nan"),) * 2)
            rows.append({"run": f"{label} ({model})", **r, "Vilas et al. B/32 removed": paper[0],
                         "Vilas et al. B/32 unperturbed": paper[1]})
    fig.add_bar(x=[REMOVAL_LABELS[k] for k in PAPER_REMOVAL], y=[v[1] for v in PAPER_REMOVAL.values()],
                name="Vilas et al. B/32: unperturbed", marker_color="lightgrey")
    fig.add_bar(x=[REMOVAL_LABELS[k] for k in PAPER_REMOVAL], y=[v[0] for v in PAPER_REMOVAL.values()],
                name="Vilas et al. B/32: removed", marker_color="darkgrey")
    fig.update_layout(title="Identifiable remaining tokens at the last block after token removal",
                      yaxis_title="share of remaining image tokens with rank 0", yaxis_range=[0, 1],
                      barmode="group")
    return ["<h2>Token removal (Vilas et al. 2023)</h2>",
            "<p>Tokens dropped after the embedding, before the first block. <b>context</b> removes the "
            "background tokens (class + object tokens remain); <b>class_label</b> removes the object tokens "
            "(class + background tokens remain). Compared with the same tokens in the unperturbed run. "
            "Images whose removal leaves no image token are not counted.</p>",
            figure_html(fig), table_html(rows, "Last-block identifiable-token rate of the remaining tokens")]
