"""The metrics of Vilas et al. 2023, "Analyzing Vision Transformers for Image Classification in Class Embedding Space"
(docs/class_identifiability.md), as plain functions over projection results.

Arrays follow the layout written by `circuits.runs.identify` (N images, S sites, L layers,
P tokens, k top classes). "Image tokens" are the positions after the prefix tokens; the
class token is position 0. Where the reference code (github.com/martinagvilas/vit-cls_emb,
``src/identifiability.py``, ``src/plots/``) computes something else than the paper's
definition, the metric takes ``convention="original"`` to recompute the paper's numbers from
the same stored ranks; ``"ours"`` (the default) is the definition as written. The table is in
docs/class_identifiability.md ("Conventions").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import pandas as pd
from scipy import stats
from hooked_vit.errors import UserError

Convention = Literal["ours", "original"]
CONVENTIONS = ("ours", "original")


def check_convention(convention: str) -> str:
    """Refuse anything but "ours" / "original" (one message for every metric)."""
    if convention not in CONVENTIONS:
        raise UserError(f"convention must be 'ours' (the paper's definitions) or 'original' (the reference "
                         f"code's), got {convention!r}")
    return convention


def measured_tokens(n_prefix: int, convention: Convention = "ours", perturbed: bool = False) -> slice:
    """Token positions an identifiable-token rate counts.

    ours: the image tokens, after the model's `n_prefix` prefix tokens. original: the
    reference code's ``[:, 1:]`` whatever the model (for GAP models that drops a patch token),
    and every token, class token included, in perturbed runs (``print_attn_perturb`` and
    ``print_context_perturb`` count the perturbed ranks whole, the unperturbed ones ``[:, 1:]``).
    """
    if check_convention(convention) == "ours":
        return slice(n_prefix, None)
    return slice(0, None) if perturbed else slice(1, None)


def identifiability(rank, n_classes: int):
    """Class identifiability 1 - rank / n_classes of a 0-based class rank (numpy or torch):
    1 when the target class is top-1; a uniformly random rank gives 0.5 + 1 / (2 n_classes)
    on average (Vilas et al. 2023, "Analyzing Vision Transformers for Image Classification in
    Class Embedding Space"; docs/class_identifiability.md). The one definition in the library."""
    return 1.0 - rank / n_classes


def chance_identifiability(n_classes: int) -> float:
    """Mean identifiability of a uniformly random rank, 0.5 + 1 / (2 n_classes): 0.55 for 10
    classes, 0.5005 for 1000 (the mean of 1 - r / C over r = 0..C-1)."""
    if n_classes < 1:
        raise UserError(f"n_classes must be >= 1, got {n_classes}")
    return 0.5 + 0.5 / n_classes


@dataclass
class IdentifyResults:
    sites: list[str]
    n_classes: int
    n_prefix: int
    rank: np.ndarray  # [N, S, L, P] int
    target_logit: np.ndarray  # [N, S, L, P]
    topk: np.ndarray  # [N, S, L, P, k]
    pre_target_logit: np.ndarray  # [N, L, P]
    mid_target_logit: np.ndarray  # [N, L, P]
    images: pd.DataFrame  # one row per image, same order as the arrays
    object_tokens: Optional[np.ndarray] = None  # [N, P] bool

    def site(self, name: str) -> int:
        return self.sites.index(name)

    @property
    def identifiability(self) -> np.ndarray:
        return identifiability(self.rank, self.n_classes)

    @property
    def has_cls(self) -> bool:
        return self.n_prefix > 0


# ------------------------------------------------------------------ per layer
def identifiability_by_layer(rank: np.ndarray, n_classes: int, n_prefix: int, sites: list[str]) -> pd.DataFrame:
    """Mean class identifiability per site and layer, for the class token and image tokens.

    rank: [N, S, L, P]. Returns columns site, layer, token ("cls" / "image"), identifiability.
    """
    ident = identifiability(rank, n_classes)
    rows = []
    for s, site in enumerate(sites):
        for layer in range(rank.shape[2]):
            if n_prefix:
                rows.append((site, layer, "cls", float(ident[:, s, layer, 0].mean())))
            rows.append((site, layer, "image", float(ident[:, s, layer, n_prefix:].mean())))
    return pd.DataFrame(rows, columns=["site", "layer", "token", "identifiability"])


def identifiable_rates(rank_last: np.ndarray, n_prefix: int, convention: Convention = "ours",
                       perturbed: bool = False) -> dict[str, float]:
    """At the last block output: rank_last [N, P].

    identifiable_token_rate: share of image tokens with rank 0, per image, averaged over images.
    images_with_identifiable_token: share of images with at least one such token.
    convention / perturbed: which tokens count (`measured_tokens`).
    """
    top1 = rank_last[:, measured_tokens(n_prefix, convention, perturbed)] == 0
    return {
        "identifiable_token_rate": float(top1.mean(1).mean()),
        "images_with_identifiable_token": float(top1.any(1).mean()),
    }


def per_image_identifiable_rate(rank_last: np.ndarray, n_prefix: int, convention: Convention = "ours",
                                perturbed: bool = False) -> np.ndarray:
    """Share of image tokens with rank 0, per image: [N] (tokens as `measured_tokens`)."""
    return (rank_last[:, measured_tokens(n_prefix, convention, perturbed)] == 0).mean(1)


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(label)).mean())


# ------------------------------------------------------------------ dynamics
def block_change_rate(pre_target: np.ndarray, block_target: np.ndarray, n_prefix: int,
                      convention: Convention = "ours") -> np.ndarray:
    """Share of image tokens whose target logit rises across each block: [L].

    pre_target [N, L, P] is the stream entering block l (the previous block's output; the
    embedding for l = 0); block_target [N, L, P] the block's output.
    convention="original" (``get_ident_change_rate``): tokens ``[:, 1:]`` whatever the model,
    and NaN for block 0, which the code never measured (it stored no embedding projection).
    """
    sl = measured_tokens(n_prefix, convention)
    rates = (block_target[..., sl] > pre_target[..., sl]).mean(axis=(0, 2))
    if convention == "original":
        rates = rates.astype(np.float64)
        rates[:1] = np.nan
    return rates


def sublayer_change_rates(pre: np.ndarray, mid: np.ndarray, post: np.ndarray, n_prefix: int,
                          convention: Convention = "ours", *, attn: Optional[np.ndarray] = None,
                          mlp: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Share of tokens whose target logit rises through each sublayer, per layer.

    ours: attention: resid_mid (after the attention output is added) vs resid_pre;
    MLP: resid_post vs resid_mid. All arrays [N, L, P] of target logits.
    convention="original" (``compute_class_similarity_change``): the sublayer's own output
    projected alone, ``attn`` (site "attn", hook_attn_out) and ``mlp`` (site "mlp",
    hook_mlp_out), each against the block input ``pre``; block 0 is NaN (never measured).
    Class and image tokens reported apart in both.
    """
    if check_convention(convention) == "original":
        if attn is None or mlp is None:
            raise UserError("convention='original' compares the attention and MLP outputs projected alone with "
                             "the block input: pass attn= and mlp= (the target logits of sites 'attn' and 'mlp')")
        attn_new, attn_old, mlp_new, mlp_old = attn, pre, mlp, pre
    else:
        attn_new, attn_old, mlp_new, mlp_old = mid, pre, post, mid
    rows = []
    kinds = [("cls", slice(0, 1))] if n_prefix else []
    kinds.append(("image", slice(n_prefix, None)))
    for layer in range(pre.shape[1]):
        for kind, sl in kinds:
            for name, new, old in (("attn", attn_new, attn_old), ("mlp", mlp_new, mlp_old)):
                rate = float((new[:, layer, sl] > old[:, layer, sl]).mean())
                rows.append((layer, kind, name, np.nan if convention == "original" and layer == 0 else rate))
    return pd.DataFrame(rows, columns=["layer", "token", "sublayer", "rate"])


def residual_composition(top1_block: np.ndarray, top1_attn: np.ndarray, top1_mlp: np.ndarray,
                         n_prefix: int, convention: Convention = "ours") -> pd.DataFrame:
    """Where the block output's top-1 class comes from, per layer.

    Arrays [N, L, P] of top-1 class ids. For each layer: share of tokens whose block-output
    top-1 equals that of the attention output, of the MLP output, of the previous block
    output (from layer 1), or none of them. Shares may overlap (a class can match several).
    ours: image tokens; "none" matches none of the three.
    convention="original" (``compute_residual_match``): every token, class token included;
    "none" checks the attention output twice and the MLP output never; block 0 is NaN.
    """
    sl = slice(0, None) if check_convention(convention) == "original" else slice(n_prefix, None)
    blk, att, mlp = (a[..., sl] for a in (top1_block, top1_attn, top1_mlp))
    rows = []
    for layer in range(blk.shape[1]):
        same_attn = blk[:, layer] == att[:, layer]
        same_mlp = blk[:, layer] == mlp[:, layer]
        same_prev = blk[:, layer] == blk[:, layer - 1] if layer else np.zeros_like(same_attn)
        if convention == "original":
            # the reference code's (topk_b != topk_attn) twice: MLP matches still count as "none"
            none = ~(same_prev | same_attn)
            row = (np.nan,) * 4 if layer == 0 else (same_attn.mean(), same_mlp.mean(), same_prev.mean(), none.mean())
        else:
            none = ~(same_attn | same_mlp | same_prev)
            row = (same_attn.mean(), same_mlp.mean(), same_prev.mean() if layer else np.nan, none.mean())
        rows.append((layer, *row))
    return pd.DataFrame(rows, columns=["layer", "attn", "mlp", "previous", "none"])


# ------------------------------------------------------------------ statistics
def context_vs_object(values: np.ndarray, object_mask: np.ndarray, n_permutations: int = 300,
                      seed: int = 0, convention: Convention = "ours") -> dict[str, float]:
    """Difference of means between object tokens and context (background) tokens.

    values, object_mask: [N, P_image] (image tokens only). Permutation test: the
    object/context labels are shuffled across all tokens `n_permutations` times.
    ours: p = (#{|perm diff| >= |observed|} + 1) / (n_permutations + 1), two-sided, a valid
    p-value (never 0; Phipson and Smyth 2010, "Permutation P-values Should Never Be Zero").
    convention="original" (``compute_context_diff``): p = #{perm diff > observed} /
    n_permutations, one-sided (object > context), 0 possible.
    """
    check_convention(convention)
    v = np.asarray(values, dtype=np.float64).ravel()
    m = np.asarray(object_mask, dtype=bool).ravel()
    if m.all() or not m.any():
        raise UserError("context_vs_object needs both object and context tokens")
    observed = v[m].mean() - v[~m].mean()
    rng = np.random.default_rng(seed)
    perms = np.empty(n_permutations)
    for i in range(n_permutations):
        shuffled = rng.permutation(m)
        perms[i] = v[shuffled].mean() - v[~shuffled].mean()
    if convention == "original":
        p = np.sum(perms > observed) / n_permutations
    else:
        p = (np.sum(np.abs(perms) >= abs(observed)) + 1) / (n_permutations + 1)
    return {"object_mean": float(v[m].mean()), "context_mean": float(v[~m].mean()),
            "difference": float(observed), "p_value": float(p), "n_permutations": n_permutations}


def pretrained_vs_random(pretrained: np.ndarray, random: np.ndarray) -> dict[str, float]:
    """One-sided Wilcoxon signed-rank test that paired per-image values are larger for the
    pretrained model than for the random-weight model."""
    pretrained, random = np.asarray(pretrained, float), np.asarray(random, float)
    if pretrained.shape != random.shape:
        raise UserError(f"paired values needed, got shapes {pretrained.shape} and {random.shape}")
    if np.allclose(pretrained, random):
        return {"statistic": 0.0, "p_value": 1.0, "pretrained_mean": float(pretrained.mean()),
                "random_mean": float(random.mean())}
    res = stats.wilcoxon(pretrained, random, alternative="greater")
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue),
            "pretrained_mean": float(pretrained.mean()), "random_mean": float(random.mean())}


def removal_rates_original(rank_removed: np.ndarray, rank_unperturbed: np.ndarray,
                           n_prefix: int) -> dict[str, float]:
    """The reference code's token-removal rates (``print_context_perturb``), from the ranks of
    one removal's valid images: rank_removed [N, P] (-1 on removed tokens), rank_unperturbed [N, P].

    rate_removed: per image, share of every token the model kept, class token included,
    with rank 0, averaged over images; rate_unperturbed: share of the same patch tokens with
    rank 0 in the unperturbed run, pooled over all images' tokens (class token excluded).
    (Ours, `circuits.token_removal.removal_rates`: kept patch tokens only, per image, both.)
    """
    kept = rank_removed >= 0
    removed = ((rank_removed == 0) & kept).sum(1) / kept.sum(1)
    kept_patches = kept[:, n_prefix:]
    pooled = ((rank_unperturbed[:, n_prefix:] == 0) & kept_patches).sum() / max(int(kept_patches.sum()), 1)
    return {"rate_removed": float(removed.mean()), "rate_unperturbed": float(pooled)}


# ------------------------------------------------------------------ summary
def summarize(res: IdentifyResults, convention: Convention = "ours") -> dict:
    """Every headline metric of one run, as plain data (for the report and JSON).

    convention="original": the reference code's variants (see each metric); it needs the
    sites "attn" and "mlp" (identify's default) for the sublayer change rates.
    """
    check_convention(convention)
    if convention == "original" and not {"attn", "mlp"} <= set(res.sites):
        raise UserError(f"convention='original' needs the sites 'attn' and 'mlp' (the sublayer outputs projected "
                         f"alone); this run has {res.sites}: rerun identify with sites=('block', 'attn', 'mlp')")
    blk = res.site("block")
    last = res.rank[:, blk, -1]
    alone = {"attn": res.target_logit[:, res.site("attn")], "mlp": res.target_logit[:, res.site("mlp")]} \
        if convention == "original" else {}
    summary = {
        "convention": convention,
        "n_images": int(res.rank.shape[0]),
        "accuracy": accuracy(res.images["pred"], res.images["label"]),
        **identifiable_rates(last, res.n_prefix, convention),
        "by_layer": identifiability_by_layer(res.rank, res.n_classes, res.n_prefix, res.sites).to_dict("records"),
        "block_change_rate": block_change_rate(res.pre_target_logit, res.target_logit[:, blk], res.n_prefix,
                                               convention).tolist(),
        "sublayer_change_rates": sublayer_change_rates(
            res.pre_target_logit, res.mid_target_logit, res.target_logit[:, blk], res.n_prefix, convention,
            **alone).to_dict("records"),
    }
    if {"attn", "mlp"} <= set(res.sites):
        top1 = res.topk[..., 0]
        summary["residual_composition"] = residual_composition(
            top1[:, blk], top1[:, res.site("attn")], top1[:, res.site("mlp")], res.n_prefix,
            convention).to_dict("records")
    if res.object_tokens is not None:
        ident_last = identifiability(last[:, res.n_prefix:], res.n_classes)
        obj = res.object_tokens[:, res.n_prefix:]
        if obj.any() and not obj.all():
            summary["context_vs_object"] = context_vs_object(ident_last, obj, convention=convention)
    return summary
