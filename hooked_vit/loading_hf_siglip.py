"""Loading transformers' SigLIP and SigLIP 2 vision towers into HookedViT, exactly.

SigLIP (Zhai et al. 2023, arXiv:2303.15343; https://huggingface.co/docs/transformers/model_doc/siglip):
a ViT without a class token, learned positions over the patches, pre-norm blocks, a final
norm on every token (`post_layernorm`) and an attention-pooling head (`global_pool="map"`,
hooked_vit.attention_pool: `head.probe` is the latent, nn.MultiheadAttention's in_proj splits
into q and kv). SigLIP 2 (Tschannen et al. 2025, arXiv:2502.14786; .../model_doc/siglip2) is
the same tower with a Linear patch embedding over flattened patches (channel fastest) and
NaFlex inputs (`pixel_values` patches, `pixel_attention_mask`, `spatial_shapes`): its square
position table is resampled to each image's grid (bilinear, antialias, align_corners=False:
the config's pos_embed_* fields), so HookedViT takes them as NaFlex inputs
(`hooked_vit.naflex.from_spatial_shapes`) and plain images of any patch-divisible size.

`...ForImageClassification` reads the mean of the final-normed patch tokens (of the valid ones
for SigLIP 2; `global_pool="avg"`); its vision tower's attention-pooling head is not used
(its weights are dropped). `...VisionModel`'s output is the pooled vector (the MAP head).
The full `SiglipModel` / `Siglip2Model` loads as its image tower (`siglip_vision_tower`); its
text tower gives text classes through `hooked_vit.text_classes` (`get_text_features`) as for
CLIP: the head `scale * E` on the pooled image embedding. SigLIP's own logits are
`logit_scale.exp() * cos(image, text) + logit_bias`; the per-image normalisation (not linear)
and the bias (the same for every class) are left out, which changes neither the ranking of
the classes nor softmax differences between them (per image, up to the positive norm).
"""

from __future__ import annotations

import math
from typing import Any

import einops
from torch import Tensor, nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import UnsupportedModelError
from hooked_vit.hf_layers import _ACTS, _layer_weights

SIGLIP_CLASSES = ("SiglipVisionModel", "SiglipForImageClassification", "Siglip2VisionModel",
                  "Siglip2ForImageClassification")
FULL_MODELS = ("SiglipModel", "Siglip2Model")  # loaded as their image tower (siglip_vision_tower)


def is_siglip(name: str) -> bool:
    return name.startswith("Siglip")


def check_siglip_class(name: str) -> None:
    if name not in SIGLIP_CLASSES and name not in FULL_MODELS:
        raise UnsupportedModelError(f"{name} is not a supported SigLIP class; supported: {list(SIGLIP_CLASSES)}")


def siglip_vision_tower(full: nn.Module) -> nn.Module:
    """The image tower of a full SiglipModel / Siglip2Model as a Siglip(2)VisionModel (same weights)."""
    import transformers

    kind = type(full).__name__
    tower_cls = getattr(transformers, kind.replace("Model", "VisionModel"))
    vision = _tower(full)
    tower = tower_cls(full.config.vision_config)
    _tower(tower).load_state_dict(vision.state_dict())
    first = next(full.parameters())
    return tower.to(device=first.device, dtype=first.dtype).eval()


def _tower(hf_model: nn.Module) -> nn.Module:
    """The module holding embeddings, encoder, post_layernorm and head (transformers 4.x nests
    a SiglipVisionTransformer under `vision_model`, 5.x flattens it into the VisionModel)."""
    tower = hf_model
    while not hasattr(tower, "embeddings") and hasattr(tower, "vision_model"):
        tower = tower.vision_model
    return tower


def siglip_config(hf_model: nn.Module) -> HookedViTConfig:
    kind = type(hf_model).__name__
    check_siglip_class(kind)
    c = hf_model.config if kind.endswith("VisionModel") else hf_model.config.vision_config
    v2 = kind.startswith("Siglip2")
    classify = kind.endswith("ForImageClassification")
    tower = _tower(hf_model)
    if not classify and not hasattr(tower, "head"):
        raise UnsupportedModelError(f"unsupported feature: {kind} with vision_use_head=False has no pooled output "
                                    "(load it with its attention-pooling head, or as ...ForImageClassification)")
    if c.hidden_act not in _ACTS:
        raise UnsupportedModelError(f"unsupported feature: activation {c.hidden_act!r}")
    n_classes = hf_model.classifier.out_features if classify and isinstance(hf_model.classifier, nn.Linear) else 0
    common: dict[str, Any] = {}
    if v2:
        g = math.isqrt(c.num_patches)
        if g * g != c.num_patches:
            raise UnsupportedModelError(f"unsupported feature: SigLIP 2 with num_patches={c.num_patches} (not a square grid)")
        common = dict(img_size=g * c.patch_size, naflex=True, patch_layout="hwc", no_embed_class=True,
                      dynamic_img_size=True, pos_embed_grid=(g, g), pos_embed_interp="bilinear",
                      pos_embed_antialias=True, pos_embed_align_corners=False)
    else:
        common = dict(img_size=c.image_size)
    act = _ACTS[c.hidden_act]
    return HookedViTConfig(
        d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_classes=n_classes, patch_size=c.patch_size, in_chans=c.num_channels, class_token=False,
        act_fn=act, eps=c.layer_norm_eps, final_norm="token",
        global_pool="avg" if classify else "map", attn_pool_heads=c.num_attention_heads,
        attn_pool_d_mlp=c.intermediate_size, attn_pool_act=act,
        model_name=getattr(hf_model.config, "_name_or_path", "") or kind,
        **common,
    )  # class names: hooked_vit.loading_hf adds them (hf_class_metadata)


def siglip_state(hf_model: nn.Module, cfg: HookedViTConfig) -> dict[str, Tensor]:
    """The weights under timm VisionTransformer names (attention pool under HookedViT's), refusing leftovers."""
    tower = _tower(hf_model)
    state = {k: v.detach() for k, v in tower.state_dict().items()}
    out: dict[str, Tensor] = {}
    w = state.pop("embeddings.patch_embedding.weight")
    if w.ndim == 2:  # SigLIP 2: a Linear over (ph, pw, c) patches -> the Conv2d layout
        w = einops.rearrange(w, "d (ph pw c) -> d c ph pw", ph=cfg.patch_size[0], pw=cfg.patch_size[1])
    out["patch_embed.proj.weight"] = w
    out["patch_embed.proj.bias"] = state.pop("embeddings.patch_embedding.bias")
    out["pos_embed"] = state.pop("embeddings.position_embedding.weight")[None]
    state.pop("embeddings.position_ids", None)
    out.update(_layer_weights(state, cfg))
    for p in ("weight", "bias"):
        out[f"norm.{p}"] = state.pop(f"post_layernorm.{p}")
    head = {k.removeprefix("head."): state.pop(k) for k in [k for k in state if k.startswith("head.")]}
    if cfg.global_pool == "map":
        d = cfg.d_model
        out["attn_pool.latent"] = head.pop("probe")
        w_in, b_in = head.pop("attention.in_proj_weight"), head.pop("attention.in_proj_bias")
        out.update({"attn_pool.q.weight": w_in[:d], "attn_pool.q.bias": b_in[:d],
                    "attn_pool.kv.weight": w_in[d:], "attn_pool.kv.bias": b_in[d:]})
        for old, new in (("attention.out_proj.", "attn_pool.proj."), ("layernorm.", "attn_pool.ln."),
                         ("mlp.fc1.", "attn_pool.mlp.fc1."), ("mlp.fc2.", "attn_pool.mlp.fc2.")):
            for p in ("weight", "bias"):
                out[new + p] = head.pop(old + p)
        state.update({"head." + k: v for k, v in head.items()})
    # ...ForImageClassification: the tower's MAP head exists but its classifier reads the mean token.
    classifier = getattr(hf_model, "classifier", None)
    if isinstance(classifier, nn.Linear):
        out["head.weight"] = classifier.weight.detach()
        out["head.bias"] = classifier.bias.detach()
    if state:
        raise UnsupportedModelError(f"unsupported feature: weights HookedViT has no place for: {sorted(state)[:10]}")
    return out
