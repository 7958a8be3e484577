"""HookedViT reproduces transformers' ViT, DeiT, DINOv2 and CLIP-vision models, all
parameters randomised, loaded from the instance and from a save_pretrained folder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed: pip install 'hooked-vit[hf]'")
import transformers as T

from conftest import images, randomize_
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
    "CLIPVisionModel": ("CLIPVisionConfig", dict(intermediate_size=96)),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", dict(intermediate_size=96, projection_dim=24)),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


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
    elif kind.startswith("Dinov2"):
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
    beit = T.BeitModel(T.BeitConfig(**SMALL, intermediate_size=96))
    with pytest.raises(UnsupportedModelError, match="relative position bias"):
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
