"""The metrics of Vilas et al. 2023, "Analyzing Vision Transformers for Image Classification in Class Embedding Space"
(docs/class_identifiability.md), as plain functions over projection results.

Arrays follow the layout written by `circuits.runs.identify` (N images, S sites, L layers,
P tokens, k top classes). "Image tokens" are the positions after the prefix tokens; the
class token is position 0. Where the original code differs from the intended definition,
the docstring says so (see also docs/class_identifiability.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats



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
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
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


def identifiable_rates(rank_last: np.ndarray, n_prefix: int) -> dict[str, float]:
    """At the last block output: rank_last [N, P].

    identifiable_token_rate: share of image tokens with rank 0, per image, averaged over images.
    images_with_identifiable_token: share of images with at least one such token.
    """
    top1 = rank_last[:, n_prefix:] == 0
    return {
        "identifiable_token_rate": float(top1.mean(1).mean()),
        "images_with_identifiable_token": float(top1.any(1).mean()),
    }


def per_image_identifiable_rate(rank_last: np.ndarray, n_prefix: int) -> np.ndarray:
    """Share of image tokens with rank 0, per image: [N]."""
    return (rank_last[:, n_prefix:] == 0).mean(1)


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(label)).mean())


# ------------------------------------------------------------------ dynamics
def block_change_rate(pre_target: np.ndarray, block_target: np.ndarray, n_prefix: int) -> np.ndarray:
    """Share of image tokens whose target logit rises across each block: [L].

    pre_target [N, L, P] is the stream entering block l (the previous block's output; the
    embedding for l = 0); block_target [N, L, P] the block's output.
    """
    rises = block_target[..., n_prefix:] > pre_target[..., n_prefix:]
    return rises.mean(axis=(0, 2))


def sublayer_change_rates(pre: np.ndarray, mid: np.ndarray, post: np.ndarray, n_prefix: int) -> pd.DataFrame:
    """Share of tokens whose target logit rises through each sublayer, per layer.

    attention: resid_mid (after the attention output is added) vs resid_pre;
    MLP: resid_post vs resid_mid. (The original code compared the MLP with the block
    input instead of the stream after attention.) Class and image tokens reported apart.
    All arrays [N, L, P].
    """
    rows = []
    kinds = [("cls", slice(0, 1))] if n_prefix else []
    kinds.append(("image", slice(n_prefix, None)))
    for layer in range(pre.shape[1]):
        for kind, sl in kinds:
            rows.append((layer, kind, "attn", float((mid[:, layer, sl] > pre[:, layer, sl]).mean())))
            rows.append((layer, kind, "mlp", float((post[:, layer, sl] > mid[:, layer, sl]).mean())))
    return pd.DataFrame(rows, columns=["layer", "token", "sublayer", "rate"])


def residual_composition(top1_block: np.ndarray, top1_attn: np.ndarray, top1_mlp: np.ndarray,
                         n_prefix: int) -> pd.DataFrame:
    """Where the block output's top-1 class comes from, per layer (image tokens).

    Arrays [N, L, P] of top-1 class ids. For each layer: share of tokens whose block-output
    top-1 equals that of the attention output, of the MLP output, of the previous block
    output (from layer 1), or none of them. Shares may overlap (a class can match several);
    the original code checked the attention output twice.
    """
    blk, att, mlp = (a[..., n_prefix:] for a in (top1_block, top1_attn, top1_mlp))
    rows = []
    for layer in range(blk.shape[1]):
        same_attn = blk[:, layer] == att[:, layer]
        same_mlp = blk[:, layer] == mlp[:, layer]
        same_prev = blk[:, layer] == blk[:, layer - 1] if layer else np.zeros_like(same_attn)
        none = ~(same_attn | same_mlp | same_prev)
        rows.append((layer, same_attn.mean(), same_mlp.mean(), same_prev.mean() if layer else np.nan, none.mean()))
    return pd.DataFrame(rows, columns=["layer", "attn", "mlp", "previous", "none"])


# ------------------------------------------------------------------ statistics
def context_vs_object(values: np.ndarray, object_mask: np.ndarray, n_permutations: int = 300,
                      seed: int = 0) -> dict[str, float]:
    """Difference of means between object tokens and context (background) tokens.

    values, object_mask: [N, P_image] (image tokens only). Permutation test: the
    object/context labels are shuffled across all tokens `n_permutations` times;
    p = (#{|perm diff| >= |observed|} + 1) / (n_permutations + 1), two-sided.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    m = np.asarray(object_mask, dtype=bool).ravel()
    if m.all() or not m.any():
        raise ValueError("context_vs_object needs both object and context tokens")
    observed = v[m].mean() - v[~m].mean()
    rng = np.random.default_rng(seed)
    perms = np.empty(n_permutations)
    for i in range(n_permutations):
        shuffled = rng.permutation(m)
        perms[i] = v[shuffled].mean() - v[~shuffled].mean()
    p = (np.sum(np.abs(perms) >= abs(observed)) + 1) / (n_permutations + 1)
    return {"object_mean": float(v[m].mean()), "context_mean": float(v[~m].mean()),
            "difference": float(observed), "p_value": float(p), "n_permutations": n_permutations}


def pretrained_vs_random(pretrained: np.ndarray, random: np.ndarray) -> dict[str, float]:
    """One-sided Wilcoxon signed-rank test that paired per-image values are larger for the
    pretrained model than for the random-weight model."""
    pretrained, random = np.asarray(pretrained, float), np.asarray(random, float)
    if pretrained.shape != random.shape:
        raise ValueError(f"paired values needed, got shapes {pretrained.shape} and {random.shape}")
    if np.allclose(pretrained, random):
        return {"statistic": 0.0, "p_value": 1.0, "pretrained_mean": float(pretrained.mean()),
                "random_mean": float(random.mean())}
    res = stats.wilcoxon(pretrained, random, alternative="greater")
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue),
            "pretrained_mean": float(pretrained.mean()), "random_mean": float(random.mean())}


# ------------------------------------------------------------------ summary
def summarize(res: IdentifyResults) -> dict:
    """Every headline metric of one run, as plain data (for the report and JSON)."""
    blk = res.site("block")
    last = res.rank[:, blk, -1]
    summary = {
        "n_images": int(res.rank.shape[0]),
        "accuracy": accuracy(res.images["pred"], res.images["label"]),
        **identifiable_rates(last, res.n_prefix),
        "by_layer": identifiability_by_layer(res.rank, res.n_classes, res.n_prefix, res.sites).to_dict("records"),
        "block_change_rate": block_change_rate(res.pre_target_logit, res.target_logit[:, blk], res.n_prefix).tolist(),
        "sublayer_change_rates": sublayer_change_rates(
            res.pre_target_logit, res.mid_target_logit, res.target_logit[:, blk], res.n_prefix).to_dict("records"),
    }
    if {"attn", "mlp"} <= set(res.sites):
        top1 = res.topk[..., 0]
        summary["residual_composition"] = residual_composition(
            top1[:, blk], top1[:, res.site("attn")], top1[:, res.site("mlp")], res.n_prefix).to_dict("records")
    if res.object_tokens is not None:
        ident_last = 1.0 - last[:, res.n_prefix:] / res.n_classes
        obj = res.object_tokens[:, res.n_prefix:]
        if obj.any() and not obj.all():
            summary["context_vs_object"] = context_vs_object(ident_last, obj)
    return summary
