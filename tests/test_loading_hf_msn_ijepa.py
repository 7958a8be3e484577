"""HookedViT reproduces transformers' ViT-MSN and I-JEPA models (plain-ViT families; I-JEPA
has no class token and classifies the mean of its normed tokens), all parameters randomised."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed: pip install 'hooked-vit[hf]'")
import transformers as T

from helpers import images, randomize_, rel_err
from hooked_vit import HookedViT

SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
             intermediate_size=96, attn_implementation="eager")
KINDS = {"ViTMSNModel": "ViTMSNConfig", "ViTMSNForImageClassification": "ViTMSNConfig",
         "IJepaModel": "IJepaConfig", "IJepaForImageClassification": "IJepaConfig"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_transformers(kind, tmp_path):
    labels = {"num_labels": 7} if kind.endswith("Classification") else {}
    hf = randomize_(getattr(T, kind)(getattr(T, KINDS[kind])(**SMALL, **labels)).eval(), std=0.2)
    assert float(hf.state_dict()[next(k for k in hf.state_dict() if k.endswith("layernorm.bias"))].abs().max()) > 0
    x = images(32)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
    if kind.endswith("Classification"):
        ref = out.logits
    elif kind.startswith("IJepa"):
        ref = out.last_hidden_state.mean(1)  # what IJepaForImageClassification's head reads
    else:
        ref = out.last_hidden_state[:, 0]
    hf.save_pretrained(tmp_path)
    for source in (hf, str(tmp_path)):
        model = HookedViT.from_hf(source)
        assert model.cfg.class_token == kind.startswith("ViTMSN")
        assert model.cfg.n_ctx == out.hidden_states[0].shape[1]
        with torch.no_grad():
            logits, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("resid_post"))
        assert logits.shape == ref.shape and rel_err(logits, ref) < 1e-5
        for layer, hidden in enumerate(out.hidden_states[1:]):
            assert rel_err(cache["resid_post", layer], hidden) < 1e-5
