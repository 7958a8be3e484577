"""Report section: circuit discovery runs (edge attribution patching, Syed et al. 2023; EAP-IG,
Hanna et al. 2024; docs/circuit_discovery.md): the kept circuit as a graph, its faithfulness,
and the attribution-patching scores per head and token position."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from circuits.plot import circuit_graph, position_heatmap
from circuits.report.assets import read_labels
from circuits.report.html import figure_html, table_html

ANALYSES = ("circuit",)


def report_section(runs: dict[str, Path], images: int = 8) -> list[str]:
    """images: unused (the section draws no per-image figure); kept for the section contract."""
    out = ["<h2>Circuit discovery (edge attribution patching)</h2>",
           "<p>Edge scores: the metric's first-order change when one edge (a writer's output into a "
           "reader's input) carries the corrupted run's value. The circuit keeps the highest-|score| "
           "edges (or grows greedily from the logits, Hanna et al. 2024); faithfulness is the share of "
           "the clean-minus-corrupted metric it recovers with every "
           "other edge corrupted.</p>"]
    rows = []
    for label, run in runs.items():
        s = json.loads((run / "summary.json").read_text())
        rows.append({"run": label, "method": s["method"], "metric": s["metric"], "corruption": s["corruption"],
                     "images": s["n_images"], "edges": s["n_edges"], "edges kept": s["n_edges_kept"],
                     "pruning": "greedy from the logits" if s.get("greedy") else "top |score|",
                     "faithfulness": s["faithfulness"]})
    out.append(table_html(rows, "Circuits and the share of the metric they recover"))
    for label, run in runs.items():
        edges = pd.read_parquet(run / "edge_scores.parquet")
        out.append(figure_html(circuit_graph(edges, title=f"{label}: the kept edges (red raises the metric)")))
        tokens = read_labels(run).tokens
        out.append(figure_html(_head_heatmap(label, pd.read_parquet(run / "node_scores.parquet"), tokens)))
    return out


def _head_heatmap(label: str, nodes: pd.DataFrame, tokens):
    """Attribution patching of every head's output (z) at every token position."""
    z = nodes[nodes["site"] == "z"]
    heads = sorted({(int(l), int(h)) for l, h in zip(z["layer"], z["head"])})
    n_pos = int(z["pos"].max()) + 1
    grid = np.zeros((len(heads), n_pos))
    row = {key: i for i, key in enumerate(heads)}
    for l, h, p, v in zip(z["layer"], z["head"], z["pos"], z["score"]):
        grid[row[(int(l), int(h))], int(p)] = v
    names = tokens if tokens and len(tokens) == n_pos else [str(p) for p in range(n_pos)]
    return position_heatmap(grid, token_names=names, row_names=[f"L{l}H{h}" for l, h in heads],
                            title=f"{label}: attribution patching per head and token", colorbar_title="AtP score",
                            yaxis_title="head")
