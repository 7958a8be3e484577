"""`ViTActivationCache`: TransformerLens's `ActivationCache`, with clear refusals for the
methods that do not apply to a Vision Transformer.

Every other public method is TransformerLens's own, running on what `HookedViT` exposes
(`cfg`, `blocks`, `ln_final`, `accumulated_bias`, `tokens_to_residual_directions`); see
https://transformerlensorg.github.io/TransformerLens/generated/code/transformer_lens.ActivationCache.html
"""

from __future__ import annotations

from typing import Any, NoReturn

from transformer_lens import ActivationCache

from hooked_vit.transformer_lens_api import canonical_hook_name


class ViTActivationCache(ActivationCache):
    """An `ActivationCache` of a `HookedViT` run. Hook-name aliases (`canonical_hook_name`)
    read the activation of the hook point they name."""

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(canonical_hook_name(key) if isinstance(key, str) else key)

    def __contains__(self, key: Any) -> bool:
        return (canonical_hook_name(key) if isinstance(key, str) else key) in self.cache_dict

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
