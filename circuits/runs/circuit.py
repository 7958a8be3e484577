"""A dataset-level circuit-discovery run: EAP (or EAP-IG) edge scores and AtP node scores
averaged over the first `limit` images of a dataset, the circuit pruned to an edge budget,
and its faithfulness, written to `out_dir`:

    edge_scores.parquet   upstream, downstream, score, rank, in_circuit
    node_scores.parquet   site, layer, pos, head (-1 for non-head sites), score
    summary.json          settings, n_images, n_edges, n_edges_kept, faithfulness figures
    manifest.json         the run's settings (as every run has), so the report finds it

Rerunning with the same settings returns the finished run's summary; other settings are refused
unless overwrite=True. Runs in one pass over all images: not resumable mid-run. Video models
(joint attention) run the same over their space-time tokens, with the clip corruptions of
`circuits.circuit_discovery.corruptions` (reverse_frames, shuffle_frames, freeze_frames).
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import pandas as pd
import torch
from tqdm.auto import tqdm

from circuits.circuit_discovery.attribution_patching import attribution_patch
from circuits.circuit_discovery.corruptions import check_corruption, corrupt
from circuits.circuit_discovery.eap import EdgeScores, edge_attribution, faithfulness, prune
from circuits.circuit_discovery.graph import ViTGraph
from circuits.files import atomic_write_bytes
from circuits.runs.context import start_run
from circuits.runs.distributed import require_single_process
from hooked_vit import HookedViT
from hooked_vit.errors import UserError

log = logging.getLogger("circuits.runs.circuit")


def circuit_run(model: HookedViT, dataset, out_dir, *, method: str = "eap", metric: str = "logit_diff",
                corruption: str = "shuffle", budget: int = 20, limit: Optional[int] = None,
                batch_size: int = 32, ig_steps: int = 5, greedy: bool = False, overwrite: bool = False,
                progress: bool = False) -> dict:
    """Score, prune and evaluate a circuit over a dataset; returns the summary. greedy: grow the
    circuit from the logits (`prune(greedy=True)`) instead of keeping the top-|score| edges."""
    require_single_process("circuit")
    check_corruption(corruption, clips=model.cfg.is_video, inputs=f"{model.cfg.model_name} is an image model")
    ViTGraph.of(model)  # a model the graph refuses (divided space-time attention) is refused before the run starts
    run = start_run("circuit", model, dataset, out_dir, limit=limit, overwrite=overwrite, progress=progress,
                    method=method, metric=str(metric), corruption=corruption, budget=budget, ig_steps=ig_steps,
                    batch_size=batch_size, greedy=greedy)
    out = run.root
    if (out / "summary.json").exists() and not overwrite:
        done = json.loads((out / "summary.json").read_text())
        if done.get("n") == run.n:  # the same run over the same images, already finished
            return done
    batches = []
    for batch in run.batches(batch_size):
        clean = run.images(batch)
        batches.append((clean, corrupt(clean, corruption)))
    n = sum(len(c) for c, _ in batches)
    if n == 0:
        raise UserError(f"no readable images among the first {run.n} of the dataset; check --data")
    scores, nodes = None, None
    for clean, corrupted in tqdm(batches, desc=f"circuit: {method} edge and node scores", unit="batch",
                                 disable=not progress):
        w = len(clean) / n
        s = edge_attribution(model, clean, corrupted, metric, method=method, ig_steps=ig_steps)
        a = attribution_patch(model, clean, corrupted, metric)
        scores = s.scores * w if scores is None else scores + s.scores * w
        nodes = {k: v * w for k, v in a.items()} if nodes is None else {k: nodes[k] + v * w for k, v in a.items()}
    edges = EdgeScores(s.graph, scores, s.mask)
    circuit = prune(edges, budget=budget, greedy=greedy)
    clean = torch.cat([c for c, _ in batches])
    corrupted = torch.cat([c for _, c in batches])
    log.info("circuit: faithfulness of %d edges on %d images", circuit.n_edges, n)
    faith = faithfulness(model, circuit, clean, corrupted, metric)
    df = edges.to_frame()
    kept = set(circuit.edge_names())
    df["in_circuit"] = [(u, d) in kept for u, d in zip(df.upstream, df.downstream)]
    atomic_write_bytes(out / "edge_scores.parquet", df.to_parquet())
    atomic_write_bytes(out / "node_scores.parquet", _node_frame(nodes).to_parquet())
    summary = {"analysis": "circuit", "model": model.cfg.model_name, "method": method, "metric": metric,
               "corruption": corruption, "budget": budget, "greedy": greedy, "n": run.n, "n_images": n,
               "n_edges": int(edges.mask.sum()), "n_edges_kept": circuit.n_edges, "faithfulness": faith.recovered,
               "metric_clean": faith.clean,
               "metric_corrupted": faith.corrupted, "metric_circuit": faith.circuit}
    run.finish(summary)  # written last: a summary exists only for a finished run
    return summary


def _node_frame(nodes: dict) -> pd.DataFrame:
    rows = []
    for site, v in nodes.items():
        v = v.cpu()
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in v.shape]).tolist():
            layer, pos = idx[0], idx[1]
            rows.append((site, layer, pos, idx[2] if len(idx) > 2 else -1, float(v[tuple(idx)])))
    return pd.DataFrame(rows, columns=["site", "layer", "pos", "head", "score"])
