"""Attribution patching (AtP): a first-order estimate of every activation-patching effect
from one clean forward, one corrupted forward and one backward (Nanda 2023, "Attribution
Patching: Activation Patching At Industrial Scale", neelnanda.io/attribution-patching;
Kramar et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour").

For an activation a at a cell (layer, position [, head]) the effect of patching its clean
value into the corrupted run, metric(corrupted with a := a_clean) - metric(corrupted), is
estimated as (a_clean - a_corrupted) . d metric / d a at the corrupted run, summed over the
cell's feature dimension and averaged over images. It is the same convention (clean patched
into corrupted) as `circuits.patching.patch_activations`, so the two compare cell for cell;
where the metric is linear in the activation the estimate is exact.

Not done: AtP*'s QK fix for attention saturation (recomputing the softmax for key/query
patches) - patch at hook_pattern or use exact patching for q/k when saturation matters.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

from circuits.circuit_discovery.graph import check_pair, differentiable, targets
from circuits.circuit_discovery.metrics import resolve_metric
from circuits.patching import Metric, _act_name, _attn_result
from hooked_vit import HookedViT

DEFAULT_SITES = ("resid_pre", "z", "mlp_out")


def attribution_patch(
    model: HookedViT,
    clean_images: Tensor,
    corrupted_images: Tensor,
    metric: Union[str, Metric] = "logit_diff",
    sites: Sequence[str] = DEFAULT_SITES,
    *,
    clean_targets: Optional[Int[Tensor, "b"]] = None,
    corrupted_targets: Optional[Int[Tensor, "b"]] = None,
    fwd_hooks: Sequence = (),
) -> dict[str, Tensor]:
    """AtP scores per site: TL short names (resid_pre/mid/post, attn_out, mlp_out, z, q, k, v,
    result, pre, post) give [layer, pos] or [layer, pos, head]; a full hook name gives
    [pos, ...] for that hook. fwd_hooks run in every pass (e.g. a planted edit)."""
    fn = resolve_metric(metric, needs_grad=True)
    check_pair(clean_images, corrupted_images)
    names = {s: _names(model, s) for s in sites}
    wanted = {n for ns in names.values() for n in ns}
    with _attn_result(model, "result" in sites):
        with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
            clean_logits, clean_cache = model.run_with_cache(clean_images, names_filter=lambda n: n in wanted)
        acts: dict[str, Tensor] = {}
        with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", _leaf), *differentiable(fwd_hooks),
                                                         *[(n, _keep(acts)) for n in wanted]]):
            logits = model(corrupted_images)
        ct, rt = targets(clean_logits, logits.detach(), clean_targets, corrupted_targets)
        grads = torch.autograd.grad(fn(logits, ct, rt).mean(), [acts[n] for n in wanted], allow_unused=True)
    grads = dict(zip(wanted, grads))
    out = {}
    for site, ns in names.items():
        scores = [_score(clean_cache[n], acts[n].detach(), grads[n]) for n in ns]
        out[site] = torch.stack(scores) if len(ns) > 1 or site != ns[0] else scores[0]
    return out


def _names(model: HookedViT, site: str) -> list[str]:
    if site in model.hook_dict:
        return [site]
    try:
        return [_act_name(site, l) for l in range(model.cfg.n_layers)]
    except Exception:
        raise ValueError(f"unknown site {site!r}; use a TL short name (z, mlp_out, resid_pre, ...) or a hook name") from None


def _score(clean: Tensor, corrupted: Tensor, grad: Optional[Tensor]) -> Tensor:
    """(clean - corrupted) . grad over the feature dim, averaged over images: [pos, ...]."""
    if grad is None:  # the activation does not reach the metric
        grad = torch.zeros_like(corrupted)
    per_image = ((clean - corrupted) * grad).sum(-1)
    return (per_image * len(per_image)).mean(0)  # grad is of the batch mean: undo the 1/b


def _leaf(x: Tensor, hook) -> Tensor:
    """Make the run differentiable even when the model's parameters are frozen."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _keep(store: dict):
    def hook(x, hook):
        store[hook.name] = x
    return hook
