"""HookedViT reproduces transformers' ViT, DeiT, DINOv2 and CLIP-vision models, all
parameters randomised, loaded from the instance and from a save_pretrained folder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed: pip install 'hooked-vit[hf]'")
import transformers as T

from helpers import images, randomize_, rel_err
from hooked_vit import HookedViT
from hooked_vit.loading import UnsupportedModelError

RTOL = 1e-5
SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)

# class name -> (config class, extra config)
HF_MODELS = {
    "ViTForImageClassification": ("ViTConfig", dict(intermediate_size=96, num_labels=7)),
    "ViTModel": ("ViTConfig", dict(intermediate_size=96)),
    "DeiTModel": ("DeiTConfig", dict(intermediate_size=96)),
    "DeiTForImageClassification": ("DeiTConfig", dict(intermediate_size=96, num_labels=7)),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", dict(intermediate_size=96, num_labels=7)),
    "Dinov2Model": ("Dinov2Config", dict(mlp_ratio=2)),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", dict(mlp_ratio=2, num_register_tokens=4)),
    "Dinov2ForImageClassification": ("Dinov2Config", dict(mlp_ratio=2, num_labels=7)),
    "Dinov2WithRegistersForImageClassification": ("Dinov2WithRegistersConfig",
                                                  dict(mlp_ratio=2, num_register_tokens=4, num_labels=7)),
    "CLIPVisionModel": ("CLIPVisionConfig", dict(intermediate_size=96)),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", dict(intermediate_size=96, projection_dim=24)),
}


def make_hf(kind: str) -> torch.nn.Module:
    cfg_cls, extra = HF_MODELS[kind]
    config = getattr(T, cfg_cls)(**SMALL, **extra, attn_implementation="eager")
    kwargs = {"add_pooling_layer": False} if kind in ("ViTModel", "DeiTModel") else {}
    model = getattr(T, kind)(config, **kwargs).eval()
    # layer_scale1.lambda1 / layernorm: randomise_ treats names containing "norm" as norms.
    return randomize_(model, std=0.2)


def hf_reference(hf, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
    if kind.startswith("CLIPVisionModel"):
        final = out.image_embeds if kind.endswith("Projection") else out.pooler_output
    elif kind.startswith("Dinov2") and not kind.endswith("ForImageClassification"):
        final = out.pooler_output
    elif kind in ("ViTModel", "DeiTModel"):
        final = out.last_hidden_state[:, 0]  # the class token after the final norm
    else:
        final = out.logits
    return final, list(out.hidden_states[1:])


@pytest.fixture(params=list(HF_MODELS))
def kind(request):
    return request.param


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_matches_transformers(kind, explicit, tmp_path):
    hf = make_hf(kind)
    x = images(32)
    ref, ref_blocks = hf_reference(hf, kind, x)
    hf.save_pretrained(tmp_path)
    for source in (hf, str(tmp_path)):
        model = HookedViT.from_hf(source)
        names = lambda n: n.endswith("resid_post") or (explicit and n.endswith("hook_pattern"))
        with torch.no_grad():
            out, cache = model.run_with_cache(x, names_filter=names)
        assert ("blocks.0.attn.hook_pattern" in cache.keys()) == explicit
        assert out.shape == ref.shape
        assert rel_err(out, ref) < RTOL
        for layer, block in enumerate(ref_blocks):
            assert rel_err(cache[f"blocks.{layer}.hook_resid_post"], block) < RTOL, f"block {layer}"


def test_randomisation_reaches_norms_and_layer_scale():
    hf = make_hf("Dinov2Model")
    ones = [n for n, p in hf.named_parameters() if bool((p == 1).all()) or bool((p == 0).all())]
    assert not ones


def test_preprocessing_from_image_processor(tmp_path):
    hf = make_hf("ViTForImageClassification")
    hf.save_pretrained(tmp_path)
    T.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3],
                        image_std=[0.4, 0.5, 0.6], resample=3).save_pretrained(tmp_path)
    cfg = HookedViT.from_hf(str(tmp_path)).cfg.data_config
    assert cfg == HookedViT.from_hf(T.ViTForImageClassification.from_pretrained(tmp_path)).cfg.data_config
    assert cfg["mean"] == [0.1, 0.2, 0.3] and cfg["std"] == [0.4, 0.5, 0.6]
    assert cfg["interpolation"] == "bicubic" and cfg["input_size"] == [3, 32, 32]


def test_refuses_unsupported_features():
    beit = T.BeitForMaskedImageModeling(T.BeitConfig(**SMALL, intermediate_size=96))
    with pytest.raises(UnsupportedModelError, match="masked image modelling"):
        HookedViT.from_hf(beit)
    pooled = T.ViTModel(T.ViTConfig(**SMALL, intermediate_size=96))  # tanh pooler by default
    with pytest.raises(UnsupportedModelError, match="add_pooling_layer=False"):
        HookedViT.from_hf(pooled)
    swiglu = T.Dinov2Model(T.Dinov2Config(**SMALL, use_swiglu_ffn=True))
    with pytest.raises(UnsupportedModelError, match="SwiGLU"):
        HookedViT.from_hf(swiglu)


def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also for the copy huggingface_hub read at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_hub_id_not_cached_says_pass_a_folder(monkeypatch, tmp_path):
    offline(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="local folder written by save_pretrained"):
        HookedViT.from_hf("someone/not-a-cached-model")


@pytest.mark.parametrize("kind", ["Dinov2WithRegistersModel", "DeiTForImageClassificationWithTeacher",
                                  "CLIPVisionModelWithProjection"])
def test_transformer_lens_cache_tools(kind):
    model = HookedViT.from_hf(make_hf(kind))
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(images(32))
    last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    heads = cache.stack_head_results(incl_remainder=True)
    torch.testing.assert_close(heads.sum(0), last, rtol=1e-5, atol=1e-5)
    parts = cache.decompose_resid(incl_embeds=False)
    torch.testing.assert_close(parts.sum(0) + cache["blocks.0.hook_resid_pre"], last, rtol=1e-5, atol=1e-5)
    assert cache.accumulated_resid().shape[0] == model.cfg.n_layers + 1


@pytest.mark.parametrize("kind", ["ViTForImageClassification", "CLIPVisionModelWithProjection"])
def test_weight_processing_on_hf_models(kind):
    hf = make_hf(kind)
    model = HookedViT.from_hf(hf).process_weights_()
    with torch.no_grad():
        ref, _ = hf_reference(hf, kind, images(32))
        assert rel_err(model(images(32)), ref) < 1e-4


def test_hub_id_in_the_local_cache_loads_offline(monkeypatch, tmp_path):
    """A hub id whose files are in the cache (the layout huggingface_hub writes) loads offline."""
    offline(monkeypatch)
    hf = make_hf("ViTForImageClassification")
    snapshot = tmp_path / "models--someone--tiny-vit" / "snapshots" / ("0" * 40)
    hf.save_pretrained(snapshot)
    T.ViTImageProcessor(image_mean=[0.1, 0.2, 0.3]).save_pretrained(snapshot)
    (tmp_path / "models--someone--tiny-vit" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-vit" / "refs" / "main").write_text("0" * 40)
    model = HookedViT.from_pretrained("hf:someone/tiny-vit", cache_dir=str(tmp_path))
    assert model.cfg.data_config["mean"] == [0.1, 0.2, 0.3]
    with torch.no_grad():
        assert rel_err(model(images(32)), hf(pixel_values=images(32)).logits) < RTOL


@pytest.mark.parametrize("kind", ["Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"])
def test_dinov2_classifier_reads_class_and_mean_patch_token(kind):
    hf = make_hf(kind)
    model = HookedViT.from_hf(hf)
    x = images(32)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        logits, cache = model.run_with_cache(x, names_filter="hook_pooled")
    assert model.cfg.global_pool == "token_avg" and model.head.in_features == 96
    with torch.no_grad():
        tokens = hf.base_model.layernorm(out.hidden_states[-1])  # last_hidden_state
    first_patch = 1 + model.cfg.n_reg_tokens  # registers are not averaged
    expected = torch.cat([tokens[:, 0], tokens[:, first_patch:].mean(1)], -1)
    assert cache["hook_pooled"].shape == (2, 96) and rel_err(cache["hook_pooled"], expected) < RTOL
    assert rel_err(logits, out.logits) < RTOL
    with pytest.raises(ValueError, match="no logit lens"):
        model.W_U
    from circuits.projection import project_batch

    with pytest.raises(ValueError, match="token_avg"):
        project_batch(model, x)
    with torch.no_grad():  # the folded final norm acts on both halves of the head's input
        assert rel_err(model.process_weights_()(x), out.logits) < 1e-4


def test_dinov2_classifier_without_labels_returns_the_concatenation():
    hf = make_hf("Dinov2ForImageClassification")
    hf.classifier = torch.nn.Identity()  # transformers' num_labels=0
    with torch.no_grad():
        assert rel_err(HookedViT.from_hf(hf)(images(32)), hf(pixel_values=images(32)).logits) < RTOL


def test_dinov2_classifier_keep_mask_averages_kept_patches_only():
    model = HookedViT.from_hf(make_hf("Dinov2WithRegistersForImageClassification"))
    x = images(32)
    keep = torch.ones(2, model.cfg.n_ctx, dtype=torch.bool)
    keep[:, -3:] = False  # drop three patches
    with torch.no_grad():
        pooled = model(x, keep_mask=keep, return_type="pooled")
        resid = model(x, keep_mask=keep, return_type="resid")
    d, first = model.cfg.d_model, 1 + model.cfg.n_reg_tokens
    tokens = model.ln_final(resid)
    n_kept = int(keep[0].sum())
    torch.testing.assert_close(pooled[:, d:], tokens[:, first:n_kept].mean(1), rtol=1e-5, atol=1e-6)
    keep[:, 0] = False
    with pytest.raises(ValueError, match="class"):
        model(x, keep_mask=keep)


def test_clip_projection_is_its_own_hook():
    hf = make_hf("CLIPVisionModelWithProjection")
    model = HookedViT.from_hf(hf)
    x = images(32)
    with torch.no_grad():
        out = hf(pixel_values=x)
        logits, cache = model.run_with_cache(x, names_filter=["hook_pooled", "hook_image_embed"])
    assert model.cfg.d_image_embed == 24 and model.head is None and model.image_proj.bias is None
    pooler = hf.vision_model(pixel_values=x).pooler_output  # post_layernorm(class token)
    assert rel_err(cache["hook_pooled"], pooler) < RTOL
    assert rel_err(cache["hook_image_embed"], out.image_embeds) < RTOL and torch.equal(logits, cache["hook_image_embed"])
