"""Analyses that read the head, on the two read-outs beyond a plain Linear: CLIP's image
projection (with and without a text head on it) and DINOv2's [class, mean patch] head.
All parameters randomised (tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from circuits.decomposition.decompose import decompose, token_terms
from circuits.decomposition.segmentation import class_direction
from helpers import images, randomize_
from hooked_vit import HookedViT
from hooked_vit.text_classes import install_text_classes

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def clip_tower(text_classes: bool) -> HookedViT:
    pytest.importorskip("open_clip")
    from test_loading_open_clip import make_clip

    model = HookedViT.from_open_clip(make_clip("ViT-B-32"))
    if text_classes:
        install_text_classes(model, torch.randn(5, 24, generator=torch.Generator().manual_seed(0)))
    return model


def dinov2_classifier() -> HookedViT:
    T = pytest.importorskip("transformers")
    config = T.Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                         patch_size=8, mlp_ratio=2, num_register_tokens=2, num_labels=6)
    hf = randomize_(T.Dinov2WithRegistersForImageClassification(config).eval(), std=0.2)
    return HookedViT.from_hf(hf)


MODELS = {"clip": lambda: clip_tower(False), "clip+text": lambda: clip_tower(True), "dinov2_cls": dinov2_classifier}


@pytest.mark.parametrize("name", list(MODELS))
def test_decomposition_sums_to_the_logits(name):
    model, x = MODELS[name](), images(32, 3)
    dec = decompose(model, x)
    assert rel(dec.total(), dec.representation) < TOL
    logit_terms, comps = dec.logit_terms(model)
    with torch.no_grad():
        logits = model(x)
    assert dec.logits.shape == logits.shape and rel(logit_terms.sum(1), logits) < TOL
    for chunk in token_terms(model, x, dec, heads_per_chunk=2):
        idx = [dec.index("head", chunk.layer)[h] for h in chunk.heads]
        assert rel(chunk.terms.sum(3), dec.terms[:, idx].transpose(1, 2)) < TOL
    # The class direction dotted with the total representation is the class logit (no bias).
    classes = logits.argmax(-1)
    direction = class_direction(model, classes)
    torch.testing.assert_close((dec.flat().sum(1) * direction).sum(-1) + model.b_U[classes],
                               logits.gather(1, classes[:, None])[:, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("text_classes", [False, True], ids=["embedding", "text"])
def test_transformer_lens_logit_attribution_reads_the_projection(text_classes):
    """After fold_ln (TransformerLens's convention), `cache.logit_attrs` of the class token's
    residual components plus b_U are the logits: the projection is inside W_U."""
    model = clip_tower(text_classes).process_weights_()
    x = images(32, 3)
    out, cache = model.run_with_cache(x)
    stack = torch.cat([cache["blocks.0.hook_resid_pre"][None, :, 0],
                       cache.decompose_resid(incl_embeds=False, pos_slice=0)])  # ln_pre's output onwards
    targets = torch.tensor([0, 1, 2])
    attrs = cache.logit_attrs(stack, tokens=targets, pos_slice=0)  # [components, b]
    torch.testing.assert_close(attrs.sum(0) + model.b_U[targets], out[torch.arange(3), targets], rtol=1e-4, atol=1e-4)


def test_config_flags_build_the_read_out_and_refuse_inconsistent_ones():
    from hooked_vit import HookedViTConfig

    base = dict(d_model=32, n_layers=1, n_heads=2, d_mlp=64, img_size=16, patch_size=8)
    clip = HookedViT(HookedViTConfig(**base, n_classes=7, d_image_embed=12, head_on_image_embed=True))
    assert clip.image_proj.weight.shape == (12, 32) and clip.head.weight.shape == (7, 12)
    assert clip.W_U.shape == (32, 7) and "hook_image_embed" in clip.hook_dict
    embed_only = HookedViT(HookedViTConfig(**base, n_classes=12, d_image_embed=12))
    assert embed_only.head is None and embed_only(torch.randn(1, 3, 16, 16)).shape == (1, 12)
    dino = HookedViT(HookedViTConfig(**base, n_classes=5, global_pool="token_avg"))
    assert dino.head.in_features == 64 and dino(torch.randn(1, 3, 16, 16), return_type="pooled").shape == (1, 64)
    with pytest.raises(ValueError, match="must equal d_image_embed"):
        HookedViTConfig(**base, n_classes=5, d_image_embed=12)
    with pytest.raises(ValueError, match="needs an image projection"):
        HookedViTConfig(**base, n_classes=5, head_on_image_embed=True)
    with pytest.raises(ValueError, match="pool_include_prefix=False"):
        HookedViTConfig(**base, n_classes=5, global_pool="token_avg", pool_include_prefix=True)
    with pytest.raises(ValueError, match="per-token final norm"):
        HookedViTConfig(**base, n_classes=5, global_pool="token_avg", final_norm="pooled")
    with pytest.raises(ValueError, match="single pooled vector"):
        HookedViTConfig(**base, n_classes=12, d_image_embed=12, distilled=True)
    with pytest.raises(ValueError, match="single-vector CLIP tower"):
        install_text_classes(dino, torch.randn(3, 32))
