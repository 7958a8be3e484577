"""Hugging Face `transformers` families beyond the plain ViT: BEiT, Data2Vec-vision, DINOv3
and AIMv2, read onto the same HookedViT as their timm counterparts (config flags, never a
second model class), exactly.

- `BeitModel` / `BeitForImageClassification` and `Data2VecVisionModel` /
  `Data2VecVisionForImageClassification` (https://huggingface.co/docs/transformers/model_doc/beit,
  .../data2vec): a class token, an optional absolute position embedding, the relative position
  bias per block (`use_relative_position_bias`, `cfg.rel_pos_bias`, `attn.hook_rel_pos_bias`) or
  shared by all blocks (`use_shared_relative_position_bias`: the shared table is copied into
  every block, so the bias each block adds is the same; both at once: each block's table is the
  sum, as the two biases are summed on the same index), LayerScale (`lambda_1` / `lambda_2`), a
  key projection without bias (zeros in the fused qkv bias). The pooled vector is the mean of
  the patch tokens through the pooler's norm (`use_mean_pooling`: `global_pool="avg"`,
  `final_norm="pooled"`) or the normed class token; a model without a pooler returns the class
  token of `last_hidden_state`.
- `DINOv3ViTModel` (.../dinov3): class and register tokens, no position embedding, RoPE on the
  patch tokens (HF's `DINOv3ViTRopePositionEmbedding`: patch centres in [-1, 1] per axis,
  periods `rope_theta ** (4 i / d_head)`, angles over [y; x] halves, `rotate_half`; this is
  timm's `RotaryEmbeddingDinoV3` with `temperature=rope_theta`, `normalize_coords="separate"`,
  `rotate_half=True`, `cfg.rope_type="dinov3"`; training-only coordinate augmentation is not
  part of the eval function), LayerScale, separate q / k / v biases (a missing one is zero),
  the plain or gated (`use_gated_mlp`, `mlp_type="glu"`) MLP; the output is the normed class
  token (`pooler_output`). With no position table it takes any image size the patch divides
  (`dynamic_img_size=True`), as transformers does.
- `Aimv2VisionModel` (.../aimv2): RMSNorm everywhere (`norm_type="rmsnorm"`) including one on
  the patch embeddings (`embed_norm`), a learned position embedding over the patches (no class
  token), SwiGLU MLPs, and with `use_head` its attention-pooling head (`global_pool="map"` with
  `attn_pool_q_proj=False`: the learned token is the query itself, and `attn_pool_mlp=False`:
  the attention output is the pooled vector). Without the head the output is the mean of the
  normed tokens (`global_pool="avg"`; transformers gives no pooled vector then). The native-
  resolution variant (`is_native`, a sin-cos table built per input size) is refused.

Weights are renamed to timm's layout and mapped by `hooked_vit.loading` like every other loader.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import UnsupportedModelError
from hooked_vit.hf_layers import _ACTS, _layer_weights

FAMILY_CLASSES = {
    "BeitModel": "beit", "BeitForImageClassification": "beit",
    "Data2VecVisionModel": "beit", "Data2VecVisionForImageClassification": "beit",
    "DINOv3ViTModel": "dinov3",
    "Aimv2VisionModel": "aimv2",
}
_BACKBONES = ("beit", "data2vec_vision")


def is_family_class(name: str) -> bool:
    return name in FAMILY_CLASSES


def refuse(feature: str) -> None:
    raise UnsupportedModelError(f"unsupported feature: {feature}")


def family_config_and_state(hf_model: nn.Module, class_metadata) -> tuple[HookedViTConfig, dict[str, Tensor]]:
    """The HookedViTConfig and timm-named weights of a BEiT / Data2Vec-vision / DINOv3 /
    AIMv2 model (`class_metadata(config, n_classes)`: loading_hf's id2label reading)."""
    kind = type(hf_model).__name__
    family = FAMILY_CLASSES[kind]
    c = hf_model.config
    if c.hidden_act not in _ACTS:
        refuse(f"activation {c.hidden_act!r}")
    read = {"beit": _beit, "dinov3": _dinov3, "aimv2": _aimv2}[family]
    options, state = read(hf_model)
    n_classes = options.pop("n_classes", 0)
    cfg = HookedViTConfig(
        d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_classes=n_classes, img_size=_pair(c.image_size),
        patch_size=_pair(c.patch_size), in_chans=c.num_channels, act_fn=_ACTS[c.hidden_act],
        model_name=getattr(c, "_name_or_path", "") or kind, **options, **class_metadata(c, n_classes),
    )
    return cfg, state


def _pair(x: Any) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _detached(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def _zero_missing_biases(state: dict[str, Tensor], prefix: str, names: tuple[str, ...]) -> bool:
    """Where some of q / k / v have a bias and others none, the missing ones are zero (the
    fused qkv has one bias). Returns whether any bias exists."""
    weights = {n: state[f"{prefix}{n}.weight"] for n in names}
    have = [n for n in names if f"{prefix}{n}.bias" in state]
    for n in names:
        if have and n not in have:
            state[f"{prefix}{n}.bias"] = weights[n].new_zeros(weights[n].shape[0])
    return bool(have)


def _rename(state: dict[str, Tensor], pattern: str, repl: str) -> None:
    for key in [k for k in state if re.search(pattern, k)]:
        state[re.sub(pattern, repl, key)] = state.pop(key)


def _finish(state: dict[str, Tensor], out: dict[str, Tensor], cfg_like: dict[str, Any], where: str) -> None:
    """The transformer layers (hooked_vit.hf_layers) into `out`; refuse any weight left over."""
    probe = HookedViTConfig(d_model=1, n_layers=cfg_like["n_layers"], n_heads=1, d_mlp=1, n_classes=0)
    out.update(_layer_weights(state, probe))
    if state:
        raise UnsupportedModelError(f"unsupported feature: weights of {where} HookedViT has no place for: "
                                    f"{sorted(state)[:10]}")


def _head(hf_model: nn.Module, out: dict[str, Tensor]) -> dict[str, Any]:
    head = getattr(hf_model, "classifier", None)
    if head is None or isinstance(head, nn.Identity):
        return {"n_classes": 0}
    if not isinstance(head, nn.Linear):
        refuse(f"classifier {type(head).__name__} (only a Linear)")
    out["head.weight"] = head.weight.detach()
    if head.bias is not None:
        out["head.bias"] = head.bias.detach()
    return {"n_classes": head.out_features, "head_bias": head.bias is not None}


# ------------------------------------------------------------------ BEiT, Data2Vec-vision
def _beit(hf_model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    c = hf_model.config
    backbone = next((getattr(hf_model, n) for n in _BACKBONES if hasattr(hf_model, n)), hf_model)
    state = _detached(backbone)
    out: dict[str, Tensor] = {}
    state.pop("embeddings.mask_token", None)  # masked-image pre-training inputs only
    out["cls_token"] = state.pop("embeddings.cls_token")
    out["patch_embed.proj.weight"] = state.pop("embeddings.patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = state.pop("embeddings.patch_embeddings.projection.bias")
    pos = state.pop("embeddings.position_embeddings", None)
    if pos is not None:
        out["pos_embed"] = pos
    for key in [k for k in state if k.endswith("relative_position_index")]:  # rebuilt from the grid
        state.pop(key)
    shared = [state.pop(k) for k in list(state) if re.fullmatch(r"(encoder\.)?(shared_position_bias|relative_position_bias)"
                                                               r"\.relative_position_bias_table", k)]
    layers = (r"^(?:encoder\.)?layers?\.(\d+)\.")
    own = {int(re.match(layers, k).group(1)): state.pop(k) for k in list(state)
           if re.match(layers, k) and k.endswith("relative_position_bias_table")}
    rel_pos = bool(shared or own)
    for i in range(c.num_hidden_layers):
        if rel_pos:  # the two biases are added on the same index: one table, their sum
            tables = [t for t in (shared[0] if shared else None, own.get(i)) if t is not None]
            out[f"blocks.{i}.attn.rel_pos_table"] = sum(tables[1:], tables[0])
        for n, ls in (("lambda_1", "ls1"), ("lambda_2", "ls2")):
            key = next((k for k in (f"layers.{i}.{n}", f"encoder.layer.{i}.{n}") if k in state), None)
            if key is not None:
                out[f"blocks.{i}.{ls}.gamma"] = state.pop(key)
    for prefix in {re.match(r"^(.*\.)(q_proj|query)\.weight$", k).group(1) for k in state
                   if re.match(r"^(.*\.)(q_proj|query)\.weight$", k)}:
        names = ("q_proj", "k_proj", "v_proj") if f"{prefix}q_proj.weight" in state else ("query", "key", "value")
        _zero_missing_biases(state, prefix, names)
    pooler = getattr(backbone, "pooler", None)
    mean_pooling = pooler is not None and getattr(pooler, "layernorm", None) is not None
    final = None
    if "layernorm.weight" in state:  # use_mean_pooling=False: a norm on every token
        final = "token"
        out["norm.weight"], out["norm.bias"] = state.pop("layernorm.weight"), state.pop("layernorm.bias")
    if mean_pooling:
        final = "pooled"
        out["fc_norm.weight"] = state.pop("pooler.layernorm.weight")
        out["fc_norm.bias"] = state.pop("pooler.layernorm.bias")
    options = dict(
        class_token=True, pos_embed=pos is not None, rel_pos_bias=rel_pos, qkv_bias=True,
        layer_scale=any(k.endswith(".ls1.gamma") for k in out), eps=c.layer_norm_eps, final_norm=final,
        global_pool="avg" if mean_pooling else "token", **_head(hf_model, out),
    )
    _finish(state, out, {"n_layers": c.num_hidden_layers}, type(hf_model).__name__)
    return options, out


# ------------------------------------------------------------------ DINOv3
def _dinov3(hf_model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    c = hf_model.config
    state = _detached(hf_model)
    out: dict[str, Tensor] = {}
    state.pop("embeddings.mask_token", None)
    out["cls_token"] = state.pop("embeddings.cls_token")
    n_reg = int(c.num_register_tokens)
    reg = state.pop("embeddings.register_tokens")
    if n_reg:
        out["reg_token"] = reg
    out["patch_embed.proj.weight"] = state.pop("embeddings.patch_embeddings.weight")
    out["patch_embed.proj.bias"] = state.pop("embeddings.patch_embeddings.bias")
    out["norm.weight"], out["norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    _rename(state, r"^model\.layer\.", "layers.")
    qkv_bias = False
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        qkv_bias = _zero_missing_biases(state, p + "attention.", ("q_proj", "k_proj", "v_proj")) or qkv_bias
        _gated_mlp(state, p + "mlp.", f"blocks.{i}.mlp.", out, gated=bool(c.use_gated_mlp))
    head_dim = c.hidden_size // c.num_attention_heads
    options = dict(
        # No position table: like transformers, any image size whose sides the patch divides
        # (the RoPE grid follows the image).
        dynamic_img_size=True,
        class_token=True, n_reg_tokens=n_reg, pos_embed=False, qkv_bias=qkv_bias, proj_bias=bool(c.proj_bias),
        mlp_bias=bool(c.mlp_bias), mlp_type="glu" if c.use_gated_mlp else "mlp", layer_scale=True,
        eps=c.layer_norm_eps, final_norm="token", global_pool="token",
        rope_type="dinov3", rope_rotate_half=True,
        rope_options=dict(dim=head_dim, temperature=float(c.rope_theta), min_period=None, max_period=None,
                          feat_shape=None, normalize_coords="separate", grid_offset=0.0, grid_indexing="ij",
                          rotate_half=True),
    )
    _finish(state, out, {"n_layers": c.num_hidden_layers}, "DINOv3ViTModel")
    return options, out


def _gated_mlp(state: dict[str, Tensor], p: str, timm: str, out: dict[str, Tensor], gated: bool) -> None:
    """up / down (and gate) projections as fc1 / fc2; a gated fc1 holds [gate; up] rows."""
    for suffix in ("weight", "bias"):
        up, down = state.pop(f"{p}up_proj.{suffix}", None), state.pop(f"{p}down_proj.{suffix}", None)
        gate = state.pop(f"{p}gate_proj.{suffix}", None) if gated else None
        if up is not None:
            out[f"{timm}fc1.{suffix}"] = torch.cat([gate, up]) if gated else up
        if down is not None:
            out[f"{timm}fc2.{suffix}"] = down


# ------------------------------------------------------------------ AIMv2
def _aimv2(hf_model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    c = hf_model.config
    if c.is_native:
        refuse("AIMv2's native-resolution sin-cos position embedding (is_native=True)")
    state = _detached(hf_model)
    out: dict[str, Tensor] = {}
    out["patch_embed.proj.weight"] = state.pop("embeddings.patch_embed.weight")
    out["patch_embed.proj.bias"] = state.pop("embeddings.patch_embed.bias")
    out["embed.norm.weight"] = state.pop("embeddings.rms_norm.weight")
    out["pos_embed"] = state.pop("embeddings.position_embedding.weight")[None]
    state.pop("embeddings.position_ids", None)
    out["norm.weight"] = state.pop("rms_norm.weight")
    options: dict[str, Any] = {"global_pool": "avg"}
    if c.use_head:
        out["attn_pool.latent"] = state.pop("head.cls_token")
        k_w, v_w = state.pop("head.k_proj.weight"), state.pop("head.v_proj.weight")
        out["attn_pool.kv.weight"] = torch.cat([k_w, v_w])
        k_b, v_b = state.pop("head.k_proj.bias", None), state.pop("head.v_proj.bias", None)
        out["attn_pool.kv.bias"] = torch.cat([k_w.new_zeros(k_w.shape[0]) if k_b is None else k_b,
                                              v_w.new_zeros(v_w.shape[0]) if v_b is None else v_b])
        out["attn_pool.proj.weight"] = state.pop("head.output_proj.weight")
        out["attn_pool.proj.bias"] = state.pop("head.output_proj.bias")
        options = dict(global_pool="map", attn_pool_heads=c.num_attention_heads, attn_pool_q_proj=False,
                       attn_pool_mlp=False)
    _rename(state, r"^encoder\.layers\.(\d+)\.rms_norm(\d)\.", r"encoder.layers.\1.norm\2.")
    _rename(state, r"^encoder\.layers\.(\d+)\.attention\.out_proj\.", r"encoder.layers.\1.attention.o_proj.")
    for i in range(c.num_hidden_layers):
        _gated_mlp(state, f"encoder.layers.{i}.ffn.", f"blocks.{i}.mlp.", out, gated=True)
    options.update(class_token=False, pos_embed=True, embed_norm=True, norm_type="rmsnorm", eps=c.rms_norm_eps,
                   qkv_bias=bool(c.qkv_bias), proj_bias=bool(c.qkv_bias), mlp_bias=bool(c.mlp_bias),
                   mlp_type="glu", final_norm="token")
    _finish(state, out, {"n_layers": c.num_hidden_layers}, "Aimv2VisionModel")
    return options, out

