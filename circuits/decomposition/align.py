"""Alignment: one linear map per component into a shared target space (e.g. CLIP's).

Balasubramanian et al. 2024 map each component c_i with its own linear f_i(c) = W_i c so
that the mapped components add up to the target embedding of the image:

    loss = 1 - cos( sum_i W_i c_i / ||sum_i W_i c_i||, target )
           + ortho_weight * mean_i mean( (W_i^T W_i - I)^2 )

The orthogonality penalty keeps every map close to an isometry, so a component's size and
angles mean the same before and after mapping (W_i W_i^T - I when the target space is
smaller than the component space). `constraint="orthogonal"` is the reference code's
hard version: every W_i is kept exactly orthonormal during training (PyTorch's
`parametrizations.orthogonal`), so the penalty is zero and only the cosine is fitted. The targets come from the user: CLIP image
embeddings (`load_open_clip`, needs the optional `open_clip` package), or any other
embedding; nothing here needs a CLIP model. `identity_maps` is the "no alignment" choice:
the model's own representation space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm
from hooked_vit.errors import UserError


class ComponentMaps(nn.Module):
    """Linear maps f_g(c) = W_g c, one per group of components (default: one per component).

    weight: [G, d_out, d_in]; groups[i] is the map used by component i.
    """

    def __init__(self, n_components: int, d_in: int, d_out: int, groups: Optional[Sequence[int]] = None,
                 init: str = "orthogonal", seed: int = 0):
        super().__init__()
        groups = list(range(n_components)) if groups is None else list(groups)
        if len(groups) != n_components:
            raise UserError(f"groups has {len(groups)} entries for {n_components} components")
        self.register_buffer("groups", torch.as_tensor(groups, dtype=torch.long))
        n_maps = int(self.groups.max()) + 1
        self.weight = nn.Parameter(_init_weight(n_maps, d_in, d_out, init, seed))

    @property
    def d_in(self) -> int:
        return self.weight.shape[2]

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]

    def forward(self, terms: Float[Tensor, "n C d_in"]) -> Float[Tensor, "n C d_out"]:
        """Map every component with its own map."""
        return torch.einsum("nci,coi->nco", terms, self.weight[self.groups])

    def map_one(self, component: int, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """Map vectors of one component (e.g. its token terms)."""
        return x @ self.weight[self.groups[component]].T

    def pullback(self, component: int, direction: Float[Tensor, "... d_out"]) -> Float[Tensor, "... d_in"]:
        """W_i^T direction: <f_i(c), direction> = <c, pullback>, to project without mapping."""
        return direction @ self.weight[self.groups[component]]


def _init_weight(n_maps: int, d_in: int, d_out: int, init: str, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    if init == "identity":
        return torch.eye(d_out, d_in).expand(n_maps, -1, -1).clone()
    if init == "orthogonal":  # random isometries: start where the penalty is zero
        q = torch.linalg.qr(torch.randn(n_maps, max(d_in, d_out), max(d_in, d_out), generator=gen)).Q
        return q[:, :d_out, :d_in].contiguous()
    raise UserError(f"init must be 'identity' or 'orthogonal', got {init!r}")


def identity_maps(n_components: int, d: int) -> ComponentMaps:
    """No alignment: every component stays in the model's own representation space."""
    return ComponentMaps(n_components, d, d, groups=[0] * n_components, init="identity").requires_grad_(False)


def image_projection_maps(model, n_components: int) -> ComponentMaps:
    """Exact alignment of a CLIP tower's components with its text space: every component
    goes through the model's own image projection (`model.image_proj`, hook_image_embed),
    so the mapped components sum to the image embedding up to the projection's bias (a
    constant, present only after fold_ln). Nothing is fitted."""
    proj = getattr(model, "image_proj", None)
    if proj is None:
        raise UserError(
            f"{model.cfg.model_name} has no image projection into a text space (cfg.d_image_embed is None); "
            "load a CLIP tower (open_clip, CLIPVisionModelWithProjection, CLIPModel) or fit maps with fit_alignment"
        )
    maps = ComponentMaps(n_components, proj.in_features, proj.out_features, groups=[0] * n_components, init="identity")
    with torch.no_grad():
        maps.weight.copy_(proj.weight.detach()[None])
    return maps.to(proj.weight.device, proj.weight.dtype).requires_grad_(False)


def orthogonality_penalty(weight: Float[Tensor, "G d_out d_in"]) -> Tensor:
    """mean over maps of mean((W^T W - I)^2) (W W^T when the map narrows)."""
    w = weight if weight.shape[1] >= weight.shape[2] else weight.transpose(1, 2)
    gram = w.transpose(1, 2) @ w
    eye = torch.eye(gram.shape[-1], device=w.device, dtype=w.dtype)
    return (gram - eye).pow(2).mean()


def alignment_loss(maps: ComponentMaps, terms: Tensor, targets: Tensor, ortho_weight: float
                   ) -> tuple[Tensor, Tensor]:
    """(total loss, mean cosine) of a batch of components [n, C, d_in] and targets [n, d_out]."""
    total = F.normalize(maps(terms).sum(1), dim=-1)
    cos = F.cosine_similarity(total, targets, dim=-1).mean()
    return 1 - cos + ortho_weight * orthogonality_penalty(maps.weight), cos


@dataclass
class AlignmentResult:
    maps: ComponentMaps
    history: list[dict] = field(default_factory=list)  # per logged step: loss, cosine, penalty

    @property
    def cosine(self) -> float:
        return self.history[-1]["cosine"]


def fit_alignment(
    terms: Float[Tensor, "n C d_in"],
    targets: Float[Tensor, "n d_out"],
    *,
    groups: Optional[Sequence[int]] = None,
    ortho_weight: float = 1.0,
    steps: int = 500,
    lr: float = 1e-2,
    batch_size: int = 256,
    init: str = "orthogonal",
    seed: int = 0,
    progress: bool = True,
    constraint: str = "penalty",
) -> AlignmentResult:
    """Train the component maps (Adam) on precomputed components and target embeddings.

    Args:
        terms: components of n images (`Decomposition.flat()` rows, stacked).
        targets: target embeddings of the same images (e.g. CLIP image embeddings).
        groups: share one map among several components (e.g. one per layer) to save memory.
        ortho_weight: the weight d of the orthogonality penalty.
        constraint: "penalty" (the soft penalty above) or "orthogonal" (maps exactly
            orthonormal throughout, the reference's aligner; the penalty is then 0).
    """
    n, n_comp, d_in = terms.shape
    if constraint not in ("penalty", "orthogonal"):
        raise UserError(f"constraint must be 'penalty' or 'orthogonal', got {constraint!r}")
    maps = ComponentMaps(n_comp, d_in, targets.shape[-1], groups, init, seed).to(terms.device, terms.dtype)
    if constraint == "orthogonal":
        torch.nn.utils.parametrizations.orthogonal(maps, "weight")
    opt = torch.optim.Adam(maps.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(steps), desc="align", disable=not progress)
    for step in bar:
        idx = torch.randperm(n, generator=gen)[:batch_size].to(terms.device)
        loss, cos = alignment_loss(maps, terms[idx], targets[idx], ortho_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                rec = {"step": step, "loss": loss.item(), "cosine": cos.item(),
                       "penalty": orthogonality_penalty(maps.weight).item()}
            history.append(rec)
            bar.set_postfix(cos=f"{rec['cosine']:.4f}")
    if constraint == "orthogonal":  # back to a plain weight holding the orthonormal maps
        torch.nn.utils.parametrize.remove_parametrizations(maps, "weight", leave_parametrized=True)
    return AlignmentResult(maps.requires_grad_(False), history)


# ----------------------------------------------------------------------------- CLIP targets
def load_open_clip(name: str = "ViT-B-32", pretrained: str = "openai", device: str = "cpu"):
    """(model, preprocess, tokenizer) from the optional `open_clip` package.

    The weights must be available to open_clip (its cache or a local file): nothing is
    downloaded by this library.
    """
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "CLIP targets need the optional package open_clip (pip install open_clip_torch); "
            "alignment itself works with any target embeddings you pass to fit_alignment"
        ) from err
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_image_targets(clip_model, images: Tensor) -> Tensor:
    """Unit CLIP image embeddings of images preprocessed for that CLIP model."""
    return F.normalize(clip_model.encode_image(images).float(), dim=-1)


@torch.no_grad()
def clip_text_directions(clip_model, tokenizer, texts: Sequence[str]) -> Tensor:
    """Unit CLIP text embeddings [len(texts), d]: feature directions to orthonormalise.

    open_clip or transformers CLIP models (see `hooked_vit.text_classes.encode_texts`)."""
    from hooked_vit.text_classes import encode_texts

    return F.normalize(encode_texts(clip_model, texts, tokenizer).float(), dim=-1)
