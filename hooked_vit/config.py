"""`HookedViTConfig`: every architectural choice of a HookedViT, as plain data.

Behaviour in the model is chosen by these flags, never by model-name strings. The
TransformerLens field names (`n_layers`, `d_model`, `n_heads`, `d_head`, `d_mlp`,
`normalization_type`, `attn_only`, `d_vocab`) are kept so that `ActivationCache` and
`transformer_lens.patching` can read them unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional, Union

import torch
from hooked_vit.errors import UserError

ACT_FNS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "sigmoid")
ROPE_TYPES = ("cat", "mixed", "dinov3", "3d")


@dataclass
class HookedViTConfig:
    # --- sizes -------------------------------------------------------------------------
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    n_classes: int
    img_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    in_chans: int = 3
    d_head: Optional[int] = None  # defaults to d_model // n_heads

    # --- tokens and embeddings -----------------------------------------------------------
    class_token: bool = True
    n_reg_tokens: int = 0
    distilled: bool = False  # DeiT distillation token + second head, averaged at eval
    pos_embed: bool = True
    no_embed_class: bool = False  # position embedding covers patch tokens only
    dynamic_img_size: bool = False  # position embedding resampled to the input grid
    patch_embed_bias: bool = True
    ln_pre: bool = False  # CLIP's norm_pre after the embedding
    embed_norm: bool = False  # a norm on the patch embeddings (timm's embed_norm_layer, AIMv2)
    # A hybrid CNN stem (timm's HybridEmbed: R50+ViT, R26+ViT, ...): a CNN backbone (the timm
    # module itself, not re-implemented) maps the image to a feature map with d_backbone
    # channels (embed.hook_backbone_out), then embed.proj (kernel = stride =
    # backbone_patch_size feature cells) makes the tokens. patch_size is then the pixels per
    # token (the backbone's stride times backbone_patch_size). None: a plain patch embedding.
    d_backbone: Optional[int] = None
    backbone_patch_size: tuple[int, int] = (1, 1)
    # Rotary position embedding on q and k of the patch tokens (EVA02, DINOv3, PE, RoPE-ViT):
    # one of ROPE_TYPES, built by hooked_vit.rope from `rope_options` (timm's constructor
    # arguments; "3d" is V-JEPA 2's rotation over (time, row, col), built by hooked_vit.rope
    # itself, without options); None: no RoPE. Can be combined with the learned pos_embed ("rope_ape").
    rope_type: Optional[str] = None
    rope_options: dict[str, Any] = field(default_factory=dict)
    rope_rotate_half: bool = False  # rotate halves of each head, not interleaved pairs
    # BEiT's relative position bias: a learned table [n_rel, n_heads] per block, indexed by
    # each (query, key) pair's 2-D offset (class-token pairs have their own entries), added
    # to the attention scores (attn.hook_rel_pos_bias).
    rel_pos_bias: bool = False
    # Where that bias comes from: "table" (BEiT; timm's RelPosBias: one learned entry per
    # offset, with a class token three more for the class-token pairs) or "log_mlp" (timm's
    # RelPosMlp, Swin-V2's log-spaced coordinates in timm's "cr" mode: an MLP 2 -> rel_pos_mlp_dim
    # -> n_heads with ReLU on sign(d) * log(1 + |d|) of each (row, col) offset d; pairs with
    # a prefix token get 0).
    rel_pos_type: Literal["table", "log_mlp"] = "table"
    rel_pos_mlp_dim: Optional[int] = None
    # Position embedding kind (with pos_embed=True): "learned" (one table over the sequence),
    # "sincos" (VideoMAE's fixed 1D sin-cos table over the patch tokens, a buffer) or
    # "space_time" (TimeSformer's learned spatial table over [prefix, one frame's patches]
    # plus a learned table over time, added to the patch tokens).
    # "factorized" (NaFlexVit's): learned row and column tables [gh, d] and [gw, d] summed at
    # each patch (pos_embed_y[row] + pos_embed_x[col]), patch tokens only.
    pos_embed_type: Literal["learned", "sincos", "space_time", "factorized"] = "learned"
    # The learned (or factorized) table's patch grid when it is not img_size // patch_size
    # (NaFlexVit keeps a 16x16 table for every input size; needs no_embed_class); None: grid_size.
    pos_embed_grid: Optional[tuple[int, int]] = None
    # How a learned table is resampled to another patch grid (timm's NaFlexEmbeds options; the
    # defaults are timm's resample_abs_pos_embed): F.interpolate mode, antialias, align_corners,
    # and "aspect-ratio preserving" (resample to a square of the longer side, keep the top-left).
    pos_embed_interp: Literal["bicubic", "bilinear"] = "bicubic"
    pos_embed_antialias: bool = True
    pos_embed_align_corners: bool = False
    pos_embed_ar_preserving: bool = False
    # NaFlex inputs (hooked_vit.naflex: patches, patch coordinates, valid mask; any resolution
    # and aspect ratio in one padded batch) are accepted, besides images; adds
    # embed.hook_patch_mask. timm's NaFlexVit and transformers' SigLIP 2 set it.
    naflex: bool = False
    # Layout of one flattened patch in NaFlex patch inputs ([b, n, patch_dim], hooked_vit.naflex):
    # "hwc" (timm NaFlexVit and transformers' SigLIP 2: channel fastest) or "chw"; the patch
    # embedding itself is always the Conv2d `embed.proj`, read as a Linear over that layout.
    patch_layout: Literal["chw", "hwc"] = "hwc"

    # --- video: the token layout in time (docs/video.md) --------------------------------
    # num_frames=None: an image model, inputs [b, c, h, w]. Otherwise inputs are clips
    # [b, frames, c, h, w]; a Conv3d embeds tubelets of tubelet_size frames, and the patch
    # tokens are in (time, row, col) order, time slowest.
    num_frames: Optional[int] = None
    tubelet_size: int = 1
    # "joint": every token attends to every token. "divided_space_time" (TimeSformer): each
    # block runs a temporal attention (attn_time, each patch over its own position in every
    # frame) and then a spatial attention (attn, within a frame; prefix tokens take part in
    # every frame and receive the mean over frames) before the MLP.
    attention_type: Literal["joint", "divided_space_time"] = "joint"

    # --- blocks ----------------------------------------------------------------------------
    block_type: Literal["pre_norm", "post_norm"] = "pre_norm"
    # Attention and MLP read the same resid_pre and are added together (TransformerLens's
    # field; timm's ParallelScalingBlock, ViT-22B): resid_post = resid_pre + attn_out + mlp_out,
    # no hook_resid_mid; ln2 holds a copy of the block's one norm (as TransformerLens loads GPT-J).
    parallel_attn_mlp: bool = False
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    layer_scale: bool = False  # LayerScale gammas (ls1/ls2) on both sublayers
    attn_only_layer_scale: bool = False  # with layer_scale: a gamma on the attention sublayer only
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"  # every norm of the model
    # "mlp": fc1 -> act -> fc2. "glu": fc1 holds [gate; linear] (2 * d_mlp rows) and the hidden
    # activation is act(gate) * linear (SwiGLU with act_fn="silu"; timm's GluMlp / SwiGLU).
    mlp_type: Literal["mlp", "glu"] = "mlp"
    mlp_norm: bool = False  # a norm over d_mlp before fc2 (timm's scale_mlp_norm / EVA02 sub-LN)
    qk_norm: bool = False  # a norm over d_head on each head's q and k
    attn_norm: bool = False  # a norm over n_heads * d_head on z before proj (scale_attn_norm)
    # Differential attention (Ye et al. 2024, "Differential Transformer", arXiv:2410.05258; timm's
    # DiffAttention / DiffParallelScalingBlock): each head's q and k are split into two half-heads
    # of d_head // 2 (hook_q / hook_k [b, p, 2 * n_heads, d_head // 2]), giving two softmax maps;
    # the head attends with map1 - lambda * map2 to its values of width d_head, then a per-head
    # RMSNorm (attn.sub_norm, eps 1e-5) and a factor (1 - lambda_init), with per-layer
    # lambda_init = 0.8 - 0.6 * exp(-0.3 * layer). lambda = exp(lambda_q1 . lambda_k1)
    # - exp(lambda_q2 . lambda_k2) + lambda_init (the paper's vectors of d_head // 2), or with
    # diff_dual_lambda exp(lambda_a) - exp(lambda_b) (two scalars).
    diff_attn: bool = False
    diff_dual_lambda: bool = False
    act_fn: str = "gelu"
    eps: float = 1e-6

    # --- head --------------------------------------------------------------------------------
    # "token_avg": [class token, mean of the patch tokens] concatenated, [b, 2 * d_model]
    # (transformers' Dinov2ForImageClassification; registers are not averaged).
    # "map": attention pooling (a learned latent query attends over the tokens, then an MLP;
    # SigLIP, PE), hooked_vit.attention_pool, with attn_pool_heads heads and attn_pool_d_mlp.
    global_pool: Literal["token", "avg", "max", "avgmax", "token_avg", "map"] = "token"
    attn_pool_heads: Optional[int] = None  # defaults to n_heads
    attn_pool_d_mlp: Optional[int] = None  # defaults to d_mlp
    attn_pool_act: str = "gelu"  # the attention pool's MLP activation
    # V-JEPA 2's attentive probe (VJEPA2AttentivePooler) as options of the same head:
    # attn_pool_layers pre-norm self-attention blocks over the pooled tokens before the latent
    # query reads them (`attn_pool.blocks.N`, TransformerBlocks with attn_pool_heads heads and
    # attn_pool_d_mlp); attn_pool_kv_norm a norm on the tokens before k and v (`attn_pool.ln_kv`);
    # attn_pool_residual adds the latent to the attention output (a pre-norm cross-attention
    # block); attn_pool_proj=False: no output projection (z is the attention output).
    attn_pool_layers: int = 0
    attn_pool_kv_norm: bool = False
    attn_pool_residual: bool = False
    attn_pool_proj: bool = True
    # AIMv2's pooling head (transformers' Aimv2AttentionPoolingHead): the latent is the query
    # itself (no q projection) and the attention output is the pooled vector (no norm + MLP).
    attn_pool_q_proj: bool = True
    attn_pool_mlp: bool = True
    pool_include_prefix: bool = False
    # "token": the final norm acts on every token before pooling (timm's `norm`);
    # "pooled": it acts on the pooled vector (timm's `fc_norm`, the GAP models); None: none.
    final_norm: Optional[Literal["token", "pooled"]] = "token"
    head_bias: bool = True
    final_norm_eps: Optional[float] = None  # the final norm's own eps (VideoMAE's fc_norm); None: eps
    # CLIP's image projection (a bias-free Linear d_model -> d_image_embed on the pooled
    # vector, hook_image_embed); None: no projection.
    d_image_embed: Optional[int] = None
    image_proj_bias: bool = False  # a bias on that projection (open_clip's timm towers' head Linear, EVA02 CLIP)
    # With a projection: True when a classifier head (e.g. text class embeddings) reads the
    # image embedding; False when the logits are the image embedding (n_classes == d_image_embed).
    head_on_image_embed: bool = False

    # --- run-time switches -------------------------------------------------------------------
    use_attn_result: bool = False  # compute attn.hook_result (per-head outputs)
    use_fused_attn: bool = True  # SDPA whenever no hook needs scores or pattern
    use_split_qkv_input: bool = False  # per-head q/k/v inputs: blocks.{l}.hook_{q,k,v}_input
    use_attn_in: bool = False  # one per-head input for q, k, v: blocks.{l}.hook_attn_in
    use_hook_mlp_in: bool = False  # blocks.{l}.hook_mlp_in, the MLP's input
    normalization_type: Literal["LN", "LNPre"] = "LN"  # "LNPre" once LayerNorm is folded
    attn_only: bool = False
    n_key_value_heads: Optional[int] = None  # TransformerLens field; ViTs have no grouped-query attention
    device: Optional[str] = None  # kept up to date by HookedViT.to()/cuda()/cpu() (TransformerLens reads it)
    dtype: torch.dtype = torch.float32  # the parameters' dtype, kept up to date likewise (TransformerLens's field)

    # --- provenance ----------------------------------------------------------------------------
    model_name: str = "custom"
    data_config: dict[str, Any] = field(default_factory=dict)  # timm's preprocessing config
    # What each output index means (None if unknown): machine ids (ImageNet WordNet ids such as
    # "n01443537") and human descriptions ("goldfish, Carassius auratus"), one per class.
    label_names: Optional[tuple[str, ...]] = None
    class_names: Optional[tuple[str, ...]] = None
    # The VLM read-out of this tower (hooked_vit.vlm.vision_features): LLaVA's
    # vision_feature_layer (an index into [embeddings, block 0, ..., block L-1] outputs, or a
    # list of them, concatenated) and vision_feature_select_strategy ("default" drops token 0,
    # "full" keeps all); None: not loaded from a VLM (vision_features defaults to -2, "default").
    vision_feature_layer: Optional[Union[int, list[int]]] = None
    vision_feature_select_strategy: Optional[str] = None

    def __post_init__(self) -> None:
        self.img_size = _pair(self.img_size)
        self.dtype = _dtype(self.dtype)
        self.patch_size = _pair(self.patch_size)
        self.backbone_patch_size = _pair(self.backbone_patch_size)
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise UserError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.d_head = self.d_model // self.n_heads
        if self.act_fn not in ACT_FNS or self.attn_pool_act not in ACT_FNS:
            raise UserError(f"act_fn={self.act_fn!r} / attn_pool_act={self.attn_pool_act!r}: choose from {ACT_FNS}")
        if self.rope_type is not None and self.rope_type not in ROPE_TYPES:
            raise UserError(f"rope_type={self.rope_type!r} is not supported; choose one of {ROPE_TYPES} or None")
        if self.rope_type == "3d" and self.rope_options:
            raise UserError("rope_type='3d' takes no rope_options (its table follows from d_head and the token grid)")
        if self.attn_pool_layers < 0:
            raise UserError(f"attn_pool_layers={self.attn_pool_layers} must be >= 0")
        probe = self.attn_pool_layers or self.attn_pool_kv_norm or self.attn_pool_residual or not self.attn_pool_proj
        if probe and self.global_pool != "map":
            raise UserError("attn_pool_layers / attn_pool_kv_norm / attn_pool_residual / attn_pool_proj=False are "
                             f"options of the attention-pooling head: set global_pool='map' (got {self.global_pool!r})")
        if self.rel_pos_bias:
            self._check_rel_pos()
        if self.parallel_attn_mlp and (self.block_type != "pre_norm" or self.attention_type != "joint"):
            raise UserError("parallel_attn_mlp needs pre-norm blocks with joint attention")
        self._check_diff_attn()
        if self.d_backbone is not None and (self.is_video or self.embed_norm):
            raise UserError("a hybrid CNN stem (d_backbone) is supported for image models without embed_norm")
        if self.attn_only_layer_scale and not self.layer_scale:
            raise UserError("attn_only_layer_scale=True needs layer_scale=True")
        if self.global_pool == "map":
            self.attn_pool_heads = self.attn_pool_heads or self.n_heads
            self.attn_pool_d_mlp = self.attn_pool_d_mlp or self.d_mlp
        self._check_positions()
        if self.global_pool == "token" and not (self.class_token or self.distilled):
            raise UserError("global_pool='token' needs a class token")
        if self.distilled and self.n_reg_tokens:
            raise UserError("a distilled model with register tokens is not supported")
        if self.use_split_qkv_input and self.use_attn_in:
            raise UserError("use_split_qkv_input and use_attn_in are mutually exclusive (as in TransformerLens); "
                             "turn one off")
        self._check_head()
        self._check_video()
        for name in ("label_names", "class_names"):
            names = getattr(self, name)
            if names is not None:  # tuples (json gives lists), one per class
                setattr(self, name, tuple(str(n) for n in names))
                if len(names) != self.n_classes:
                    raise UserError(f"{name} has {len(names)} entries for n_classes={self.n_classes}")

    def _check_diff_attn(self) -> None:
        if self.diff_dual_lambda and not self.diff_attn:
            raise UserError("diff_dual_lambda=True is an option of differential attention: set diff_attn=True")
        if not self.diff_attn:
            return
        if self.d_head % 2:
            raise UserError(f"differential attention splits each head in two: d_head={self.d_head} must be even")
        if self.rope_type is not None or self.rel_pos_bias or self.attention_type != "joint":
            raise UserError("differential attention (diff_attn) is supported with joint attention without RoPE or "
                             "a relative position bias")

    def _check_rel_pos(self) -> None:
        if self.n_prefix_tokens != int(self.class_token):
            raise UserError("a relative position bias is defined for a class token and patch tokens only: "
                             "no register or distillation tokens")
        if self.rel_pos_type == "log_mlp" and not self.rel_pos_mlp_dim:
            raise UserError("rel_pos_type='log_mlp' needs rel_pos_mlp_dim (the bias MLP's hidden width)")
        if self.rel_pos_type not in ("table", "log_mlp"):
            raise UserError(f"rel_pos_type={self.rel_pos_type!r}: choose 'table' or 'log_mlp'")

    def _check_head(self) -> None:
        if self.global_pool == "token_avg" and (not self.class_token or self.distilled or self.pool_include_prefix
                                                or self.final_norm == "pooled"):
            raise UserError("global_pool='token_avg' needs a class token, no distillation token, "
                             "pool_include_prefix=False (the mean is over patch tokens only) and a per-token "
                             "final norm (final_norm='token' or None)")
        if self.d_image_embed is None:
            if self.image_proj_bias:
                raise UserError("image_proj_bias=True needs an image projection (d_image_embed)")
            if self.head_on_image_embed:
                raise UserError("head_on_image_embed=True needs an image projection (d_image_embed)")
            return
        if self.distilled or self.global_pool == "token_avg":
            raise UserError("an image projection (d_image_embed) needs a single pooled vector: "
                             "not a distilled or global_pool='token_avg' model")
        if not self.head_on_image_embed and self.n_classes != self.d_image_embed:
            raise UserError(f"without a head on the image embedding the logits are the embedding: n_classes="
                             f"{self.n_classes} must equal d_image_embed={self.d_image_embed} "
                             "(or set head_on_image_embed=True)")

    def _check_positions(self) -> None:
        if self.pos_embed_grid is not None:
            self.pos_embed_grid = _pair(self.pos_embed_grid)
            if self.pos_embed_type not in ("learned", "factorized") or not self.no_embed_class:
                raise UserError("pos_embed_grid (a position table on its own patch grid) needs pos_embed_type "
                                 "'learned' or 'factorized' and no_embed_class=True (a table over patch tokens only)")
        if self.naflex and (self.is_video or self.rope_type is not None or self.rel_pos_bias):
            raise UserError("naflex=True (NaFlex patch inputs) is supported for image models without RoPE or a "
                             "relative position bias")
        if self.pos_embed_type == "factorized" and (not self.no_embed_class or self.is_video):
            raise UserError("pos_embed_type='factorized' is a table over image patch tokens: set no_embed_class=True "
                             "(and no num_frames)")

    @property
    def pos_grid(self) -> tuple[int, int]:
        """The patch grid of the learned position table (pos_embed_grid, else grid_size)."""
        return self.pos_embed_grid or self.grid_size

    def _check_video(self) -> None:
        if self.num_frames is None:
            if self.tubelet_size != 1 or self.attention_type != "joint" or self.pos_embed_type == "space_time":
                raise UserError("tubelet_size, attention_type='divided_space_time' and pos_embed_type='space_time' "
                                 "describe video models: set num_frames")
            return
        if self.num_frames < 1 or self.tubelet_size < 1 or self.num_frames % self.tubelet_size:
            raise UserError(f"num_frames={self.num_frames} must be a positive multiple of "
                             f"tubelet_size={self.tubelet_size}")
        if self.dynamic_img_size:
            raise UserError("dynamic_img_size is not supported for video models (num_frames set); "
                             "resize the frames to img_size")
        if self.attention_type == "divided_space_time" and (self.distilled or self.block_type != "pre_norm"):
            raise UserError("attention_type='divided_space_time' needs pre-norm blocks and no distillation token")
        if self.attention_type == "divided_space_time" and (self.use_split_qkv_input or self.use_attn_in):
            raise UserError("per-head attention inputs (use_split_qkv_input / use_attn_in) are not supported with "
                             "attention_type='divided_space_time'; turn them off")
        if self.pos_embed_type == "space_time" and self.no_embed_class:
            raise UserError("pos_embed_type='space_time' embeds the prefix positions; no_embed_class must be False")

    # ------------------------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        """Whether inputs are clips [b, frames, c, h, w] (num_frames set)."""
        return self.num_frames is not None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input without the batch axis: (c, h, w), or (frames, c, h, w) for video."""
        image = (self.in_chans, *self.img_size)
        return image if self.num_frames is None else (self.num_frames, *image)

    @property
    def n_time(self) -> int:
        """Token positions along time: num_frames // tubelet_size (1 for an image model)."""
        return 1 if self.num_frames is None else self.num_frames // self.tubelet_size

    @property
    def n_patches_per_frame(self) -> int:
        """Patch tokens at one time position (rows * cols)."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def d_pooled(self) -> int:
        """Width of hook_pooled per read-out vector (2 * d_model for global_pool='token_avg')."""
        return 2 * self.d_model if self.global_pool == "token_avg" else self.d_model

    @property
    def has_head_module(self) -> bool:
        """Whether the model holds a classifier `head` (a Linear on the pooled vector or, with
        head_on_image_embed, on the image embedding)."""
        if self.d_image_embed is not None:
            return self.head_on_image_embed and self.n_classes > 0
        return self.n_classes > 0

    @property
    def n_prefix_tokens(self) -> int:
        """Class, register and distillation tokens that precede the patch tokens."""
        return int(self.class_token) + self.n_reg_tokens + int(self.distilled)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        """Patch tokens of one input: time positions * rows * cols."""
        return self.n_time * self.grid_size[0] * self.grid_size[1]

    @property
    def n_ctx(self) -> int:
        """Sequence length at the configured image size (TransformerLens name)."""
        return self.n_prefix_tokens + self.n_patches

    @property
    def d_vocab(self) -> int:
        """TransformerLens name for the output dimension: the number of classes."""
        return self.n_classes

    @property
    def d_vocab_out(self) -> int:
        return self.n_classes

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): `dtype` as its name, e.g. "float32"."""
        return {**asdict(self), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HookedViTConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"unknown HookedViTConfig fields {unknown}; see hooked_vit/config.py for the fields")
        return cls(**d)


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


def _dtype(value: Any) -> torch.dtype:
    """A torch dtype from itself or its name ("float16", "torch.bfloat16")."""
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"dtype={value!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
    return dtype
