"""How explanation maps are judged (Chefer, Gur & Wolf 2021, "Transformer Interpretability
Beyond Attention Visualization"; docs/explanations.md): segmentation test, perturbation tests
(Chefer et al.'s positive / negative AUC and Vilas et al.'s keep-the-most-important AUC),
the random-order baseline (`explain("random", ...)`), and the model-parameter
randomisation sanity check (Adebayo et al. 2018).

Conventions:
- Segmentation: the token map is upsampled to pixels (bilinear) and min-max normalised;
  foreground = pixels above the map's mean. Per image we keep counts (correct pixels,
  intersection and union per class) so that dataset-level scores sum counts over images,
  as Chefer et al.'s evaluation does; AP is per image, averaged (mAP).
- AP follows Chefer et al.: the scores of both classes in one ranking, the map R for
  foreground pixels and 1 - R for background pixels, against the one-hot mask.
- Perturbation: at each fraction f of patches, round(f * n_patches) patches are removed
  in relevance order (ties broken at random, seeded), either dropped from the sequence
  (`mode="remove"`, via keep_mask: prefix tokens always kept) or set to zero in the
  model's input space (`mode="zero"`, which after normalisation is the dataset's mean
  colour). Positive = most relevant first (lower AUC better), negative = least relevant
  first (higher better).
- AUC (`auc`): trapezoid area under top-1 accuracy vs fraction removed, divided by the
  fraction range, so it is a mean accuracy in [0, 1]. Chefer et al.'s tables report the
  raw area in percent over 0..0.9: theirs = ours * 0.9 * 100.
- Keep-the-n-most-important (`keep_auc`, Vilas et al.): AUC = sum(acc) / (max(acc) * steps).
  Keeping the n most important of the tokens for n = 100%, 90%, ..., 10% is the negative
  curve read backwards (and keeping the least important the positive one), so the variant
  reads the same curves with its own normalisation.
"""

from __future__ import annotations

import copy
from typing import Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from jaxtyping import Bool, Float
from scipy.stats import rankdata
from torch import Tensor

from hooked_vit import HookedViT
from hooked_vit.errors import UserError

FRACTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))  # 0, 0.1, ..., 0.9
Order = Literal["positive", "negative"]
Mode = Literal["remove", "zero"]


# --------------------------------------------------------------------------- segmentation
def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision of a ranking (as scikit-learn's: precision at each distinct
    threshold, weighted by the recall gained there). nan without positives."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order].double()
    tp = torch.cumsum(y, 0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last index of each run of tied scores
    tp = tp[last]
    precision = tp / torch.arange(1, len(s) + 1, device=s.device, dtype=torch.double)[last]
    recall_gain = torch.diff(tp, prepend=tp.new_zeros(1)) / n_pos
    return float((precision * recall_gain).sum())


def segmentation_counts(
    maps: Float[Tensor, "b H W"], masks: Bool[Tensor, "b H W"]
) -> dict[str, np.ndarray]:
    """Per-image counts of the segmentation test. `maps`: pixel maps in [0, 1] (`upsample`).

    Returns correct, labeled, inter_bg, inter_fg, union_bg, union_fg (pixels) and ap.
    """
    maps, masks = maps.float(), masks.to(maps.device).bool()
    pred = maps > maps.flatten(1).mean(1)[:, None, None]  # threshold at the map's mean
    out = {"correct": (pred == masks).flatten(1).sum(1), "labeled": torch.full_like(masks.flatten(1)[:, 0],
                                                                                   masks[0].numel(), dtype=torch.long)}
    for name, p, m in (("bg", ~pred, ~masks), ("fg", pred, masks)):
        out[f"inter_{name}"] = (p & m).flatten(1).sum(1)
        out[f"union_{name}"] = (p | m).flatten(1).sum(1)
    counts = {k: v.cpu().numpy().astype(np.int64) for k, v in out.items()}
    counts["ap"] = np.array([average_precision(torch.cat([1 - mp.flatten(), mp.flatten()]),
                                               torch.cat([~mk.flatten(), mk.flatten()]))
                             for mp, mk in zip(maps, masks)])
    return counts


def segmentation_scores(counts: dict[str, np.ndarray]) -> dict[str, float]:
    """Dataset-level scores from per-image counts (arrays, or pandas columns):
    pixel_accuracy = sum correct / sum labeled; miou = mean over {bg, fg} of
    sum intersection / sum union; map = mean of the per-image APs."""
    total = {k: float(np.sum(np.asarray(v))) for k, v in counts.items() if k != "ap"}
    iou = [total[f"inter_{c}"] / max(total[f"union_{c}"], 1.0) for c in ("bg", "fg")]
    return {"pixel_accuracy": total["correct"] / max(total["labeled"], 1.0), "miou": float(np.mean(iou)),
            "map": float(np.nanmean(np.asarray(counts["ap"], dtype=float)))}


# --------------------------------------------------------------------------- perturbation
def relevance_order(relevance: Float[Tensor, "b n"], order: Order = "positive", seed: int = 0) -> Tensor:
    """Token indices [b, n] in removal order; ties broken by a seeded random permutation
    (a constant map gives a random order, not the raster order)."""
    if order not in ("positive", "negative"):
        raise UserError(f"order must be positive or negative, got {order!r}")
    n = relevance.shape[1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).to(relevance.device)
    idx = torch.argsort(relevance[:, perm], dim=1, descending=order == "positive", stable=True)
    return perm[idx]


def perturbation_curve(
    model: HookedViT,
    images: Float[Tensor, "b c h w"],
    labels: Tensor,
    relevance: Float[Tensor, "b n_patches"],
    *,
    order: Order = "positive",
    fractions: Sequence[float] = FRACTIONS,
    mode: Mode = "remove",
    seed: int = 0,
    unperturbed: Optional[Tensor] = None,
) -> Bool[Tensor, "b steps"]:
    """Whether each image is still classified as `labels` after removing each fraction of
    its patches in relevance order (see the module doc).

    `unperturbed`: the images' top-1 correctness without perturbation [b], if known; steps
    that remove no patch reuse it instead of running the model again.
    """
    cfg = model.cfg
    if relevance.ndim == 4:  # a video model's volume [b, T, rows, cols]: tokens in (time, row, col) order
        relevance = relevance.flatten(1)
    if cfg.is_video and mode != "remove":
        raise UserError(f"mode={mode!r} blanks pixels of one image grid; on video models use mode='remove'")
    images = images.to(model.device)
    labels = torch.as_tensor(labels, device=model.device)
    ranked = relevance_order(relevance.to(model.device), order, seed)
    b, n = ranked.shape
    grid = (images.shape[-2] // cfg.patch_size[0], images.shape[-1] // cfg.patch_size[1])
    correct = []
    with torch.no_grad():
        for f in fractions:
            k = int(round(f * n))
            if k == 0 and unperturbed is not None:
                correct.append(torch.as_tensor(unperturbed, device=model.device).bool())
                continue
            removed = torch.zeros(b, n, dtype=torch.bool, device=model.device)
            removed.scatter_(1, ranked[:, :k], True)
            logits = _perturbed_logits(model, images, removed, mode, grid)
            correct.append(logits.argmax(-1) == labels)
    return torch.stack(correct, 1).cpu()


def _perturbed_logits(model: HookedViT, images: Tensor, removed: Tensor, mode: Mode, grid) -> Tensor:
    if mode == "remove":
        prefix = removed.new_ones(removed.shape[0], model.cfg.n_prefix_tokens)
        return model(images, keep_mask=torch.cat([prefix, ~removed], 1))
    if mode == "zero":
        ph, pw = model.cfg.patch_size
        pix = removed.reshape(-1, 1, *grid).repeat_interleave(ph, 2).repeat_interleave(pw, 3)
        pix = torch.nn.functional.pad(pix, (0, images.shape[-1] - pix.shape[-1], 0, images.shape[-2] - pix.shape[-2]))
        return model(images.masked_fill(pix, 0.0))
    raise UserError(f"mode must be remove or zero, got {mode!r}")


def auc(accuracy: Sequence[float], fractions: Sequence[float] = FRACTIONS) -> float:
    """Area under accuracy vs fraction removed (trapezoid), divided by the fraction range."""
    acc, x = np.asarray(accuracy, dtype=float), np.asarray(fractions, dtype=float)
    area = float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(x)))
    return area / float(x[-1] - x[0])


def keep_auc(accuracy: Sequence[float]) -> float:
    """Vilas et al.'s AUC of the keep-the-n-most-important test: sum(acc) / (max(acc) * steps)."""
    acc = np.asarray(accuracy, dtype=float)
    return float(acc.sum() / (acc.max() * len(acc))) if acc.max() > 0 else 0.0


# --------------------------------------------------------------------------- sanity check
def _reinit_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Fresh random values at each parameter's own scale: normal(mean(p), std(p)).

    Keeps activations in range (a LayerNorm weight stays near its mean), while every
    learned pattern in the weights is gone.
    """
    with torch.no_grad():
        for p in module.parameters(recurse=True):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
            std = p.float().std() if p.numel() > 1 else p.new_tensor(0.0)
            p.copy_(p.float().mean() + noise * std)


def cascading_randomization(
    model: HookedViT, *, include_head: bool = True, seed: int = 0
) -> Iterator[tuple[str, HookedViT]]:
    """Yield (stage, model) with the top of the network re-initialised progressively:
    the head (CLIP: and image projection; and final norm) first, then blocks L-1, L-2, ..., 0, cumulatively. The
    same copy is modified in place between stages (the original is untouched)."""
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(int(seed))
    if include_head:
        for mod in (m.head, m.head_dist, m.image_proj, m.ln_final):
            if mod is not None:
                _reinit_(mod, gen)
        yield "head", m
    for l in reversed(range(m.cfg.n_layers)):
        _reinit_(m.blocks[l], gen)
        yield f"block {l}", m


def spearman(a: Float[Tensor, "b n"], b: Float[Tensor, "b n"]) -> np.ndarray:
    """Rank correlation per row (average ranks for ties; nan for a constant row); video
    volumes [b, T, rows, cols] are compared over all their tokens."""
    ra = rankdata(a.detach().flatten(1).float().cpu().numpy(), axis=1)
    rb = rankdata(b.detach().flatten(1).float().cpu().numpy(), axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(1) / denom, np.nan)


def randomization_check(
    model: HookedViT,
    images: Float[Tensor, "b c h w"],
    targets: Tensor,
    methods: Sequence[str] = ("attention", "rollout", "gae", "gradcam", "class_embedding", "tokentm"),
    *,
    include_head: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Model-parameter randomisation test: rank correlation of each method's maps on the
    cascadingly re-initialised model with its maps on the original (same targets).

    Returns rows {step, stage, method, spearman (mean over images), spearman_std}; step 0
    is the original model (correlation 1). A faithful method's correlation must drop.
    """
    from circuits.explain.methods import explain_many

    original = explain_many(model, images, targets, list(methods))
    rows = [{"step": 0, "stage": "original", "method": m, "spearman": 1.0, "spearman_std": 0.0} for m in methods]
    cascade = cascading_randomization(model, include_head=include_head, seed=seed)
    for step, (stage, randomized) in enumerate(tqdm(cascade, desc="randomisation check", unit="stage",
                                                    disable=not progress), 1):
        maps = explain_many(randomized, images, targets, list(methods))
        for m in methods:
            rho = spearman(original[m], maps[m])
            rho = rho[np.isfinite(rho)]  # constant maps have no rank correlation
            rows.append({"step": step, "stage": stage, "method": m,
                         "spearman": float(rho.mean()) if len(rho) else float("nan"),
                         "spearman_std": float(rho.std()) if len(rho) else float("nan")})
    return rows
