"""Edge attribution patching (EAP; Syed et al. 2023, "Attribution Patching Outperforms
Automated Circuit Discovery") and EAP with integrated gradients (EAP-IG; Hanna et al. 2024,
"Have Faith in Faithfulness"), pruning to a circuit, and faithfulness.

The score of an edge writer -> reader is (writer_clean - writer_corrupted) . d metric /
d reader_input, the AtP estimate of patching that one edge's clean value into the corrupted
run (see `circuits.circuit_discovery.graph` for the nodes). EAP takes the gradient at the
corrupted run: one clean forward, one corrupted forward and one backward for every edge at
once. EAP-IG averages it over `ig_steps` runs whose embedding is interpolated from the
corrupted to the clean one (ig_steps + 1 forwards, ig_steps backwards).

Faithfulness (Hanna et al. 2024): run the clean images with every edge outside the circuit
carrying the writer's corrupted value; the share recovered is
(metric(circuit) - metric(corrupted)) / (metric(clean) - metric(corrupted)) on batch means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.circuit_discovery.graph import (QKV, ViTGraph, cache_writers, check_pair, differentiable, graph_hooks_on,
                                              reader_hook_names, run_patched, targets)
from circuits.circuit_discovery.metrics import resolve_metric
from circuits.patching import Metric
from hooked_vit import HookedViT


@dataclass
class EdgeScores:
    graph: ViTGraph
    scores: Float[Tensor, "w r"]  # 0 where no edge exists
    mask: Tensor  # [w, r] bool, the edges that exist

    def to_frame(self) -> pd.DataFrame:
        """One row per edge: upstream, downstream, score, rank by |score| (0 = first)."""
        w, r = self.mask.nonzero(as_tuple=True)
        df = pd.DataFrame({"upstream": [self.graph.writers[i] for i in w.tolist()],
                           "downstream": [self.graph.readers[j] for j in r.tolist()],
                           "score": self.scores[w, r].cpu().numpy()})
        df["rank"] = df["score"].abs().rank(ascending=False, method="first").astype(int) - 1
        return df.sort_values("rank").reset_index(drop=True)


def edge_attribution(
    model: HookedViT,
    clean_images: Tensor,
    corrupted_images: Tensor,
    metric: Union[str, Metric] = "logit_diff",
    *,
    method: str = "eap",
    ig_steps: int = 5,
    clean_targets: Optional[Int[Tensor, "b"]] = None,
    corrupted_targets: Optional[Int[Tensor, "b"]] = None,
    fwd_hooks: Sequence = (),
) -> EdgeScores:
    """EAP (method="eap") or EAP-IG (method="eap-ig") scores of every edge of the ViT graph."""
    if method not in ("eap", "eap-ig"):
        raise ValueError(f"method must be 'eap' or 'eap-ig', got {method!r}")
    if method == "eap-ig" and ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
    fn = resolve_metric(metric, needs_grad=True)
    check_pair(clean_images, corrupted_images)
    graph = ViTGraph.of(model)
    clean_logits, clean_w = cache_writers(model, clean_images, fwd_hooks)
    corr_logits, corr_w = cache_writers(model, corrupted_images, fwd_hooks)
    ct, rt = targets(clean_logits, corr_logits, clean_targets, corrupted_targets)
    alphas = [0.0] if method == "eap" else [k / ig_steps for k in range(1, ig_steps + 1)]
    grads = sum(_reader_grads(model, corrupted_images, clean_w[0], corr_w[0], a, lambda lg: fn(lg, ct, rt), fwd_hooks)
                for a in alphas) / len(alphas)
    scores = torch.einsum("wbpd,rbpd->wr", clean_w - corr_w, grads) / len(clean_images)  # mean over images
    mask = graph.edge_mask().to(scores.device)
    return EdgeScores(graph, scores * mask, mask)


def _reader_grads(model, images, clean_embed, corr_embed, alpha, metric, fwd_hooks) -> Float[Tensor, "r b p d"]:
    """d batch-sum(metric) / d reader input, with the embedding at corr + alpha (clean - corr)."""
    n_layers = model.cfg.n_layers
    acts: dict[str, Tensor] = {}

    def embed(x, hook):
        return (corr_embed + alpha * (clean_embed - corr_embed)).detach().requires_grad_(True)

    def keep(x, hook):
        acts[hook.name] = x

    names = reader_hook_names(n_layers)
    hooks = [("blocks.0.hook_resid_pre", embed), *differentiable(fwd_hooks), *[(n, keep) for n in names]]
    with torch.enable_grad(), graph_hooks_on(model), model.hooks(fwd_hooks=hooks):
        logits = model(images)
        grads = dict(zip(names, torch.autograd.grad(metric(logits).sum(), [acts[n] for n in names])))
    rows = []
    for l in range(n_layers):
        for s in QKV:
            rows += list(grads[f"blocks.{l}.attn.hook_{s}_input"].unbind(2))
        rows.append(grads[f"blocks.{l}.hook_mlp_in"])
    rows.append(grads[names[-1]])
    return torch.stack(rows).detach()


@dataclass
class Circuit:
    graph: ViTGraph
    edges: Tensor  # [w, r] bool, the edges kept

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def edge_names(self) -> list[tuple[str, str]]:
        w, r = self.edges.nonzero(as_tuple=True)
        return [(self.graph.writers[i], self.graph.readers[j]) for i, j in zip(w.tolist(), r.tolist())]


def prune(scores: EdgeScores, *, budget: Optional[int] = None, threshold: Optional[float] = None) -> Circuit:
    """The circuit of the `budget` edges of largest |score|, or of every edge with
    |score| >= threshold (exactly one of the two)."""
    if (budget is None) == (threshold is None):
        raise ValueError("give exactly one of budget (number of edges) or threshold (minimum |score|)")
    mag = scores.scores.abs().masked_fill(~scores.mask, -1.0)
    if budget is not None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        keep = torch.zeros_like(scores.mask)
        top = mag.flatten().topk(min(budget, int(scores.mask.sum()))).indices
        keep.view(-1)[top] = True
    else:
        keep = (mag >= threshold) & scores.mask
    return Circuit(scores.graph, keep)


@dataclass
class Faithfulness:
    clean: float  # batch-mean metric, clean run
    corrupted: float  # corrupted run
    circuit: float  # clean run with the edges outside the circuit corrupted
    recovered: float  # (circuit - corrupted) / (clean - corrupted)
    n_edges: int


def faithfulness(model: HookedViT, circuit: Circuit, clean_images: Tensor, corrupted_images: Tensor,
                 metric: Union[str, Metric] = "logit_diff", *, clean_targets=None, corrupted_targets=None,
                 fwd_hooks: Sequence = ()) -> Faithfulness:
    """Share of the clean-minus-corrupted metric that the circuit alone recovers."""
    fn = resolve_metric(metric)
    check_pair(clean_images, corrupted_images)
    clean_logits, _ = cache_writers(model, clean_images, fwd_hooks)
    corr_logits, corr_w = cache_writers(model, corrupted_images, fwd_hooks)
    ct, rt = targets(clean_logits, corr_logits, clean_targets, corrupted_targets)
    outside = (circuit.graph.edge_mask().to(corr_w.device) & ~circuit.edges.to(corr_w.device)).float()
    with torch.no_grad():
        logits = run_patched(model, clean_images, corr_w, outside, fwd_hooks)
    m = [float(fn(lg, ct, rt).float().mean()) for lg in (clean_logits, corr_logits, logits)]
    gap = m[0] - m[1]
    if gap == 0:
        raise ValueError("clean and corrupted runs give the same metric: nothing to recover; pick another corruption")
    return Faithfulness(m[0], m[1], m[2], (m[2] - m[1]) / gap, circuit.n_edges)
