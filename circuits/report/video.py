"""The report's pictures over a clip's frames, for runs of video models (docs/video.md): token
maps as frame strips, per-frame curves of identifiability over the layers, and the attention of
one token across the frames. Used by the identify and perturbation sections; a run is a video
run when its labels.json records a time layout (`circuits.runs.context.run_labels`).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from circuits.identifiability import chance_identifiability, identifiability
from circuits.plot import attention_across_frames, frame_strip, per_time_curves
from circuits.report.assets import RunLabels
from circuits.report.html import figure_html
from circuits.video import time_means


def per_frame_identifiability(res, n_time: int) -> np.ndarray:
    """Mean block-output identifiability of each time position's patch tokens at every block,
    over the run's clips: [layers, time]."""
    ident = identifiability(res.rank[:, res.site("block")], res.n_classes)  # [n, L, P]
    return np.asarray(time_means(ident, res.n_prefix, n_time)).mean(0)


def per_frame_html(label: str, res, labels: RunLabels) -> list[str]:
    """Per-frame curves: identifiability of each time position's patch tokens over the blocks."""
    values = per_frame_identifiability(res, labels.n_time)
    fig = per_time_curves(values, title=f"{label}: identifiability per time position, block outputs",
                          chance=chance_identifiability(res.n_classes), yaxis_range=[0, 1.02])
    return [figure_html(fig), "<p class='caption'>One line per time position (t0 the first tubelet); each point "
                              "is the mean identifiability of that time position's patch tokens over the "
                              f"{len(res.images)} clips.</p>"]


def frame_strips_html(label: str, res, labels: RunLabels, thumbs: dict, picks: list[int]) -> list[str]:
    """Last-block identifiability of every patch token, one row of frames per sampled clip."""
    if not picks:
        return []
    rows, cols = labels.grid
    t = labels.n_time
    index = res.images["index"].to_numpy()
    blk = res.site("block")
    values = np.stack([identifiability(res.rank[i, blk, -1, res.n_prefix:], res.n_classes).reshape(t, rows, cols)
                       for i in picks])
    frames = [thumbs.get(int(index[i])) for i in picks]
    have = all(f is not None for f in frames)
    outlines = None
    if res.object_tokens is not None:
        outlines = np.stack([res.object_tokens[i, res.n_prefix:].reshape(t, rows, cols) for i in picks])
    names = [f"#{int(index[i])} {labels.cls(res.images['label'].iloc[i])}" for i in picks]
    fig = frame_strip(values, frames if have else None, title=f"{label}: last-block identifiability over the frames",
                      clip_names=names, zmin=0, zmax=1, colorbar_title="identifiability", outlines=outlines,
                      num_frames=labels.num_frames)
    notes = [f"{len(picks)} of {len(index)} clips, one row each, one panel per time position (over its first "
             "frame); colour: identifiability of the token's last-block output."]
    if outlines is not None:
        notes.append("Red squares: object tokens (the object in any frame of the tubelet).")
    if not have:
        notes.append("The run kept no thumbnails of these clips, so the maps are drawn without their frames.")
    return [figure_html(fig), f"<p class='caption'>{html.escape(' '.join(notes))}</p>"]


def attention_html(label: str, run: Path, res, labels: RunLabels, thumbs: dict) -> list[str]:
    """The attention table's first clip: its query token's attention across the frames at the
    first and last block (joint space-time models; the table is absent otherwise)."""
    from circuits.runs.results import read_table, stack_column

    if not any((Path(run) / "attention").glob("part-*.parquet")):
        return ["<p class='caption'>No attention across frames: the run kept no attention table (a divided "
                "space-time model, or a run without thumbnails).</p>"]
    table = read_table(run, "attention").sort_values(["index", "layer"], kind="stable")
    first = int(table["index"].iloc[0])
    part = table[table["index"] == first]
    pattern = stack_column(part, "pattern")  # [L, P]
    query = int(part["query"].iloc[0])
    names = labels.token_names(pattern.shape[1], res.n_prefix)
    truth = res.images.loc[res.images["index"] == first, "label"]
    clip = f"#{first}" + (f" {labels.cls(truth.iloc[0])}" if len(truth) else "")
    out = []
    for layer in sorted({0, len(pattern) - 1}):
        fig = attention_across_frames(pattern[layer], query, thumbs.get(first), n_prefix=res.n_prefix, n_time=labels.n_time,
                                      grid=labels.grid, labels=names, num_frames=labels.num_frames,
                                      title=f"{label}: attention of {names[query]} across the frames, clip {clip}, "
                                            f"block {layer} (mean over heads)")
        out.append(figure_html(fig))
    out.append("<p class='caption'>Panel titles: the share of the query's attention on each time position's "
               "patches.</p>")
    return out


def per_frame_rates(runs: dict[str, Path], n_time: int) -> pd.DataFrame:
    """Per perturbation kind and time position, the last-block identifiable-token rate of that
    time position's patch tokens (mean over clips): columns kind, time, rate."""
    from circuits.runs.identify import load_results

    rows = []
    for kind, run in runs.items():
        res = load_results(run)
        hit = (res.rank[:, res.site("block"), -1] == 0).astype(np.float64)  # [n, P]
        rates = np.asarray(time_means(hit, res.n_prefix, n_time)).mean(0)
        rows += [{"kind": kind, "time": f"t{t}", "rate": float(r)} for t, r in enumerate(rates)]
    return pd.DataFrame(rows)
