"""`ViTActivationCache`: TransformerLens's `ActivationCache`, with clear refusals for the
methods that do not apply to a Vision Transformer.

Every other public method is TransformerLens's own, running on what `HookedViT` exposes
(`cfg`, `blocks`, `ln_final`, `accumulated_bias`, `tokens_to_residual_directions`); see
https://transformerlensorg.github.io/TransformerLens/generated/code/transformer_lens.ActivationCache.html
"""

from __future__ import annotations

from typing import Any, NoReturn

import torch
from transformer_lens import ActivationCache

from hooked_vit.errors import UserError
from hooked_vit.transformer_lens_api import canonical_hook_name


class ViTActivationCache(ActivationCache):
    """An `ActivationCache` of a `HookedViT` run. Hook-name aliases (`canonical_hook_name`)
    read the activation of the hook point they name."""

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(canonical_hook_name(key) if isinstance(key, str) else key)

    def __contains__(self, key: Any) -> bool:
        return (canonical_hook_name(key) if isinstance(key, str) else key) in self.cache_dict

    def _ensure_head_results(self) -> bool:
        """TransformerLens's per-head results from hook_z; with differential attention W_O reads
        each head's sub-normalised output sub_norm(z) * (1 - lambda_init) (its
        `attn.sub_norm.hook_normalized`), so the results are computed from that instead."""
        if not self.model.cfg.diff_attn:
            return super()._ensure_head_results()
        all_cached = True
        for layer in range(self.model.cfg.n_layers):
            key = f"blocks.{layer}.attn.hook_result"
            if key in self.cache_dict:
                continue
            all_cached = False
            normed = f"blocks.{layer}.attn.sub_norm.hook_normalized"
            if normed not in self.cache_dict:
                raise UserError(f"per-head results of differential attention need {normed} in the cache (W_O reads "
                                "each head's sub-normalised z, not hook_z); cache it or set use_attn_result")
            attn = self.model.blocks[layer].attn
            self.cache_dict[key] = torch.einsum("...hd,hdm->...hm", self.cache_dict[normed] * (1 - attn.lambda_init),
                                                attn.W_O)
        return all_cached

    def logit_lens(self, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            "cache.logit_lens reads every position through ln_final and an unembedding, but a ViT's "
            "logits come from one pooled vector (class token or average of patches); use "
            "model.to_class_logits(cache.accumulated_resid(pos_slice=0)) instead"
        )

    def compute_ssm_effective_attention(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(_NO_SSM.format("compute_ssm_effective_attention"))

    def compute_ssm_state(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(_NO_SSM.format("compute_ssm_state"))


_NO_SSM = "cache.{} applies to state-space (SSM) layers; a ViT has only attention and MLP blocks"
