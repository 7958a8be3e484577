"""Path patching (Wang et al. 2023, "Interpretability in the Wild", sec. 3.1; Goldowsky-Dill et
al. 2023, "Localizing Model Behavior with Path Patching"): the effect of a sender component
on chosen receivers' inputs only, everything else running at its base value.

Here the base run is the corrupted images and the sender's clean value is patched along the
direct residual paths into the receivers' query / key / value inputs (the split-input hooks),
MLP inputs or the logits; the receivers' outputs then flow on as usual. It follows
`circuits.patching`'s convention (clean into corrupted): with every receiver after the sender
patched it equals patching the sender's output itself (tested).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

from circuits.circuit_discovery.graph import ViTGraph, cache_writers, check_pair, run_patched, targets
from circuits.circuit_discovery.metrics import resolve_metric
from circuits.patching import Metric
from hooked_vit import HookedViT
from hooked_vit.errors import UserError


def path_patch(model: HookedViT, clean_images: Tensor, corrupted_images: Tensor, sender: str,
               receivers: Union[str, Sequence[str]] = "all", metric: Union[str, Metric] = "logit_diff", *,
               clean_targets: Optional[Int[Tensor, "b"]] = None, corrupted_targets: Optional[Int[Tensor, "b"]] = None,
               fwd_hooks: Sequence = ()) -> Tensor:
    """metric(corrupted run with sender -> receivers patched to clean) - metric(corrupted), per
    image. sender: "embed", "L{l}H{h}" or "MLP{l}"; receivers: reader names ("L{l}H{h}.q",
    ".k", ".v", "MLP{l}", "logits") or "all" (every reader after the sender)."""
    fn = resolve_metric(metric)
    check_pair(clean_images, corrupted_images)
    graph = ViTGraph.of(model)
    w = graph.writer_index(sender)
    exists = graph.edge_mask()
    patched = torch.zeros(exists.shape)
    cols = exists[w].nonzero()[:, 0].tolist() if receivers == "all" else [
        graph.reader_index(r) for r in ([receivers] if isinstance(receivers, str) else receivers)]
    for c in cols:
        if not exists[w, c]:
            raise UserError(f"{graph.readers[c]} runs before {sender}: no path from the sender to it")
        patched[w, c] = 1.0
    clean_logits, clean_w = cache_writers(model, clean_images, fwd_hooks)
    corr_logits, _ = cache_writers(model, corrupted_images, fwd_hooks)
    ct, rt = targets(clean_logits, corr_logits, clean_targets, corrupted_targets)
    with torch.no_grad():
        logits = run_patched(model, corrupted_images, clean_w.to(corr_logits.device), patched.to(corr_logits.device), fwd_hooks)
    return fn(logits, ct, rt) - fn(corr_logits, ct, rt)
