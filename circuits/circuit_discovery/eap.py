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
                                              head_out, reader_hook_names, run_patched, targets,
                                              writer_hook_names)
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
    state: dict = {}

    def batch_metric(logits: Tensor) -> Tensor:
        if "t" not in state:  # targets from the corrupted run (alpha = 0) or a cached one
            state["t"] = targets(clean_logits, state.get("corr_logits", logits.detach()), clean_targets, corrupted_targets)
        return fn(logits, *state["t"])

    if method == "eap":  # the gradient run is the corrupted run: its writers are the corrupted values
        grads, corr_w = _reader_grads(model, corrupted_images, None, batch_metric, fwd_hooks)
    else:
        state["corr_logits"], corr_w = cache_writers(model, corrupted_images, fwd_hooks)
        grads = 0.0
        for k in range(1, ig_steps + 1):
            embed = corr_w[0] + k / ig_steps * (clean_w[0] - corr_w[0])
            grads = grads + _reader_grads(model, corrupted_images, embed, batch_metric, fwd_hooks)[0] / ig_steps
    # One matrix product over (image, position, feature); the mean over images.
    scores = ((clean_w - corr_w).flatten(1) @ grads.flatten(1).T) / len(clean_images)
    mask = graph.edge_mask().to(scores.device)
    return EdgeScores(graph, scores * mask, mask)


def _reader_grads(model, images, embed_value: Optional[Tensor], metric, fwd_hooks) -> tuple[Tensor, Tensor]:
    """(d batch-sum(metric) / d reader input [r, b, p, d], writer values [w, b, p, d]) of a run
    on `images`, its embedding replaced by `embed_value` when given."""
    n_layers = model.cfg.n_layers
    acts: dict[str, Tensor] = {}
    writers: list[Tensor] = []

    def embed(x, hook):
        x = x if embed_value is None else embed_value
        return x if x.requires_grad else x.detach().requires_grad_(True)

    def keep(x, hook):
        acts[hook.name] = x

    def record(x, hook):
        if hook.name.endswith("hook_z"):
            writers.extend(head_out(model, hook.layer(), x.detach()).unbind(2))
        else:
            writers.append(x.detach())

    names = reader_hook_names(n_layers)
    hooks = [("blocks.0.hook_resid_pre", embed), *differentiable(fwd_hooks), *[(n, keep) for n in names],
             *[(n, record) for n in writer_hook_names(n_layers)]]
    with torch.enable_grad(), graph_hooks_on(model), model.hooks(fwd_hooks=hooks):
        logits = model(images)
        grads = dict(zip(names, torch.autograd.grad(metric(logits).sum(), [acts[n] for n in names])))
    rows = []
    for l in range(n_layers):
        for s in QKV:
            rows += list(grads[f"blocks.{l}.hook_{s}_input"].unbind(2))
        rows.append(grads[f"blocks.{l}.hook_mlp_in"])
    rows.append(grads[names[-1]])
    with torch.no_grad():
        return torch.stack(rows), torch.stack(writers)


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


def prune(scores: EdgeScores, *, budget: Optional[int] = None, threshold: Optional[float] = None,
          greedy: bool = False) -> Circuit:
    """The circuit of the `budget` edges of largest |score|, or of every edge with
    |score| >= threshold (exactly one of the two).

    greedy: grow the circuit from the logits instead (Hanna et al. 2024, "Have Faith in
    Faithfulness", sec. 3: greedy edge selection), each step adding the largest-|score| edge
    into a node already in the circuit, so every kept edge lies on a path to the logits (the
    top-|score| circuit may keep edges whose reader feeds nothing kept)."""
    if (budget is None) == (threshold is None):
        raise ValueError("give exactly one of budget (number of edges) or threshold (minimum |score|)")
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    mag = scores.scores.abs().masked_fill(~scores.mask, -1.0)
    if greedy:
        return Circuit(scores.graph, _greedy(scores.graph, mag, budget, threshold))
    if budget is not None:
        keep = torch.zeros_like(scores.mask)
        top = mag.flatten().topk(min(budget, int(scores.mask.sum()))).indices
        keep.view(-1)[top] = True
    else:
        keep = (mag >= threshold) & scores.mask
    return Circuit(scores.graph, keep)


def _greedy(graph: ViTGraph, mag: Float[Tensor, "w r"], budget: Optional[int], threshold: Optional[float]) -> Tensor:
    """Edges kept by greedy growth from the logits (mag: |score|, -1 where no edge)."""
    owner = graph.reader_owner().to(mag.device)
    live = owner < 0  # the readers of the nodes in the circuit: the logits first
    keep = torch.zeros(mag.shape, dtype=torch.bool, device=mag.device)
    limit = int((mag >= 0).sum()) if budget is None else budget
    for _ in range(limit):
        cand = mag.masked_fill(~live[None, :] | keep, -1.0)
        best = int(cand.flatten().argmax())
        w, r = divmod(best, mag.shape[1])
        if cand[w, r] < 0 or (threshold is not None and cand[w, r] < threshold):
            break
        keep[w, r] = True
        live |= owner == w  # the writer joins the circuit: its inputs become candidates
    return keep


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
