"""transformers' SigLIP and SigLIP 2 (hooked_vit.loading_hf_siglip), small configs with every
parameter randomised: exact within 1e-5 on the fused and explicit paths; SigLIP 2 with NaFlex
inputs of two aspect ratios in one padded batch, through its own processor and as plain images;
its per-image position resize equal to transformers'; the full two-tower models as image tower
plus text classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from helpers import randomize_, rel_err
from hooked_vit import HookedViT
from hooked_vit.naflex import from_spatial_shapes, pad_batch, patchify, resample_table

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
EXPLICIT = [("blocks.0.attn.hook_pattern", lambda t, hook: t), ("blocks.1.attn.hook_pattern", lambda t, hook: t)]


def explicit(model):
    hooks = list(EXPLICIT)
    if "attn_pool.hook_pattern" in model.hook_dict:
        hooks.append(("attn_pool.hook_pattern", lambda t, hook: t))
    return model.hooks(hooks)


def siglip(cls: str, v2: bool, **extra):
    vision = (transformers.Siglip2VisionConfig(num_patches=16, **SMALL) if v2
              else transformers.SiglipVisionConfig(image_size=32, **SMALL))
    if cls.endswith("VisionModel"):
        model = getattr(transformers, cls)(vision)
    else:
        config_cls = transformers.Siglip2Config if v2 else transformers.SiglipConfig
        model = getattr(transformers, cls)(config_cls(vision_config=vision.to_dict(), num_labels=5, **extra))
    return randomize_(model.eval(), seed=3)


def two_aspect_ratios():
    """A 3x5-patch and a 4x2-patch image (patch 8) padded to 16 patches."""
    gen = torch.Generator().manual_seed(4)
    imgs = [torch.randn(3, 24, 40, generator=gen), torch.randn(3, 32, 16, generator=gen)]
    batch = pad_batch(imgs, (8, 8), max_patches=16)
    shapes = torch.tensor([[3, 5], [4, 2]])
    return imgs, batch, shapes


@pytest.mark.parametrize("cls", ["SiglipVisionModel", "SiglipForImageClassification"])
def test_siglip_matches_both_paths(cls):
    hf = siglip(cls, v2=False)
    model = HookedViT.from_hf(hf)
    assert model.cfg.global_pool == ("map" if cls == "SiglipVisionModel" else "avg") and not model.cfg.class_token
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = hf(pixel_values=x)
        ref = out.pooler_output if cls == "SiglipVisionModel" else out.logits
        fused = model(x)
        with explicit(model):
            slow = model(x)
    assert fused.shape == ref.shape and rel_err(fused, ref) < 1e-5 and rel_err(slow, ref) < 1e-5


@pytest.mark.parametrize("cls", ["Siglip2VisionModel", "Siglip2ForImageClassification"])
def test_siglip2_naflex_two_aspect_ratios_both_paths(cls):
    hf = siglip(cls, v2=True)
    model = HookedViT.from_hf(hf)
    imgs, batch, shapes = two_aspect_ratios()
    with torch.no_grad():
        out = hf(pixel_values=batch.patches, pixel_attention_mask=batch.patch_valid.long(), spatial_shapes=shapes)
        ref = out.pooler_output if cls == "Siglip2VisionModel" else out.logits
        inputs = from_spatial_shapes(batch.patches, batch.patch_valid.long(), shapes)
        fused = model(inputs._asdict())
        with explicit(model):
            slow = model(inputs._asdict())
        alone = torch.cat([model(img[None]) for img in imgs])  # plain images, one at a time
    assert rel_err(fused, ref) < 1e-5 and rel_err(slow, ref) < 1e-5 and rel_err(alone, ref) < 1e-5


def test_siglip2_through_its_processor():
    """transformers' Siglip2ImageProcessor (aspect-preserving resize to <= max_num_patches,
    patchify, pad) feeds HF and HookedViT alike; hooked_vit's patchify is the processor's layout."""
    hf = siglip("Siglip2VisionModel", v2=True)
    model = HookedViT.from_hf(hf)
    proc = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (40, 72, 3), dtype=np.uint8), rng.integers(0, 256, (64, 30, 3), dtype=np.uint8)]
    inputs = proc(images=pics, return_tensors="pt")
    shapes = inputs["spatial_shapes"]
    assert shapes[0].tolist() != shapes[1].tolist()
    with torch.no_grad():
        ref = hf(**inputs).pooler_output
        ours = model(from_spatial_shapes(inputs["pixel_values"], inputs["pixel_attention_mask"], shapes)._asdict())
    assert rel_err(ours, ref) < 1e-5
    img = torch.randn(1, 3, 16, 24)
    assert torch.equal(patchify(img, (8, 8))[0], pad_batch([img[0]], (8, 8)).patches[0])


@pytest.mark.parametrize("shape", [(3, 5), (7, 2), (8, 8), (4, 4), (1, 9)])
def test_siglip2_position_resize_equals_transformers(shape):
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    table = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(6))
    ref = Siglip2VisionEmbeddings.resize_positional_embeddings(table, torch.tensor([shape]), max_length=64)
    model = HookedViT.from_hf(siglip("Siglip2VisionModel", v2=True))
    ours = resample_table(table.reshape(1, 16, 32), (4, 4), shape, model.cfg)[0]
    n = shape[0] * shape[1]
    assert float((ours - ref[0, :n]).abs().max()) < 1e-6


def char_tokenizer(texts):
    """Token ids [n, 16] from characters (offline; any fixed map serves equivalence)."""
    ids = torch.zeros(len(texts), 16, dtype=torch.long)
    for i, t in enumerate(texts):
        codes = [ord(c) % 49 + 1 for c in t][:16]
        ids[i, : len(codes)] = torch.tensor(codes)
    return ids


@pytest.mark.parametrize("cls", ["SiglipModel", "Siglip2Model"])
def test_full_siglip_models_image_tower_and_text_classes(cls):
    """The full model loads as its image tower (= get_image_features); its text tower's classes
    installed with scale = logit_scale.exp() give SigLIP's logits up to the per-image norm and the bias."""
    from hooked_vit.text_classes import install_text_classes, text_class_embeddings

    v2 = "2" in cls
    config = (transformers.Siglip2Config if v2 else transformers.SiglipConfig)(
        vision_config=dict(**SMALL, **({"num_patches": 16} if v2 else {"image_size": 32})),
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=50, max_position_embeddings=16))
    full = randomize_(getattr(transformers, cls)(config).eval(), seed=7)
    model = HookedViT.from_hf(full)
    names = ["cat", "dog", "bird"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        if v2:
            batch = pad_batch(list(x), (8, 8))
            image_inputs = dict(pixel_values=batch.patches, pixel_attention_mask=batch.patch_valid.long(),
                                spatial_shapes=torch.tensor([[4, 4], [4, 4]]))
        else:
            image_inputs = dict(pixel_values=x)
        feats = full.get_image_features(**image_inputs)
        feats = feats if torch.is_tensor(feats) else feats.pooler_output
        assert rel_err(model(x), feats) < 1e-5
        install_text_classes(model, text_class_embeddings(full, names, ("{}",), char_tokenizer),
                             scale=float(full.logit_scale.exp()), class_names=names)
        ref = full(input_ids=char_tokenizer(names), **image_inputs).logits_per_image
        ours = model(x) / feats.norm(dim=-1, keepdim=True) + full.logit_bias
    assert model.cfg.class_names == tuple(names) and rel_err(ours, ref) < 1e-5


def test_siglip2_folder_with_processor(tmp_path):
    hf = siglip("Siglip2ForImageClassification", v2=True)
    hf.save_pretrained(tmp_path)
    transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(tmp_path)
    model = HookedViT.from_hf(str(tmp_path))
    assert model.cfg.naflex and model.cfg.data_config["input_size"] == [3, 32, 32]
    _, batch, shapes = two_aspect_ratios()
    with torch.no_grad():
        ref = hf(pixel_values=batch.patches, pixel_attention_mask=batch.patch_valid.long(), spatial_shapes=shapes).logits
        assert rel_err(model(batch._asdict()), ref) < 1e-5
