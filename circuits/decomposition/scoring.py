"""Scoring components for a feature, retrieval, and token heatmaps.

A feature is an orthonormal basis B [k, D] of directions in the aligned space (e.g. text
embeddings of "red", "blue", ... orthonormalised; or class-mean differences). For mapped
components m_i = f_i(c_i) of N images:

    s_i = B m_i  [N, k],   z = sum_i s_i,   both centred over the images
    correlation mode: score_i = mean_k corr(s_i[:, k], z[:, k])
    covariance mode:  score_i = mean_k cov(s_i[:, k], z[:, k])   (sum_i score_i = mean_k Var(z_k))

Statistics are population ones (divide by N). `convention="reference"` reproduces
Balasubramanian et al.'s vit-decompose instead: the basis is orthonormalised by QR in the
given order (`orthonormal_basis(..., method="qr")`: the first direction is kept, the next
ones made orthogonal to it; the mean over k of correlations depends on the basis, so those
scores change, while covariance scores, a trace, do not), and the population covariance
is divided by unbiased standard deviations, which scales every correlation by (N-1)/N
(ranks unchanged). A component that is constant over the images
(a bias, the class token's embedding) has score 0. `FeatureScorer` accumulates the needed
sums batch by batch, so a dataset never has to fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuits.decomposition.align import ComponentMaps
from circuits.decomposition.decompose import Decomposition, token_terms
from hooked_vit.tokens import token_grid
from hooked_vit.errors import UserError

ScoreMode = Literal["correlation", "covariance"]
Convention = Literal["ours", "reference"]


def orthonormal_basis(directions: Float[Tensor, "k D"], tol: float = 1e-6, method: str = "svd") -> Float[Tensor, "k2 D"]:
    """An orthonormal basis of the span of the directions: "svd" (near-null directions
    dropped), or "qr" in the given order, as the reference code (Gram-Schmidt up to signs;
    refuses dependent directions)."""
    directions = torch.as_tensor(directions)
    if directions.ndim == 1:
        directions = directions[None]
    if method == "qr":
        q, r = torch.linalg.qr(directions.double().T)
        if (r.diagonal().abs() <= tol * r.diagonal().abs().max()).any():
            raise UserError("the directions are linearly dependent; QR in order needs independent ones (use 'svd')")
        return q.T.to(directions.dtype)
    if method != "svd":
        raise UserError(f"method must be 'svd' or 'qr', got {method!r}")
    _, s, vh = torch.linalg.svd(directions.double(), full_matrices=False)
    keep = s > tol * s.max()
    return vh[keep].to(directions.dtype)


def project(mapped: Float[Tensor, "n C D"], basis: Float[Tensor, "k D"]) -> Float[Tensor, "n C k"]:
    """s_i = B f_i(c_i) for every image and component."""
    return mapped @ basis.T


class FeatureScorer:
    """Streaming component scores for one feature: `update` with batches of s [n, C, k]."""

    def __init__(self) -> None:
        self.n = 0
        self._sums: Optional[dict[str, Tensor]] = None

    def update(self, s: Float[Tensor, "n C k"]) -> "FeatureScorer":
        s = s.double()
        z = s.sum(1)  # [n, k]
        sums = {"s": s.sum(0), "z": z.sum(0), "sz": torch.einsum("nck,nk->ck", s, z),
                "ss": s.pow(2).sum(0), "zz": z.pow(2).sum(0)}
        if self._sums is None:
            self._sums = sums
        else:
            for key, value in sums.items():
                self._sums[key] += value
        self.n += s.shape[0]
        return self

    def scores(self, mode: ScoreMode = "correlation", convention: Convention = "ours") -> Float[Tensor, "C"]:
        """convention="reference": population covariance over unbiased standard deviations
        (vit-decompose), i.e. correlations times (N-1)/N."""
        if self._sums is None or self.n < 2:
            raise UserError("scores need at least two images")
        if convention not in ("ours", "reference"):
            raise UserError(f"convention must be 'ours' or 'reference', got {convention!r}")
        n, t = self.n, self._sums
        mean_s, mean_z = t["s"] / n, t["z"] / n  # [C, k], [k]
        cov = t["sz"] / n - mean_s * mean_z  # [C, k]
        if mode == "covariance":
            return cov.mean(-1)
        if mode != "correlation":
            raise UserError(f"mode must be 'correlation' or 'covariance', got {mode!r}")
        var_s = (t["ss"] / n - mean_s**2).clamp(min=0)
        var_z = (t["zz"] / n - mean_z**2).clamp(min=0)
        # Components without variance (relative to the total's) score 0 rather than 0/0.
        valid = (var_s > 1e-12 * var_z) & (var_z > 0)
        corr = torch.where(valid, cov / (var_s * var_z).sqrt().clamp(min=1e-300), 0.0)
        if convention == "reference":  # variances with N - 1 in the denominator
            corr = corr * (n - 1) / n
        return corr.mean(-1)

    def variance_of_total(self) -> Tensor:
        """mean_k Var(z_k): what covariance scores add up to."""
        t, n = self._sums, self.n
        return (t["zz"] / n - (t["z"] / n) ** 2).mean()


def component_scores(mapped: Float[Tensor, "n C D"], basis: Float[Tensor, "k D"],
                     mode: ScoreMode = "correlation", convention: Convention = "ours") -> Float[Tensor, "C"]:
    """Scores of every component for the feature spanned by `basis` (see module docstring;
    `basis` must be orthonormal: `orthonormal_basis(directions, method="qr")` for the reference)."""
    return FeatureScorer().update(project(mapped, basis)).scores(mode, convention)


def top_components(scores: Tensor, k: int, exclude: Sequence[int] = ()) -> list[int]:
    """Indices of the k highest-scoring components (excluding some, e.g. biases)."""
    skip = {int(i) for i in exclude}
    return [int(i) for i in torch.argsort(scores, descending=True) if int(i) not in skip][:k]


# ----------------------------------------------------------------------------- retrieval
def feature_retrieval(mapped: Float[Tensor, "n C D"], components: Sequence[int], probe: Float[Tensor, "D"]
                      ) -> tuple[Tensor, Tensor]:
    """Rank images by a feature: the sum of the feature's top components, dotted with a
    probe embedding (e.g. the text embedding of "red"). Returns (order, similarity [n])."""
    part = mapped[:, list(components)].sum(1)
    sim = part @ probe.to(part.dtype)
    return torch.argsort(sim, descending=True), sim


@dataclass
class TextFeatures:
    """Per text prompt: every component's score for the text's direction, and the top ones."""

    texts: list[str]
    directions: Float[Tensor, "T D"]  # unit text embeddings
    scores: Float[Tensor, "T C"]
    components: list[list[int]]  # per text, the k highest-scoring components


def text_components(mapped: Float[Tensor, "n C D"], texts: Sequence[str], directions: Float[Tensor, "T D"], k: int = 5,
                    *, mode: ScoreMode = "correlation", exclude: Sequence[int] = ()) -> TextFeatures:
    """Score the components for each text's direction (a one-direction feature, Balasubramanian
    et al. 2024, sec. 4) and keep the top k (biases in `exclude`). `directions` come from
    `circuits.decomposition.align.clip_text_directions`."""
    if directions.ndim != 2 or directions.shape != (len(texts), mapped.shape[-1]):
        raise UserError(f"need one direction of width {mapped.shape[-1]} per text ({len(texts)}), "
                         f"got {tuple(directions.shape)}")
    directions = F.normalize(directions.to(mapped.dtype), dim=-1)
    scores = torch.stack([component_scores(mapped, d[None], mode) for d in directions])
    return TextFeatures(list(texts), directions, scores, [top_components(s, k, exclude) for s in scores])


def text_retrieval(mapped: Float[Tensor, "n C D"], features: TextFeatures) -> tuple[Tensor, Tensor]:
    """Rank images by each text prompt through its own top components (`feature_retrieval`
    with the text's direction as probe). Returns (order [T, n], similarity [T, n])."""
    ranked = [feature_retrieval(mapped, comps, d) for comps, d in zip(features.components, features.directions)]
    return torch.stack([o for o, _ in ranked]), torch.stack([s for _, s in ranked])


def image_retrieval(mapped: Float[Tensor, "n C D"], components: Sequence[int], reference: Float[Tensor, "C D"]
                    ) -> tuple[Tensor, Tensor]:
    """Rank images by similarity to a reference image, seen only through the chosen
    components: cosine of the sums of those components. Returns (order, cosine [n])."""
    idx = list(components)
    part = mapped[:, idx].sum(1)
    ref = reference[idx].sum(0)
    sim = F.cosine_similarity(part, ref[None], dim=-1)
    return torch.argsort(sim, descending=True), sim


# ----------------------------------------------------------------------------- heatmaps
@torch.no_grad()
def token_heatmaps(
    model,
    images: Tensor,
    dec: Decomposition,
    direction: Float[Tensor, "D"] | Float[Tensor, "b D"],
    *,
    maps: Optional[ComponentMaps] = None,
    layers: Optional[Sequence[int]] = None,
    heads_per_chunk: Optional[int] = None,
    fwd_hooks: Sequence = (),
) -> Float[Tensor, "b L H k"]:
    """Head x source-token terms projected on a feature direction: [b, layers, heads, tokens].

    heat[b, l, h, k] = <f_{l,h}(token term of head h of layer l through token k), direction>.
    With `maps=None` the direction lives in the representation space (flattened [r * d]);
    a [b, D] direction gives every image its own (e.g. its class direction).
    Token terms are reduced chunk by chunk, so memory stays bounded. Sum over k (and heads)
    to get the head (layer) projections.
    """
    layers = list(range(dec.start_layer, model.cfg.n_layers)) if layers is None else list(layers)
    position = {(c.layer, c.head): i for i, c in enumerate(dec.components) if c.kind == "head"}
    heat = None
    for chunk in token_terms(model, images, dec, layers=layers, heads_per_chunk=heads_per_chunk, fwd_hooks=fwd_hooks):
        terms = chunk.terms.permute(0, 2, 3, 1, 4).flatten(3)  # [b, h, k, r*d]
        for j, head in enumerate(chunk.heads):
            comp = position.get((chunk.layer, head))
            if comp is None:
                raise UserError("token heatmaps need the head components (biases='separate' or 'split')")
            pulled = (direction if maps is None else maps.pullback(comp, direction)).to(terms.dtype)
            if pulled.ndim == 1:
                value = terms[:, j] @ pulled  # [b, k]
            else:
                value = torch.einsum("bkD,bD->bk", terms[:, j], pulled)
            if heat is None:
                heat = value.new_zeros(value.shape[0], len(layers), model.cfg.n_heads, value.shape[1])
            heat[:, layers.index(chunk.layer), head] = value
    return heat


def patch_grid(heat: Float[Tensor, "... k"], model) -> Float[Tensor, "... gh gw"]:
    """Drop prefix tokens and lay the patch tokens on the image grid; a video model's on its
    space-time volume [..., T, gh, gw] (time positions, `hooked_vit.tokens`)."""
    patches = heat[..., model.cfg.n_prefix_tokens:]
    n = patches.shape[-1]
    if model.cfg.is_video:
        cfg = model.cfg
        if n != cfg.n_patches:
            raise UserError(f"the map has {n} patch tokens, the video model's {cfg.n_time}x{cfg.grid_size[0]}x"
                             f"{cfg.grid_size[1]} differ")
        return patches.reshape(*patches.shape[:-1], cfg.n_time, *cfg.grid_size)
    grid = model.cfg.grid_size if n == model.cfg.n_patches else None  # dynamic image size: a square grid
    return patches.reshape(*patches.shape[:-1], *token_grid(n, grid))
