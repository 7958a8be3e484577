"""Attribution patching (AtP): a first-order estimate of every activation-patching effect
from one clean forward, one corrupted forward and one backward (Nanda 2023, "Attribution
Patching: Activation Patching At Industrial Scale", neelnanda.io/attribution-patching;
Kramar et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour",
arXiv 2403.00745).

For an activation a at a cell (layer, position [, head]) the effect of patching its clean
value into the corrupted run, metric(corrupted with a := a_clean) - metric(corrupted), is
estimated as (a_clean - a_corrupted) . d metric / d a at the corrupted run, summed over the
cell's feature dimension and averaged over images. It is the same convention (clean patched
into corrupted) as `circuits.patching.patch_activations`, so the two compare cell for cell;
where the metric is linear in the activation the estimate is exact.

`scores_frame(scores, model)` lays the scores out as a table with each position's name
(`hooked_vit.tokens.token_labels`: "t3 patch (2, 5)" on video models). On divided
space-time models the short head-site names (z, q, k, v, result, pattern) and qk_fix are
refused (those hooks are grouped by frame / (row, col)); full hook names are scored as they are.

AtP*'s QK fix (Kramar et al. 2024, sec. 3.1.1), `qk_fix=True`: a query or key reaches the
metric only through the attention pattern, and where the softmax saturates its gradient
vanishes, so the linear estimate misses large effects. The fix recomputes the pattern
exactly with the clean query (or key) patched in, from the corrupted run's q and k (no
extra forward), and takes d metric / d pattern . (pattern_patched - pattern_corrupted).
It is exact whenever the metric is linear in the pattern (tested). AtP*'s GradDrop (the
gradient with one layer's residual skip dropped, against cancellation) is not implemented.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.arrays import to_numpy
from circuits.circuit_discovery.graph import check_pair, differentiable, targets
from circuits.circuit_discovery.metrics import resolve_metric
from circuits.patching import Metric, _act_name, _attn_result, check_grouped_sites
from hooked_vit import HookedViT
from hooked_vit.errors import UserError
from hooked_vit.tokens import token_labels

DEFAULT_SITES = ("resid_pre", "z", "mlp_out")
QK_SITES = ("q", "k")


def attribution_patch(
    model: HookedViT,
    clean_images: Tensor,
    corrupted_images: Tensor,
    metric: Union[str, Metric] = "logit_diff",
    sites: Sequence[str] = DEFAULT_SITES,
    *,
    qk_fix: bool = False,
    clean_targets: Optional[Int[Tensor, "b"]] = None,
    corrupted_targets: Optional[Int[Tensor, "b"]] = None,
    fwd_hooks: Sequence = (),
) -> dict[str, Tensor]:
    """AtP scores per site: TL short names (resid_pre/mid/post, attn_out, mlp_out, z, q, k, v,
    result, pre, post) give [layer, pos] or [layer, pos, head]; a full hook name gives
    [pos, ...] for that hook. qk_fix: score the "q" / "k" sites (short names or
    blocks.{l}.attn.hook_q / hook_k) with AtP*'s exact pattern recomputation. fwd_hooks run
    in every pass (e.g. a planted edit)."""
    fn = resolve_metric(metric, needs_grad=True)
    check_pair(clean_images, corrupted_images)
    check_grouped_sites(model, [s for s in sites if s not in model.hook_dict])
    if qk_fix and model.cfg.attention_type == "divided_space_time":
        raise UserError("qk_fix recomputes a [batch, heads, q, k] pattern; divided space-time attention's patterns "
                         "are grouped by frame / (row, col): use qk_fix=False")
    if qk_fix and model.cfg.diff_attn:
        raise UserError("qk_fix recomputes one softmax pattern per head from q and k; differential attention "
                         "(diff_attn) has two half-head softmax maps per head, subtracted with a learned lambda: "
                         "use qk_fix=False")
    names = {s: _names(model, s) for s in sites}
    fixed = {n for ns in names.values() for n in ns if _qk_side(n)} if qk_fix else set()
    if qk_fix and not fixed:
        raise UserError("qk_fix=True applies to the 'q' and 'k' sites; add them to sites or drop qk_fix")
    patterns = {_pattern_name(n) for n in fixed}
    wanted = {n for ns in names.values() for n in ns} | {_partner(n) for n in fixed}
    with _attn_result(model, any(n.endswith("attn.hook_result") for n in wanted)):
        with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
            clean_logits, clean_cache = model.run_with_cache(clean_images, names_filter=lambda n: n in wanted)
        acts: dict[str, Tensor] = {}
        with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", _leaf), *differentiable(fwd_hooks),
                                                         *[(n, _keep(acts)) for n in wanted | patterns]]):
            logits = model(corrupted_images)
        ct, rt = targets(clean_logits, logits.detach(), clean_targets, corrupted_targets)
        # A hook may replace an activation by a constant (a frozen pattern): it has no gradient.
        order = sorted(n for n in wanted | patterns if acts[n].requires_grad)
        grads = dict(zip(order, torch.autograd.grad(fn(logits, ct, rt).mean(), [acts[n] for n in order],
                                                    allow_unused=True)))
    out = {}
    for site, ns in names.items():
        scores = [_qk_score(model, n, clean_cache, acts, grads) if n in fixed else
                  _score(clean_cache[n], acts[n].detach(), grads.get(n)) for n in ns]
        out[site] = torch.stack(scores) if len(ns) > 1 or site != ns[0] else scores[0]
    return out


def scores_frame(scores: dict[str, Tensor], model: HookedViT) -> pd.DataFrame:
    """The scores of short-name sites ([layer, pos] or [layer, pos, head]) as one long table:
    site, layer, pos, token (the position's name), [head], value."""
    labels = token_labels(model)
    frames = []
    for site, values in scores.items():
        if values.ndim not in (2, 3) or values.shape[0] != model.cfg.n_layers:
            raise UserError(f"scores_frame takes short-name sites [layer, pos(, head)]; {site} is "
                             f"{tuple(values.shape)}")
        axes = ["layer", "pos", "head"][:values.ndim]
        index = pd.MultiIndex.from_product([range(n) for n in values.shape], names=axes).to_frame(index=False)
        index["value"] = to_numpy(values.reshape(-1).float())
        index["token"] = [labels[p] if values.shape[1] == len(labels) else str(p) for p in index["pos"]]
        frames.append(index.assign(site=site))
    return pd.concat(frames, ignore_index=True)


def _names(model: HookedViT, site: str) -> list[str]:
    if site in model.hook_dict:
        return [site]
    try:
        return [_act_name(site, l) for l in range(model.cfg.n_layers)]
    except Exception:
        raise UserError(f"unknown site {site!r}; use a TL short name (z, mlp_out, resid_pre, ...) or a hook name") from None


def _qk_side(name: str) -> Optional[str]:
    """"q" / "k" for a block's attn.hook_q / hook_k, else None."""
    for side in QK_SITES:
        if name.startswith("blocks.") and name.endswith(f".attn.hook_{side}"):
            return side
    return None


def _partner(name: str) -> str:
    """The other side's hook of the same attention (the query needs the keys and back)."""
    return name[:-1] + ("k" if _qk_side(name) == "q" else "q")


def _pattern_name(name: str) -> str:
    return name.rsplit(".", 1)[0] + ".hook_pattern"


def _score(clean: Tensor, corrupted: Tensor, grad: Optional[Tensor]) -> Tensor:
    """(clean - corrupted) . grad over the feature dim, averaged over images: [pos, ...]."""
    if grad is None:  # the activation does not reach the metric
        grad = torch.zeros_like(corrupted)
    per_image = ((clean - corrupted) * grad).sum(-1)
    return per_image.sum(0)  # grad is of the batch mean: the sum undoes its 1/b


def _qk_score(model: HookedViT, name: str, clean_cache, acts: dict, grads: dict) -> Float[Tensor, "pos head"]:
    """AtP* score of every query (or key) position and head of one attention layer."""
    side, pattern = _qk_side(name), _pattern_name(name)
    grad = grads.get(pattern)
    q, k = (acts[name[:-1] + s].detach() for s in "qk")
    if grad is None:  # the layer does not reach the metric
        return torch.zeros(q.shape[1], q.shape[2], dtype=q.dtype, device=q.device)
    scale = float(model.blocks[int(name.split(".")[1])].attn.scale)
    # float64: a saturated softmax's small entries carry the effect; keep their precision.
    q, k, grad = (x.double() for x in (q, k, grad * len(grad)))  # grad is of the batch mean: undo the 1/b
    clean = clean_cache[name].double()
    scores = torch.einsum("bqhe,bkhe->bhqk", q * scale, k)
    if side == "q":
        patched = torch.einsum("bqhe,bkhe->bhqk", clean * scale, k)
        delta = (grad * (patched.softmax(-1) - scores.softmax(-1))).sum(-1)  # [b, h, q]
    else:
        column = torch.einsum("bqhe,bkhe->bhqk", q * scale, clean)  # score of query t with clean key s
        delta = key_patch_effect(scores, column, grad).sum(-2)  # [b, h, k]
    return delta.mean(0).T.to(acts[name].dtype)


def key_patch_effect(scores: Float[Tensor, "b h q k"], column: Float[Tensor, "b h q k"],
                     grad: Float[Tensor, "b h q k"]) -> Float[Tensor, "b h q k"]:
    """grad . (softmax(scores with [., s] := column[., s]) - softmax(scores)) for every row
    t and key s, without a pattern per key: patching key s moves mass p'-p onto s and scales
    the other entries of the row alike, so the change is (p' - p)(g_s - mean of g over the
    other keys, weighted by the pattern). Leave-one-out sums are formed from prefix and
    suffix sums (never by subtracting the dominant entry), so a saturated row stays exact;
    where the other entries underflow even in float64 the pattern is recomputed per key."""
    pattern = scores.softmax(-1)
    weight = _sum_others(pattern)  # 1 - p, as a sum of the other entries: no cancellation
    if (weight == 0).any():  # the other entries underflowed (a score gap > ~700): one pattern per key
        return _key_patch_per_key(scores, column, grad)
    rest = scores.logsumexp(-1, keepdim=True) + weight.log()  # log-sum-exp of the row without key s
    p, p_new = torch.sigmoid(scores - rest), torch.sigmoid(column - rest)
    return (p_new - p) * (grad - _sum_others(pattern * grad) / weight)


def _key_patch_per_key(scores: Tensor, column: Tensor, grad: Tensor) -> Tensor:
    """key_patch_effect by recomputing the pattern once per patched key (exact, slower)."""
    base = (grad * scores.softmax(-1)).sum(-1)
    out = torch.empty_like(scores)
    for s in range(scores.shape[-1]):
        patched = scores.clone()
        patched[..., s] = column[..., s]
        out[..., s] = (grad * patched.softmax(-1)).sum(-1) - base
    return out


def _sum_others(x: Tensor) -> Tensor:
    """For every s along the last dim: the sum of x over the entries other than s."""
    zero = torch.zeros_like(x[..., :1])
    before = torch.cat([zero, x.cumsum(-1)[..., :-1]], -1)
    after = torch.cat([x.flip(-1).cumsum(-1).flip(-1)[..., 1:], zero], -1)
    return before + after


def _leaf(x: Tensor, hook) -> Tensor:
    """Make the run differentiable even when the model's parameters are frozen."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _keep(store: dict):
    def hook(x, hook):
        store[hook.name] = x
    return hook
