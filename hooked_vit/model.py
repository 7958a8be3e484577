"""`HookedViT`: a Vision Transformer on TransformerLens's `HookedRootModule`.

One readable forward pass; every architectural difference between the supported timm
families is a flag in `HookedViTConfig`. See docs/hook_points.md for the hook table.
"""

from __future__ import annotations

import copy
import difflib
import sys
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Float
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens import ActivationCache, FactoredMatrix, HookedRootModule
from transformer_lens.hook_points import HookPoint

from hooked_vit.block import TransformerBlock
from hooked_vit.cache import ViTActivationCache
from hooked_vit.config import HookedViTConfig
from hooked_vit.embed import Embed
from hooked_vit import weight_processing
from hooked_vit.attention_pool import AttentionPool
from hooked_vit.errors import UnknownHookError, UnsupportedModelError, UserError
from hooked_vit.layer_norm import make_norm
from hooked_vit.layers import block_range
from hooked_vit.loading import Converted, convert_timm, convert_timm_state_dict, timm_module, to_timm_state_dict
from hooked_vit.loading_hf import convert_hf
from hooked_vit.loading_open_clip import convert_open_clip
from hooked_vit.naflex import NaFlexInputs, naflex_inputs
from hooked_vit.rope import block_tables, build_rope
from hooked_vit.specs import ModelSpec, convert as convert_spec
from hooked_vit.saes import SAEHost
from hooked_vit.vlm import Layer, vision_features
from hooked_vit.transformer_lens_api import (ImageTokens, all_composition_scores, canonical_hook_name, class_id,
                                             refuse_image_position_sweep)

ReturnType = Literal["logits", "loss", "pooled", "resid", None]


class HookedViT(SAEHost, HookedRootModule):
    """A hooked ViT that reproduces timm's eval-mode outputs.

    Top-level hooks: hook_embed [b, p, d] (prefix tokens and patch embeddings, before the
    position embedding), hook_pos_embed [b, p, d], ln_pre.hook_* (when cfg.ln_pre),
    ln_final.hook_* ([b, p, d] for a per-token final norm, [b, d] for a pooled one),
    hook_pooled ([b, d]; [b, 2, d] for distilled models: class and distillation token;
    [b, 2 * d] with global_pool="token_avg": class token and mean patch token concatenated),
    hook_image_embed [b, d_image_embed] (only with an image projection, cfg.d_image_embed),
    hook_logits [b, n_classes]. Per block: see `TransformerBlock` and `Attention`.

    Video models (cfg.num_frames set; docs/video.md) take clips [b, frames, c, h, w]; their
    patch tokens are in (time, row, col) order (`hooked_vit.tokens`), and with
    cfg.attention_type="divided_space_time" each block also has `ln_time`, `attn_time`,
    `hook_attn_time_out` and `hook_resid_time` (see `TransformerBlock`).

    There is no dropout: the model always computes timm's eval-mode function. Sparse
    dictionaries splice in with SAELens's `add_sae` / `run_with_saes` / ... (hooked_vit/saes.py).
    """

    def __init__(self, cfg: HookedViTConfig, backbone: Optional[nn.Module] = None):
        """`backbone`: a hybrid stem's CNN module (cfg.d_backbone set), e.g. timm's
        `patch_embed.backbone`; the model owns it as `embed.backbone`."""
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg, backbone)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint() if cfg.pos_embed else None  # absent without a learned position embedding
        self.ln_pre = make_norm(cfg, cfg.d_model) if cfg.ln_pre else None
        self.rope = build_rope(cfg)  # timm's rotary tables (cfg.rope_type), applied in attention
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        final_eps = cfg.eps if cfg.final_norm_eps is None else cfg.final_norm_eps
        self.ln_final = make_norm(cfg, cfg.d_model, final_eps) if cfg.final_norm else None
        self.attn_pool = AttentionPool(cfg) if cfg.global_pool == "map" else None
        self.hook_pooled = HookPoint()
        # CLIP's image projection; absent (no module, no hook call) for every other model.
        projected = cfg.d_image_embed is not None
        self.image_proj = nn.Linear(cfg.d_model, cfg.d_image_embed, bias=cfg.image_proj_bias) if projected else None
        self.hook_image_embed = HookPoint() if projected else None
        has_head = cfg.has_head_module  # headless towers (DINOv2, CLIP features) return features
        d_head_in = cfg.d_image_embed if projected else cfg.d_pooled
        self.head = nn.Linear(d_head_in, cfg.n_classes, bias=cfg.head_bias) if has_head else None
        self.head_dist = (
            nn.Linear(cfg.d_model, cfg.n_classes, bias=cfg.head_bias) if has_head and cfg.distilled else None
        )
        self.hook_logits = HookPoint()
        self.setup()
        self._sync_cfg()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Union[Float[Tensor, "b c h w"], Float[Tensor, "b p d_model"], ImageTokens, dict[str, Tensor]],
        *,
        return_type: ReturnType = "logits",
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
        keep_mask: Optional[Tensor] = None,
        key_mask: Optional[Tensor] = None,
        targets: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
        patch_coord: Optional[Tensor] = None,
        patch_valid: Optional[Tensor] = None,
    ) -> Tensor:
        """Run the model.

        Args:
            x: images [b, c, h, w] (or `model.to_tokens(images)`); or, with `start_at_layer`,
                the residual stream [b, p, d_model] entering that block. A floating-point
                input is cast to the model's dtype (`cfg.dtype`), as TransformerLens casts
                a component's input to its parameters' dtype.
            return_type: "logits" [b, n_classes]; "loss" the mean cross-entropy against
                `targets` (a scalar, so `run_with_cache(..., incl_bwd=True)` can backpropagate);
                "pooled" the pre-logits representation; "resid" the residual stream after the
                last block run; None runs and returns None.
            targets: [b] class ids, for return_type="loss".
            stop_at_layer: run blocks [start, stop) and return the residual stream.
            keep_mask: [b, n_ctx] bool, tokens to keep. Dropped tokens are removed from the
                sequence after the embedding (before the first block); kept tokens are moved
                left, shorter rows padded and masked out of attention and pooling.
            key_mask: [b, p] bool, True where a token may be attended to (with start_at_layer).
            positions: [b, p] each token's index in the full sequence, for RoPE and
                relative-position-bias models run from start_at_layer on a shortened sequence
                (token removal sets it itself).
            patch_coord, patch_valid: NaFlex inputs (hooked_vit.naflex; variable resolution and
                aspect ratio): x is then patches [b, n, patch_dim], patch_coord [b, n, 2] each
                patch's (row, col) and patch_valid [b, n] the real patches; or x is a dict with
                the keys "patches", "patch_coord", "patch_valid", as timm's NaFlexVit takes them.
                Padding is masked out of attention and pooling (embed.hook_patch_mask [b, p]).
        """
        _check_forward_options(return_type, targets)
        x = x.images if isinstance(x, ImageTokens) else x
        naflex = naflex_inputs(x, patch_coord, patch_valid)
        if naflex is not None:
            if start_at_layer is not None:
                raise UserError("NaFlex inputs (patch_coord / patch_valid) are embedded at the start; with "
                                 "start_at_layer pass the residual stream and key_mask instead")
            if not self.cfg.naflex:
                raise UserError(f"{self.cfg.model_name} does not take NaFlex inputs (patch_coord / patch_valid): "
                                 "give images [b, c, h, w], or build the config with naflex=True")
            x = naflex.patches
        if torch.is_tensor(x) and x.is_floating_point() and x.dtype != self.cfg.dtype:
            x = x.to(self.cfg.dtype)
        pool_mask, grid = None, self.cfg.grid_size
        if naflex is not None:
            resid, patch_mask = self.embed_naflex(naflex._replace(patches=x))
            first_pooled = 0 if self.cfg.pool_include_prefix else self.cfg.n_prefix_tokens
            if keep_mask is not None:
                self._check_keep_mask(keep_mask)
                resid, key_mask, positions = compact_tokens(resid, keep_mask.to(patch_mask.device) & patch_mask)
                pool_mask = key_mask & (positions >= first_pooled)
            else:
                key_mask = patch_mask
                pool_mask = patch_mask.clone()
                pool_mask[:, :first_pooled] = False
            if self.cfg.global_pool != "token" and not bool(pool_mask.any(1).all()):
                raise UserError("an image has no real token left to pool (patch_valid / keep_mask / an edited "
                                 "embed.hook_patch_mask removes them all); keep at least one")
            start_at_layer = 0
        elif start_at_layer is None:
            grid = self.embed.check_images(x)
            resid = self.embed_images(x)
            if keep_mask is not None:
                self._check_keep_mask(keep_mask)
                resid, key_mask, positions = compact_tokens(resid, keep_mask)
                first_pooled = 0 if self.cfg.pool_include_prefix else self.cfg.n_prefix_tokens
                pool_mask = key_mask & (positions >= first_pooled)
            start_at_layer = 0
        else:
            if keep_mask is not None:
                raise UserError("keep_mask acts after the embedding; with start_at_layer pass key_mask instead")
            resid = x
        tables = self.rope_tables(grid, positions, resid.shape[1])
        for i in block_range(start_at_layer, stop_at_layer, self.cfg.n_layers):
            block = self.blocks[i]
            resid = block(resid, key_mask, rope=None if tables is None else tables[block.layer],
                          positions=positions if self.cfg.rel_pos_bias else None)
        if stop_at_layer is not None or return_type == "resid":
            return resid
        pooled = self.hook_pooled(self.pool(resid, pool_mask))
        if return_type == "pooled":
            return pooled
        logits = self.hook_logits(self.unembed(pooled))
        if return_type == "loss":
            if targets is None:
                raise UserError('return_type="loss" needs targets=[batch] class ids')
            return self.loss_fn(logits, targets)
        return logits if return_type == "logits" else None

    def vision_features(self, images: Float[Tensor, "b c h w"], layer: Optional[Layer] = None,
                        strategy: Optional[str] = None) -> Float[Tensor, "b p d"]:
        """What a LLaVA-style VLM's projector reads off this tower: the hidden state of `layer`
        (default: cfg.vision_feature_layer, else -2, the penultimate block's output; a list
        concatenates) with `strategy` "default" (token 0 dropped) or "full". See hooked_vit.vlm."""
        return vision_features(self, images, layer, strategy)

    def rope_tables(self, grid: tuple[int, int], positions: Optional[Tensor], n_tokens: int) -> Optional[list[Tensor]]:
        """Each block's rotary table (hooked_vit.rope) for a patch grid, at `positions` [b, p]
        of the full sequence when tokens were removed; None without RoPE."""
        if self.rope is None:
            return None
        n_full = self.cfg.n_prefix_tokens + self.cfg.n_time * grid[0] * grid[1]
        if positions is None and n_tokens != n_full:
            raise UserError(f"a RoPE model needs each token's position: {n_tokens} tokens for a {grid[0]}x{grid[1]} "
                             "grid; pass positions= (the tokens' indices in the full sequence)")
        return block_tables(self.rope, grid, self.cfg.grid_size, self.cfg.n_prefix_tokens, self.cfg.n_layers, positions)

    def _check_keep_mask(self, keep_mask: Tensor) -> None:
        cfg = self.cfg
        if cfg.attention_type != "joint":
            raise UserError(f"keep_mask (token removal) is not supported with attention_type={cfg.attention_type!r}: "
                             "a removed token would break the (time, row, col) grouping of the attention")
        n_read = 2 if cfg.distilled else 1
        if cfg.global_pool in ("token", "token_avg") and not bool(keep_mask[:, :n_read].all()):
            raise UserError("keep_mask must keep the class (and distillation) token: the head reads it")
        if cfg.global_pool != "token":
            first = 0 if cfg.pool_include_prefix else cfg.n_prefix_tokens
            if not bool(keep_mask[:, first:].any(1).all()):
                raise UserError("keep_mask removes every pooled token of an image; keep at least one")

    def embed_images(self, images: Float[Tensor, "b c h w"]) -> Float[Tensor, "b p d_model"]:
        """Patch + prefix tokens + position embedding (+ ln_pre): blocks.0.hook_resid_pre.
        Video models take clips [b, frames, c, h, w]."""
        grid = self.embed.check_images(images)
        resid = self.hook_embed(self.embed.tokens(images))
        pos = self.embed.positions(grid, images.shape[0])
        if pos is not None:
            resid = resid + self.hook_pos_embed(pos)
        return resid if self.ln_pre is None else self.ln_pre(resid)

    def embed_naflex(self, inputs: NaFlexInputs) -> tuple[Float[Tensor, "b p d_model"], Tensor]:
        """NaFlex patches as blocks.0.hook_resid_pre (patch embedding, prefix tokens, each image's
        resampled positions, ln_pre) and the mask of real tokens [b, p] (embed.hook_patch_mask)."""
        resid = self.hook_embed(self.embed.naflex_tokens(inputs))
        pos = self.embed.naflex_positions(inputs)
        if pos is not None:
            resid = resid + self.hook_pos_embed(pos)
        resid = resid if self.ln_pre is None else self.ln_pre(resid)
        prefix = inputs.patch_valid.new_ones(resid.shape[0], self.cfg.n_prefix_tokens)
        mask = self.embed.hook_patch_mask(torch.cat([prefix, inputs.patch_valid], dim=1))
        return resid, mask.to(torch.bool)

    def pool(self, resid: Float[Tensor, "b p d_model"], pool_mask: Optional[Tensor] = None) -> Tensor:
        """Final norm and pooling: the pre-logits representation.

        `pool_mask` [b, p] marks the tokens that average/max pooling reads (after token
        removal); by default all patch tokens (and prefix tokens with pool_include_prefix).
        """
        cfg = self.cfg
        if cfg.final_norm == "token":
            resid = self.ln_final(resid)
        if cfg.global_pool == "map":  # attention pooling over the patch (and, if set, prefix) tokens
            first = 0 if cfg.pool_include_prefix else cfg.n_prefix_tokens
            pooled = self.attn_pool(resid, pool_mask) if pool_mask is not None else self.attn_pool(resid[:, first:])
        elif cfg.distilled:
            pooled = resid[:, 0:2]  # class and distillation tokens: [b, 2, d]
        elif cfg.global_pool == "token":
            pooled = resid[:, 0]
        elif cfg.global_pool == "token_avg":  # transformers' Dinov2ForImageClassification
            pooled = torch.cat([resid[:, 0], _reduce_tokens(resid, cfg, pool_mask, "avg")], -1)
        else:
            pooled = _reduce_tokens(resid, cfg, pool_mask, cfg.global_pool)
        if cfg.final_norm == "pooled":
            pooled = self.ln_final(pooled)
        return pooled

    def unembed(self, pooled: Tensor) -> Float[Tensor, "b n_classes"]:
        """The image projection (CLIP, at hook_image_embed) and the classifier head(s) on the
        pooled representation (identity without a head: CLIP's logits are the image embedding)."""
        if self.image_proj is not None:
            pooled = self.hook_image_embed(self.image_proj(pooled))
        if self.head is None:
            return pooled.mean(1) if self.cfg.distilled else pooled
        if self.cfg.distilled:
            return (self.head(pooled[:, 0]) + self.head_dist(pooled[:, 1])) / 2
        return self.head(pooled)

    def to_class_logits(self, resid: Float[Tensor, "... d_model"],
                        unembed: Optional[tuple[Tensor, Tensor]] = None) -> Float[Tensor, "... n_classes"]:
        """Project residual vectors of any token onto the classes (the "logit lens").

        logits = W_U^T final_norm(h) + b_U, with the final norm applied per token (timm's
        `norm`, or `fc_norm` for GAP models) and, for distilled models, the two heads
        averaged. Fires no hooks. For the class token at the last block of a class-token
        model this equals the model's logits. With an attention-pooling (MAP) head the vector
        is read as the head reads a one-token sequence (every attention weight 1: the probe's
        blocks where present, value, proj and the head's MLP), the head applied to the token alone; this is not the token's share of the
        model's logits (which depends on the other tokens through the pooling weights). unembed: (W_U, b_U) computed once by a caller
        that projects many times (for CLIP, W_U is a product of the head and the projection).
        """
        if self.attn_pool is not None:  # MAP head: the pooling head applied to the vector alone
            if self.cfg.final_norm == "token":
                resid = self.ln_final.functional(resid)
            resid = self.attn_pool.single_token(resid)
            if self.cfg.final_norm == "pooled":
                resid = self.ln_final.functional(resid)
        elif self.ln_final is not None:
            resid = self.ln_final.functional(resid)
        w, b = (self.W_U, self.b_U) if unembed is None else unembed
        return F.linear(resid, w.T, b)  # one fused GEMM + bias

    def tokens_to_residual_directions(self, classes: Union[str, int, Sequence[Union[str, int]], Tensor]) -> Tensor:
        """Unembedding directions of classes ([d_model], or [*classes, d_model] for a list or
        tensor of them): class ids, or class names (`cfg.class_names` / `cfg.label_names`),
        as TransformerLens's takes token ids or strings.

        Lets `ActivationCache.logit_attrs(stack, tokens=classes)` attribute class logits.
        """
        w = self.W_U
        return w.T[self.to_class_ids(classes).to(w.device)]

    def to_class_ids(self, classes: Union[str, int, Sequence[Union[str, int]], Tensor]) -> Tensor:
        """Class ids (a 0-d or 1-d tensor; a tensor input unchanged) from names or ids."""
        if isinstance(classes, Tensor):
            return classes
        one = isinstance(classes, (str, int))
        ids = [self.to_single_token(c) for c in ([classes] if one else classes)]
        return torch.tensor(ids[0] if one else ids, dtype=torch.long)

    def to_single_token(self, class_name: Union[str, int]) -> int:
        """The class id of a class name or id (TransformerLens's `to_single_token`, for classes)."""
        cfg = self.cfg
        return class_id(class_name, cfg.class_names, cfg.label_names, cfg.n_classes)

    def to_tokens(self, images: Float[Tensor, "b c h w"]) -> ImageTokens:
        """Images as TransformerLens's patching functions expect tokens: an `ImageTokens`
        whose `shape` is (batch, sequence length), so `transformer_lens.patching.get_act_patch_*`
        sweeps every token position; the model runs it like the images."""
        grid = self.embed.check_images(images)
        return ImageTokens(images, self.cfg.n_prefix_tokens + grid[0] * grid[1])

    def all_composition_scores(self, mode: Literal["Q", "K", "V"]) -> Float[Tensor, "l1 h1 l2 h2"]:
        """Composition scores of every head into every later head, [n_layers, n_heads,
        n_layers, n_heads] (zero where the second head is not in a later layer), as
        TransformerLens's `all_composition_scores`; see `transformer_lens_api.all_composition_scores`."""
        self._refuse_differential("all_composition_scores")
        return all_composition_scores(self.W_Q, self.W_K, self.W_V, self.W_O, mode)

    def _refuse_differential(self, what: str) -> None:
        """The TransformerLens circuit views assume one softmax over q.k and v -> z -> W_O linear."""
        if self.cfg.diff_attn:
            raise UserError(
                f"{what} is undefined with differential attention (diff_attn): a head's pattern is softmax(q1.k1) "
                "- lambda * softmax(q2.k2), not one bilinear form W_Q W_K^T, and its z passes a per-head RMS "
                "sub-norm before W_O, so W_V W_O is not its value-to-output map"
            )

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, "d_model"]:
        """Sum of the attention (`b_O`) and MLP (`b_out`) output biases written to the residual
        stream before block `layer` (and that block's `b_O` with `mlp_input`), as
        TransformerLens's `accumulated_bias`, which `cache.get_full_resid_decomposition` reads.
        """
        if self.cfg.attention_type != "joint":
            raise UserError(
                "accumulated_bias is undefined with divided space-time attention: attn_time writes to the patch "
                "tokens only, so its bias is not the same term at every position"
            )
        if self.cfg.block_type == "post_norm":
            raise UserError(
                "accumulated_bias is undefined for post-norm blocks: ln1/ln2 normalise each sublayer's "
                "output, so its bias is not a separate term of the residual stream"
            )
        if not 0 <= layer <= self.cfg.n_layers or (mlp_input and layer == self.cfg.n_layers):
            raise UserError(f"layer={layer} must be in [0, {self.cfg.n_layers}] ({self.cfg.n_layers} with mlp_input=False)")
        total = self.b_E.new_zeros(self.cfg.d_model)
        for block in self.blocks[:layer]:
            total = total + block.attn.b_O + (block.mlp.b_out if include_mlp_biases else 0)
        return total + self.blocks[layer].attn.b_O if mlp_input else total

    @property
    def all_head_labels(self) -> list[str]:
        """Labels of every attention head, "L{layer}H{head}", in stacking order."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    # ------------------------------------------------------------------ caching
    def run_with_cache(
        self, *model_args: Any, return_cache_object: bool = True, **kwargs: Any
    ) -> tuple[Tensor, Union[ActivationCache, dict[str, Tensor]]]:
        """As `HookedRootModule.run_with_cache`, wrapping the result in a `ViTActivationCache`
        (a TransformerLens `ActivationCache`)."""
        out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        if return_cache_object:
            return out, ViTActivationCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))
        return out, cache_dict

    def get_caching_hooks(self, names_filter: Any = None, *args: Any, **kwargs: Any):  # type: ignore[override]
        """As `HookedRootModule.get_caching_hooks` (which `run_with_cache` uses); hook names in
        `names_filter` are checked and aliases resolved."""
        return super().get_caching_hooks(self._check_names_filter(names_filter), *args, **kwargs)

    def add_caching_hooks(self, names_filter: Any = None, *args: Any, **kwargs: Any):  # type: ignore[override]
        return super().add_caching_hooks(self._check_names_filter(names_filter), *args, **kwargs)

    def run_with_hooks(self, *model_args: Any, **kwargs: Any) -> Any:
        """As `HookedRootModule.run_with_hooks`; refuses a `transformer_lens.patching`
        position sweep over raw images (it would sweep the image width)."""
        refuse_image_position_sweep(sys._getframe(1), model_args)
        return super().run_with_hooks(*model_args, **kwargs)

    def hooks(self, fwd_hooks=(), bwd_hooks=(), *args: Any, **kwargs: Any):  # type: ignore[override]
        fwd_hooks = [(self.check_hook_name(name), fn) for name, fn in fwd_hooks]
        bwd_hooks = [(self.check_hook_name(name), fn) for name, fn in bwd_hooks]
        return super().hooks(fwd_hooks, bwd_hooks, *args, **kwargs)

    def add_hook(self, name, hook, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().add_hook(self.check_hook_name(name), hook, *args, **kwargs)

    def check_hook_name(self, name: Union[str, Callable[[str], bool]]) -> Union[str, Callable[[str], bool]]:
        """The hook point `name` refers to (aliases resolved by `canonical_hook_name`); an
        UnknownHookError (a KeyError) with close matches if there is none. Filters pass unchanged."""
        if not isinstance(name, str):
            return name
        canonical = canonical_hook_name(name)
        if canonical not in self.hook_dict and self.cfg.parallel_attn_mlp and canonical.endswith(".hook_resid_mid"):
            raise UnknownHookError(f"no hook point {name!r}: this model's blocks are parallel (parallel_attn_mlp: "
                                   "attention and MLP both read resid_pre), so there is no resid_mid; a method that "
                                   "needs the stream between the sublayers does not apply to it")
        if canonical not in self.hook_dict:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
            hint = f" Did you mean {close}?" if close else " See model.hook_dict.keys()."
            raise UnknownHookError(f"unknown hook point {name!r}.{hint}")
        return canonical

    def _check_names_filter(self, names_filter: Any) -> Any:
        if isinstance(names_filter, str):
            return self.check_hook_name(names_filter)
        if isinstance(names_filter, (list, tuple)):
            return [self.check_hook_name(name) for name in names_filter]
        return names_filter

    def set_use_attn_result(self, use: bool) -> None:
        """Compute per-head outputs at `blocks.{l}.attn.hook_result` (costs memory)."""
        self.cfg.use_attn_result = _flag(use, "use_attn_result")

    def set_use_split_qkv_input(self, use: bool) -> None:
        """Per-head copies of the attention input at `blocks.{l}.hook_{q,k,v}_input` [b, p, h, d_model]."""
        if use and self.cfg.use_attn_in:
            raise UserError("use_split_qkv_input and use_attn_in are mutually exclusive; call set_use_attn_in(False) first")
        self.cfg.use_split_qkv_input = _flag(use, "use_split_qkv_input")

    def set_use_attn_in(self, use: bool) -> None:
        """One per-head copy of the attention input at `blocks.{l}.hook_attn_in` [b, p, h, d_model]."""
        if use and self.cfg.use_split_qkv_input:
            raise UserError("use_attn_in and use_split_qkv_input are mutually exclusive; call set_use_split_qkv_input(False) first")
        self.cfg.use_attn_in = _flag(use, "use_attn_in")

    def set_use_hook_mlp_in(self, use: bool) -> None:
        """The MLP's input (a copy of resid_mid) at `blocks.{l}.hook_mlp_in` [b, p, d_model]."""
        self.cfg.use_hook_mlp_in = _flag(use, "use_hook_mlp_in")

    def loss_fn(
        self, logits: Float[Tensor, "b n_classes"], targets: Tensor, per_image: bool = False
    ) -> Tensor:
        """Cross-entropy of class logits against class ids [b]: the mean, or [b] with per_image."""
        if targets.shape != logits.shape[:1]:
            raise UserError(f"targets must be [batch] class ids, got shape {tuple(targets.shape)} for logits {tuple(logits.shape)}")
        return F.cross_entropy(logits, targets.to(logits.device), reduction="none" if per_image else "mean")

    @property
    def n_params(self) -> int:
        """Number of parameters (every parameter, as PyTorch counts them)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ weights
    @property
    def W_E(self) -> Float[Tensor, "patch_dim d_model"]:
        """Patch embedding as a matrix over flattened (channel, row, col) patches (with a hybrid
        CNN stem, patches of the backbone's feature map: d_backbone channels)."""
        return self.embed.proj.weight.flatten(1).T

    @property
    def b_E(self) -> Float[Tensor, "d_model"]:
        bias = self.embed.proj.bias
        return bias if bias is not None else self.embed.proj.weight.new_zeros(self.cfg.d_model)

    @property
    def W_pos(self) -> Float[Tensor, "n_pos d_model"]:
        """Position embeddings (patch rows only when cfg.no_embed_class): the learned table, the
        fixed sin-cos one (pos_embed_type="sincos", patch rows), or for pos_embed_type="space_time"
        the sum of the spatial and temporal tables at every position [n_ctx, d_model]; for
        pos_embed_type="factorized" the row + column sums over the table's grid [gh * gw, d_model]."""
        if self.embed.pos_table is not None:
            return self.embed.pos_table[0]
        if self.embed.time_embed is not None:
            return self.embed._space_time_positions()[0]
        if self.embed.pos_embed_y is not None:  # factorized (NaFlexVit): row + column at every patch of its grid
            return self.embed.patch_positions(self.cfg.pos_grid)[0]
        if self.embed.pos_embed is None:
            raise UserError(f"{self.cfg.model_name} has no position embedding")
        return self.embed.pos_embed[0]

    @property
    def W_U(self) -> Float[Tensor, "d_model n_classes"]:
        """Everything between the pooled vector and the logits as one residual-space
        unembedding: the head (distilled: the two heads averaged); with CLIP's image
        projection P, the projection folded in (W_U = P^T W_head^T, or P^T when the logits
        are the image embedding), so logit lens and attribution read the projection too.
        Refused for global_pool="token_avg", whose head reads two vectors at once."""
        self.require_head()
        if self.cfg.global_pool == "token_avg":
            raise UserError(
                "W_U is undefined for global_pool='token_avg': the head reads [class token, mean patch token] "
                f"({2 * self.cfg.d_model} inputs), so no single residual vector has logits (no logit lens); "
                "model.head.weight[:, :d_model] is the half read from the class token"
            )
        if self.image_proj is not None:
            w = self.image_proj.weight if self.head is None else self.head.weight @ self.image_proj.weight
        else:
            w = self.head.weight if self.head_dist is None else (self.head.weight + self.head_dist.weight) / 2
        return w.T

    @property
    def has_unembed(self) -> bool:
        """Whether the logits are a linear read-out of the pooled vector (a head, CLIP's image
        projection or both) rather than the pooled vector itself."""
        return self.head is not None or self.image_proj is not None

    def require_head(self) -> None:
        """Raise if the model has no classifier head nor image projection (no class or
        image-embedding space to project on)."""
        if not self.has_unembed:
            raise UserError(
                f"{self.cfg.model_name} has no classifier head (num_classes=0): there is no class "
                "embedding space to project onto (logit lens, class targets, class metrics); give it a "
                "classifier head (num_classes=N; on the command line --arch NAME:num_classes=N with a "
                "checkpoint file or --random-weights) or use a CLIP model with text classes (--texts a,b,c)"
            )

    @property
    def has_classes(self) -> bool:
        """Whether the logits are classes (a classifier head, or text classes on a CLIP
        projection) rather than the pooled vector or the image embedding itself."""
        return self.head is not None

    def require_classes(self) -> None:
        """Raise a one-line `UserError` unless the logits are classes: a headless model and a
        CLIP image tower without text classes (its outputs are image-embedding dimensions)
        have no class space for the logit lens, targets or class-metric analyses."""
        if self.head is None and self.image_proj is not None:
            raise UserError(
                f"{self.cfg.model_name} is a CLIP image tower without text classes: its "
                f"{self.cfg.d_image_embed} outputs are image-embedding dimensions, not classes; give text classes "
                "with --texts a,b,c or --text-file FILE (in Python: hooked_vit.text_classes.install_text_classes)")
        self.require_head()

    @property
    def b_U(self) -> Float[Tensor, "n_classes"]:
        """The logits' constant: the head bias(es), plus the head applied to the projection's
        bias (which exists only once fold_ln folded the final norm's bias into it)."""
        self.require_head()
        heads = [h for h in (self.head, self.head_dist) if h is not None]
        biases = [h.bias if h.bias is not None else h.weight.new_zeros(self.cfg.n_classes) for h in heads]
        total = sum(biases) / len(biases) if heads else self.image_proj.weight.new_zeros(self.cfg.n_classes)
        proj_bias = None if self.image_proj is None else self.image_proj.bias
        if proj_bias is not None:
            total = total + (proj_bias if self.head is None else self.head.weight @ proj_bias)
        return total

    def _stack(self, getter: Callable[[TransformerBlock], Tensor]) -> Tensor:
        return torch.stack([getter(block) for block in self.blocks], dim=0)

    W_Q = property(lambda self: self._stack(lambda b: b.attn.W_Q), doc="[l, h, d_model, d_head]")
    W_K = property(lambda self: self._stack(lambda b: b.attn.W_K), doc="[l, h, d_model, d_head]")
    W_V = property(lambda self: self._stack(lambda b: b.attn.W_V), doc="[l, h, d_model, d_head]")
    W_O = property(lambda self: self._stack(lambda b: b.attn.W_O), doc="[l, h, d_head, d_model]")
    b_Q = property(lambda self: self._stack(lambda b: b.attn.b_Q), doc="[l, h, d_head]")
    b_K = property(lambda self: self._stack(lambda b: b.attn.b_K), doc="[l, h, d_head]")
    b_V = property(lambda self: self._stack(lambda b: b.attn.b_V), doc="[l, h, d_head]")
    b_O = property(lambda self: self._stack(lambda b: b.attn.b_O), doc="[l, d_model]")
    W_in = property(lambda self: self._stack(lambda b: b.mlp.W_in), doc="[l, d_model, d_mlp]")
    b_in = property(lambda self: self._stack(lambda b: b.mlp.b_in), doc="[l, d_mlp]")
    W_out = property(lambda self: self._stack(lambda b: b.mlp.W_out), doc="[l, d_mlp, d_model]")
    b_out = property(lambda self: self._stack(lambda b: b.mlp.b_out), doc="[l, d_model]")

    @property
    def QK(self) -> FactoredMatrix:
        """Each head's bilinear form W_Q W_K^T: [n_layers, n_heads, d_model, d_model]."""
        self._refuse_differential("QK")
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Each head's map W_V W_O from its input to its output: [n_layers, n_heads, d_model, d_model]."""
        self._refuse_differential("OV")
        return FactoredMatrix(self.W_V, self.W_O)

    # ------------------------------------------------------------------ loading
    # Every loader converts its source to a `Converted` (config + timm-named weights);
    # `from_converted` is the one place a HookedViT is built from one. Keyword arguments
    # common to every loader: device, dtype (where and in which precision the model lives:
    # the source's by default), fold_ln, center_writing_weights, fold_layer_scale (optional
    # weight processing, default off, so the parameters are exactly the source's).
    @classmethod
    def from_converted(cls, converted: Converted, device: Optional[Union[str, torch.device]] = None,
                       dtype: Optional[torch.dtype] = None, fold_ln: bool = False,
                       center_writing_weights: bool = False, fold_layer_scale: bool = False) -> "HookedViT":
        """A HookedViT of `converted.cfg` holding its weights; a weight that does not map is
        refused, never dropped."""
        cfg = converted.cfg
        with torch.random.fork_rng(devices=[]):  # the initial values are overwritten: leave the generator be
            backbone = None if converted.backbone is None else copy.deepcopy(converted.backbone)
            model = cls(cfg, backbone)
        result = model.load_state_dict(convert_timm_state_dict(converted.timm_state, cfg), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UnsupportedModelError(
                f"weights of {cfg.model_name} did not map onto HookedViT: missing "
                f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}"
            )
        if fold_ln or center_writing_weights or fold_layer_scale:
            model.process_weights_(fold_ln, center_writing_weights, fold_layer_scale)
        return model.to(device=device or converted.device, dtype=dtype or converted.dtype).eval()

    @classmethod
    def from_timm(cls, name_or_model: Union[str, nn.Module], pretrained: bool = False,
                  checkpoint_path: Optional[str] = None, **kwargs: Any) -> "HookedViT":
        """Load a timm ViT: a model name (e.g. "vit_base_patch16_224.augreg2_in21k_ft_in1k";
        `pretrained` lets timm fetch its weights) or a timm VisionTransformer instance (its
        weights are copied); `checkpoint_path` a local .safetensors / .pth / .bin file with
        timm-named weights. Other keywords: the common ones (above), the rest go to
        `timm.create_model` (e.g. num_classes, img_size, dynamic_img_size)."""
        build, timm_kwargs = _build_options(kwargs)
        module = timm_module(name_or_model, pretrained, checkpoint_path, **timm_kwargs)
        return cls.from_converted(convert_timm(module), **build)

    @classmethod
    def from_hf(cls, model_or_path: Any, **kwargs: Any) -> "HookedViT":
        """Load a transformers ViT/DeiT/DINOv2/CLIP-vision/ViT-MSN/I-JEPA/SigLIP/SigLIP 2 model, a `save_pretrained` folder or
        a cached hub id (`hooked_vit.loading_hf.convert_hf`); the rest of the keywords go to
        the model class's `from_pretrained`."""
        build, hf_kwargs = _build_options(kwargs)
        return cls.from_converted(convert_hf(model_or_path, **hf_kwargs), **build)

    @classmethod
    def from_open_clip(cls, model_or_name: Any, **kwargs: Any) -> "HookedViT":
        """Load an open_clip ViT image tower (`hooked_vit.loading_open_clip.convert_open_clip`);
        the rest of the keywords go to `open_clip.create_model`."""
        build, create_kwargs = _build_options(kwargs)
        return cls.from_converted(convert_open_clip(model_or_name, **create_kwargs), **build)

    @classmethod
    def from_pretrained(cls, spec: Union[str, ModelSpec], **kwargs: Any) -> "HookedViT":
        """"timm:NAME" or a bare timm name (pretrained weights unless pretrained=False or
        random_weights=True), "hf:ID_OR_FOLDER", "open_clip:ARCH[:TAG_OR_FILE]", or a checkpoint
        file with arch="timm name": the grammar of `hooked_vit.specs`, the command line's `--model`.
        Keywords: the common ones (above), then `hooked_vit.specs.convert`'s (offline, seed,
        arch, arch_kwargs, random_weights) and the loader's."""
        build, rest = _build_options(kwargs)
        return cls.from_converted(convert_spec(spec, **rest), **build)

    def process_weights_(
        self, fold_ln: bool = True, center_writing_weights: bool = True, fold_layer_scale: bool = True
    ) -> "HookedViT":
        """Fold LayerNorm / LayerScale and centre writing weights, in place; logits unchanged."""
        weight_processing.process_weights_(self, fold_ln, center_writing_weights, fold_layer_scale)
        return self

    def fold_value_biases(self) -> "HookedViT":
        """Move b_V into b_O, in place (TransformerLens's fold_value_biases); logits unchanged."""
        weight_processing.fold_value_biases_(self)
        return self

    def center_unembed(self) -> "HookedViT":
        """Centre W_U and b_U over classes, in place; softmax and logit differences unchanged."""
        weight_processing.center_unembed_(self)
        return self

    def refactor_factored_attn_matrices(self) -> "HookedViT":
        """Balance each head's QK and OV factors by SVD, in place; logits unchanged."""
        weight_processing.refactor_factored_attn_matrices_(self)
        return self

    def to_timm_state_dict(self, like: Optional[nn.Module] = None) -> dict[str, Tensor]:
        """The weights under timm's names (for the unprocessed model); like: a timm model of the
        architecture whose layout to write (needed for Eva / Beit and gated MLPs;
        `hooked_vit.loading.to_timm_state_dict`)."""
        return to_timm_state_dict(self, like)

    def _apply(self, fn, *args: Any, **kwargs: Any):  # every .to() / .cuda() / .cpu() ends here
        out = super()._apply(fn, *args, **kwargs)
        self._sync_cfg()
        return out

    def _sync_cfg(self) -> None:
        """cfg.device and cfg.dtype (TransformerLens reads them) follow the parameters."""
        self.cfg.device = str(self.embed.proj.weight.device)
        self.cfg.dtype = self.embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.proj.weight.device

    def to_input(self, images: Tensor) -> Tensor:
        """Images (clips for video models) on the model's device and in its parameter dtype (`forward` casts the
        dtype itself; this also moves them to the model's device)."""
        param = self.embed.proj.weight
        return images.to(param.device, param.dtype)


BUILD_OPTIONS = ("device", "dtype", "fold_ln", "center_writing_weights", "fold_layer_scale")


def _build_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split loader keywords into `from_converted`'s and the source loader's."""
    return ({k: v for k, v in kwargs.items() if k in BUILD_OPTIONS},
            {k: v for k, v in kwargs.items() if k not in BUILD_OPTIONS})


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


RETURN_TYPES = ("logits", "loss", "pooled", "resid", None)


def _check_forward_options(return_type: Any, targets: Optional[Tensor]) -> None:
    if return_type not in RETURN_TYPES:
        raise UserError(f"return_type={return_type!r} is not one of {RETURN_TYPES}")
    if targets is not None and return_type != "loss":
        raise UserError(f'targets are only read with return_type="loss" (got return_type={return_type!r})')


def _reduce_tokens(resid: Tensor, cfg: HookedViTConfig, pool_mask: Optional[Tensor], kind: str) -> Tensor:
    """Average / max / avgmax (`kind`) pooling over patch tokens (or all tokens with
    pool_include_prefix)."""
    if pool_mask is None:
        x = resid[:, 0 if cfg.pool_include_prefix else cfg.n_prefix_tokens :]
        mean = x.mean(dim=1) if kind in ("avg", "avgmax") else None
        amax = x.amax(dim=1) if kind in ("max", "avgmax") else None
    else:
        valid = pool_mask[..., None]
        mean = (resid * valid).sum(1) / valid.sum(1).clamp(min=1)
        amax = resid.masked_fill(~valid, float("-inf")).amax(dim=1)
    if kind == "avg":
        return mean
    if kind == "max":
        return amax
    return 0.5 * (amax + mean)


def compact_tokens(
    resid: Float[Tensor, "b p d"], keep_mask: Tensor
) -> tuple[Float[Tensor, "b k d"], Tensor, Tensor]:
    """Move each row's kept tokens to the left, in order; pad to the longest row.

    Returns the compacted sequence, its key mask [b, k] (True on real tokens) and the
    original position of every compacted token [b, k].
    """
    if keep_mask.shape != resid.shape[:2]:
        raise UserError(f"keep_mask has shape {tuple(keep_mask.shape)}, expected {tuple(resid.shape[:2])}")
    keep_mask = keep_mask.to(device=resid.device, dtype=torch.bool)
    lengths = keep_mask.sum(1)
    if int(lengths.min()) == 0:
        raise UserError("keep_mask removes every token of an image; keep at least one")
    k = int(lengths.max())
    # Stable sort puts kept tokens first without reordering them.
    order = torch.sort((~keep_mask).to(torch.int8), dim=1, stable=True).indices[:, :k]
    compact = torch.gather(resid, 1, order[..., None].expand(-1, -1, resid.shape[-1]))
    key_mask = torch.arange(k, device=resid.device)[None, :] < lengths[:, None]
    return compact, key_mask, order
