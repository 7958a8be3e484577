"""Spurious-feature removal by mean-ablating components (Balasubramanian et al. 2024, sec. 6).

1. Feature directions without CLIP, in the model's own representation space (identity
   alignment) or any aligned space: the core feature (the class) is spanned by the class
   means minus their average; the spurious feature (e.g. the background) by the attribute
   means minus theirs. Means are balanced: each class mean averages its per-attribute cell
   means (and vice versa), so a correlation between class and attribute in the reference
   set does not leak one feature into the other.
2. Score every component for both features (`circuits.decomposition.scoring`), rank the
   candidates by spurious score minus core score.
3. Mean-ablate the top k: replace c_i by its mean over the reference set. The
   decomposition is exact, so the edited representation is total - c_i + mean(c_i) and
   the logits follow from the linear head.
4. Choose k on the reference set (best worst-group accuracy, ties broken by average-group
   accuracy, then the smaller k), report worst-group and
   average-group accuracy on the evaluation set before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.decomposition.align import ComponentMaps
from circuits.decomposition.decompose import Component, DecomposedSet, readout_logits
from circuits.decomposition.scoring import FeatureScorer, ScoreMode, orthonormal_basis, project


def balanced_means(x: Float[Tensor, "N D"], key: Tensor, balance: Optional[Tensor] = None
                   ) -> tuple[Tensor, Float[Tensor, "K D"]]:
    """(key values, mean of x per key value); with `balance`, the average of the per-cell
    means over the balance values present for that key."""
    values = torch.unique(key)
    means = []
    for v in values:
        sel = key == v
        if balance is None:
            means.append(x[sel].mean(0))
        else:
            cells = [x[sel & (balance == b)].mean(0) for b in torch.unique(balance[sel])]
            means.append(torch.stack(cells).mean(0))
    return values, torch.stack(means)


def feature_basis(x: Float[Tensor, "N D"], key: Tensor, balance: Optional[Tensor] = None) -> Float[Tensor, "k D"]:
    """Orthonormal basis of the (balanced) mean differences of x between the values of key."""
    _, means = balanced_means(x.double(), key, balance)
    return orthonormal_basis(means - means.mean(0)).to(x.dtype)


def group_accuracy(preds: Tensor, labels: Tensor, groups: Tensor) -> dict:
    """Accuracy, per-group accuracy, their average and the worst group (Sagawa et al. 2020,
    "Distributionally Robust Neural Networks"; docs/decomposition.md). The one definition:
    embedded training reports it too."""
    correct = (preds == labels).float()
    per_group = {int(g): correct[groups == g].mean().item() for g in torch.unique(groups)}
    return {"accuracy": correct.mean().item(), "avg_group": sum(per_group.values()) / len(per_group),
            "worst_group": min(per_group.values()), "per_group": per_group}


def mean_ablate(terms: Float[Tensor, "N C r d"], components: Sequence[int], means: Float[Tensor, "C r d"]
                ) -> Float[Tensor, "N r d"]:
    """The representation with the chosen components replaced by their means."""
    idx = list(components)
    total = terms.sum(1)
    if not idx:
        return total
    return total - terms[:, idx].sum(1) + means[idx].sum(0)


def logits_of(model, rep: Float[Tensor, "N r d"]) -> Tensor:
    """Head applied to edited representations (bias included)."""
    out = readout_logits(model, rep)
    return out + model.b_U if model.has_unembed else out


@dataclass
class SpuriousRemoval:
    """What was fitted on the reference set; `curve` evaluates any decomposed set."""

    components: list[Component]
    core_scores: Tensor
    spurious_scores: Tensor
    order: list[int]  # candidate components, by spurious minus core score, descending
    means: Float[Tensor, "C r d"]  # reference means, for mean ablation
    core_basis: Tensor
    spurious_basis: Tensor
    mode: str = "correlation"
    reference_curve: list[dict] = field(default_factory=list)
    k: int = 0  # chosen number of ablated components

    @property
    def ablated(self) -> list[Component]:
        return [self.components[i] for i in self.order[: self.k]]

    @torch.no_grad()
    def curve(self, model, data: DecomposedSet, max_k: Optional[int] = None, group_key: str = "group",
              label_key: str = "label") -> list[dict]:
        """Group accuracies after ablating the top k components, k = 0 .. max_k."""
        max_k = len(self.order) if max_k is None else min(max_k, len(self.order))
        labels, groups = data.meta[label_key], data.meta[group_key]
        device = model.embed.proj.weight.device if model.has_unembed else self.means.device
        terms, means = data.terms.to(device), self.means.to(device)
        rep = terms.sum(1)
        rows = []
        for k in range(max_k + 1):
            if k:
                i = self.order[k - 1]
                rep = rep - terms[:, i] + means[i]
            preds = logits_of(model, rep).argmax(-1).cpu()
            acc = group_accuracy(preds, labels, groups)
            rows.append({"k": k, "ablated": self.components[self.order[k - 1]].name if k else "",
                         **{key: acc[key] for key in ("accuracy", "avg_group", "worst_group")}})
        return rows

    def summary(self, top: int = 10) -> list[dict]:
        """Top candidates with both scores."""
        return [{"rank": j, "component": self.components[i].name, "spurious": float(self.spurious_scores[i]),
                 "core": float(self.core_scores[i]),
                 "spurious - core": float(self.spurious_scores[i] - self.core_scores[i])}
                for j, i in enumerate(self.order[:top])]


@torch.no_grad()
def fit_removal(
    model,
    reference: DecomposedSet,
    *,
    core_key: str = "label",
    spurious_key: str = "background",
    group_key: str = "group",
    label_key: str = "label",
    maps: Optional[ComponentMaps] = None,
    mode: ScoreMode = "correlation",
    max_k: int = 10,
    include_biases: bool = False,
) -> SpuriousRemoval:
    """Fit spurious-feature removal on a reference set with class and attribute labels.

    `core_key` / `spurious_key` name the metadata that define the two features (the class
    and e.g. the background); accuracies compare predictions with `label_key` per
    `group_key` cell. Directions and scores live in the space of `maps` (identity: the
    representation space);
    ablation always acts on the exact decomposition. k is the number of ablated components
    (0..max_k) with the best reference worst-group accuracy; ties go to the better
    average-group accuracy, then to the smaller k.
    """
    core, spur = reference.meta[core_key], reference.meta[spurious_key]
    flat = reference.flat()
    mapped = flat if maps is None else maps(flat)
    total = mapped.sum(1)
    core_basis = feature_basis(total, core, balance=spur)
    spurious_basis = feature_basis(total, spur, balance=core)
    core_scores = FeatureScorer().update(project(mapped, core_basis)).scores(mode).float()
    spurious_scores = FeatureScorer().update(project(mapped, spurious_basis)).scores(mode).float()
    candidates = [i for i, c in enumerate(reference.components) if include_biases or not c.is_bias]
    diff = spurious_scores - core_scores
    order = sorted(candidates, key=lambda i: -float(diff[i]))
    removal = SpuriousRemoval(reference.components, core_scores, spurious_scores, order,
                              reference.terms.mean(0), core_basis, spurious_basis, mode)
    removal.reference_curve = removal.curve(model, reference, max_k, group_key, label_key)
    best = max(removal.reference_curve, key=lambda row: (row["worst_group"], row["avg_group"], -row["k"]))
    removal.k = best["k"]
    return removal
