"""Zero-shot segmentation from token decompositions (Balasubramanian, Basu & Feizi,
NeurIPS 2024, Sec. 5: "the top components of a feature, split by source token, localise
it"): the map of image token k is

    map[b, k] = sum over the chosen head components i of < f_i(token term of i through k), feature >

i.e. what token k contributes to the feature through those heads. The output is a
relevance per image token [b, n_patches] in the model's patch order, the form of the
explanation maps of `circuits.explain`, so `upsample` and `segmentation_counts` /
`segmentation_scores` (circuits.explain.evaluate) judge it beside the explanation methods.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.decomposition.align import ComponentMaps
from circuits.decomposition.decompose import Decomposition
from circuits.decomposition.scoring import token_heatmaps
from hooked_vit.errors import UserError


def class_direction(model, classes: Tensor) -> Float[Tensor, "b D"]:
    """The feature "class c" in the representation space: the unembedding row of each
    image's class, laid out as the flattened [r * d] terms (distilled models: each head
    on its own token, halved, as timm averages them; token_avg models: the head's row over
    [class, mean patch]; CLIP: through the image projection, `W_U`)."""
    model.require_head()
    if model.cfg.distilled:
        return torch.cat([model.head.weight[classes], model.head_dist.weight[classes]], -1) / 2
    if model.cfg.global_pool == "token_avg":
        return model.head.weight[classes]  # [b, 2d]
    return model.tokens_to_residual_directions(classes)  # [b, d]


@torch.no_grad()
def decomposition_segmentation(
    model,
    images: Float[Tensor, "b c h w"],
    dec: Decomposition,
    direction: Float[Tensor, "D"] | Float[Tensor, "b D"],
    components: Sequence[int],
    *,
    maps: Optional[ComponentMaps] = None,
    fwd_hooks: Sequence = (),
) -> Float[Tensor, "b n_patches"]:
    """Token map of a feature from its top head components (see the module doc).

    `components`: indices into `dec.components`, e.g. `top_components(scores, k,
    exclude=non-head indices)`; each must be a head (only heads split by source token).
    `direction`: the feature in the aligned space ([D], or [b, D] per image, e.g.
    `class_direction`); `maps=None` means the representation space.
    """
    chosen = [dec.components[int(i)] for i in components]
    if not chosen:
        raise UserError("components is empty: pass the indices of the feature's top head components")
    if any(c.kind != "head" for c in chosen):
        bad = [c.name for c in chosen if c.kind != "head"]
        raise UserError(f"only head components split by source token, got {bad}; exclude the others "
                         "(top_components(..., exclude=[i for i, c in enumerate(dec.components) if c.kind != 'head']))")
    layers = sorted({c.layer for c in chosen})
    heat = token_heatmaps(model, images, dec, direction, maps=maps, layers=layers, fwd_hooks=fwd_hooks)
    total = sum(heat[:, layers.index(c.layer), c.head] for c in chosen)  # [b, tokens]
    return total[:, model.cfg.n_prefix_tokens:].float()
