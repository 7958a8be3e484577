"""HookedViT reproduces transformers' BEiT, Data2Vec-vision, DINOv3 and AIMv2 vision models,
every parameter randomised (norm weights and biases, LayerScale, relative position tables,
register tokens, the pooling head), fused and explicit attention, from the instance and from a
save_pretrained folder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed: pip install 'hooked-vit[hf]'")
import transformers as T

from helpers import images, randomize_, rel_err
from hooked_vit import HookedViT
from hooked_vit.errors import UnsupportedModelError

RTOL = 1e-5
SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
             intermediate_size=96, attn_implementation="eager")
BEIT_BIASES = dict(use_relative_position_bias=True, use_absolute_position_embeddings=False)

# id -> (class, config class, config extras)
MODELS = {
    "beit-cls-relpos": ("BeitForImageClassification", "BeitConfig", dict(num_labels=7, **BEIT_BIASES)),
    "beit-cls-shared-abs": ("BeitForImageClassification", "BeitConfig",
                            dict(num_labels=7, use_shared_relative_position_bias=True,
                                 use_absolute_position_embeddings=True)),
    "beit-cls-both-token": ("BeitForImageClassification", "BeitConfig",
                            dict(num_labels=7, use_relative_position_bias=True, use_shared_relative_position_bias=True,
                                 use_mean_pooling=False, layer_scale_init_value=0.0)),
    "beit-model": ("BeitModel", "BeitConfig", dict(**BEIT_BIASES)),
    "data2vec-cls": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig",
                     dict(num_labels=7, **BEIT_BIASES)),
    "data2vec-shared": ("Data2VecVisionModel", "Data2VecVisionConfig", dict(use_shared_relative_position_bias=True)),
    "dinov3": ("DINOv3ViTModel", "DINOv3ViTConfig", dict(num_register_tokens=4)),
    "dinov3-swiglu": ("DINOv3ViTModel", "DINOv3ViTConfig",
                      dict(num_register_tokens=2, use_gated_mlp=True, hidden_act="silu", key_bias=True)),
    "dinov3-nobias": ("DINOv3ViTModel", "DINOv3ViTConfig",
                      dict(num_register_tokens=0, query_bias=False, value_bias=False, rope_theta=37.0)),
    "aimv2-head": ("Aimv2VisionModel", "Aimv2VisionConfig", dict(use_head=True, qkv_bias=True, mlp_bias=True)),
    "aimv2-nohead": ("Aimv2VisionModel", "Aimv2VisionConfig", dict(use_head=False)),
}


def make(key: str) -> torch.nn.Module:
    kind, cfg_cls, extra = MODELS[key]
    model = getattr(T, kind)(getattr(T, cfg_cls)(**SMALL, **extra)).eval()
    randomize_(model, std=0.2)
    with torch.no_grad():  # randomize_ treats "norm" names as norms; LayerScale / lambdas near 1 too
        for name, p in model.named_parameters():
            if name.endswith(("lambda_1", "lambda_2", "lambda1")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def reference(hf: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' output the HookedViT's logits equal, and each layer's hidden state."""
    blocks = []
    layers = [m for n, m in hf.named_modules() if type(m).__name__.endswith(("Layer", "EncoderLayer"))
              and n.split(".")[-1].isdigit()]
    handles = [m.register_forward_hook(lambda m, i, o: blocks.append(o[0] if isinstance(o, tuple) else o))
               for m in layers]
    with torch.no_grad():
        out = hf(pixel_values=x)
    for h in handles:
        h.remove()
    if getattr(out, "logits", None) is not None:
        final = out.logits
    elif getattr(out, "pooler_output", None) is not None:
        final = out.pooler_output
    elif type(hf).__name__ == "Aimv2VisionModel":  # without its head: the mean of the normed tokens
        final = out.last_hidden_state.mean(1)  # (HookedViT's choice, documented)
    else:  # a BEiT-like model without a pooler: the class token of last_hidden_state
        final = out.last_hidden_state[:, 0]
    return final, blocks


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_matches_transformers(key, explicit, tmp_path):
    hf = make(key)
    x = images(32)
    ref, ref_blocks = reference(hf, x)
    assert len(ref_blocks) == 2
    hf.save_pretrained(tmp_path)
    for source in (hf, str(tmp_path)):
        model = HookedViT.from_hf(source)
        names = lambda n: n.endswith("resid_post") or (explicit and n.endswith("hook_pattern"))
        with torch.no_grad():
            out, cache = model.run_with_cache(x, names_filter=names)
        assert ("blocks.0.attn.hook_pattern" in cache.keys()) == explicit
        assert out.shape == ref.shape and rel_err(out, ref) < RTOL, rel_err(out, ref)
        for layer, block in enumerate(ref_blocks):
            assert rel_err(cache[f"blocks.{layer}.hook_resid_post"], block) < RTOL, f"block {layer}"


def test_configs_read_the_family_features():
    beit = HookedViT.from_hf(make("beit-cls-relpos")).cfg
    assert beit.rel_pos_bias and beit.layer_scale and beit.global_pool == "avg" and beit.final_norm == "pooled"
    assert not beit.pos_embed and beit.n_classes == 7
    both = HookedViT.from_hf(make("beit-cls-both-token")).cfg
    assert both.global_pool == "token" and both.final_norm == "token" and not both.layer_scale
    dino = HookedViT.from_hf(make("dinov3-swiglu")).cfg
    assert dino.rope_type == "dinov3" and dino.n_reg_tokens == 2 and dino.mlp_type == "glu" and dino.layer_scale
    aim = HookedViT.from_hf(make("aimv2-head"))
    assert aim.cfg.norm_type == "rmsnorm" and aim.cfg.global_pool == "map" and not aim.cfg.class_token
    assert aim.attn_pool.q is None and aim.attn_pool.mlp is None and aim.attn_pool.hook_mlp_out is None


def test_shared_and_own_tables_sum_and_the_bias_hook_is_live():
    hf = make("beit-cls-both-token")
    model = HookedViT.from_hf(hf)
    shared = hf.beit.shared_position_bias.relative_position_bias_table
    own = hf.beit.layers[1].relative_position_bias.relative_position_bias_table
    torch.testing.assert_close(model.blocks[1].attn.rel_pos_table, shared + own, rtol=0, atol=0)
    x = images(32)
    with torch.no_grad():
        clean = model(x)
        edited = model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_rel_pos_bias", lambda b, hook: b * 0)])
    assert rel_err(edited, clean) > 1e-3  # an edit of the bias flows to the logits


def test_dinov3_rope_hooks_fire_and_registers_are_not_rotated():
    model = HookedViT.from_hf(make("dinov3"))
    with torch.no_grad():
        _, cache = model.run_with_cache(images(32), names_filter=lambda n: "blocks.0.attn.hook_" in n)
    q, rot = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_rot_q"]
    n_prefix = 1 + 4
    assert rot.shape == q.shape == (2, n_prefix + 16, 4, 12)
    torch.testing.assert_close(rot[:, :n_prefix], q[:, :n_prefix], rtol=0, atol=0)
    assert rel_err(rot[:, n_prefix:], q[:, n_prefix:]) > 1e-2


def test_dinov3_takes_other_image_sizes_as_transformers_does():
    hf = make("dinov3")
    model = HookedViT.from_hf(hf)
    x = torch.randn(2, 3, 48, 24, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(model(x), hf(pixel_values=x).pooler_output) < RTOL


def test_aimv2_pool_hooks_and_logit_lens_single_token():
    model = HookedViT.from_hf(make("aimv2-head"))
    x = images(32)
    with torch.no_grad():
        out, cache = model.run_with_cache(x, names_filter=lambda n: n.startswith("attn_pool."))
    assert cache["attn_pool.hook_pattern"].shape == (2, 4, 1, 16)
    torch.testing.assert_close(cache["attn_pool.hook_attn_out"], out, rtol=0, atol=0)
    # The pool applied to a one-token sequence is the value then the output projection.
    with torch.no_grad():
        tok = torch.randn(3, 48)
        v = model.attn_pool.kv(tok)[:, 48:]
        torch.testing.assert_close(model.attn_pool.single_token(tok), model.attn_pool.proj(v))


@pytest.mark.parametrize("key, processor", [("beit-cls-relpos", "BeitImageProcessor"),
                                            ("dinov3", "DINOv3ViTImageProcessor"), ("aimv2-head", "CLIPImageProcessor")])
def test_processor_is_read_from_the_folder(key, processor, tmp_path):
    make(key).save_pretrained(tmp_path)
    default = HookedViT.from_hf(str(tmp_path)).cfg.data_config  # no preprocessor_config.json: the family's defaults
    proc = getattr(T, processor)()
    assert default["mean"] == pytest.approx(list(proc.image_mean)) and default["input_size"] == [3, 32, 32]
    getattr(T, processor)(size={"height": 32, "width": 32}, do_center_crop=False, image_mean=[0.1, 0.2, 0.3],
                          image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    cfg = HookedViT.from_hf(str(tmp_path)).cfg.data_config
    assert cfg["mean"] == [0.1, 0.2, 0.3] and cfg["std"] == [0.4, 0.5, 0.6] and cfg["input_size"] == [3, 32, 32]


def test_class_names_from_id2label():
    hf = make("beit-cls-relpos")
    hf.config.id2label = {i: f"thing {i}" for i in range(7)}
    assert HookedViT.from_hf(hf).cfg.class_names == tuple(f"thing {i}" for i in range(7))


def test_refusals_name_the_feature():
    native = T.Aimv2VisionModel(T.Aimv2VisionConfig(**SMALL, is_native=True))
    with pytest.raises(UnsupportedModelError, match="is_native"):
        HookedViT.from_hf(native)
    seg = T.BeitForMaskedImageModeling(T.BeitConfig(**SMALL))
    with pytest.raises(UnsupportedModelError, match="masked image modelling"):
        HookedViT.from_hf(seg)


@pytest.mark.parametrize("key", ["beit-cls-relpos", "beit-cls-both-token", "dinov3", "dinov3-swiglu", "aimv2-head"])
def test_weight_processing_keeps_the_output_and_backward_hooks_fire(key):
    hf = make(key)
    x = images(32)
    ref, _ = reference(hf, x)
    rms = key.startswith("aimv2")  # centring is refused with RMSNorm (it removes no mean)
    model = HookedViT.from_hf(hf).process_weights_(fold_ln=True, center_writing_weights=not rms, fold_layer_scale=True)
    with torch.no_grad():
        assert rel_err(model(x), ref) < 1e-4  # a headless model keeps its final norm's affine map
    fired = []
    model.add_hook("blocks.0.hook_attn_out", lambda grad, hook: fired.append(grad.shape), dir="bwd")
    model(x.clone().requires_grad_(True)).sum().backward()
    model.reset_hooks()
    assert fired == [(2, model.cfg.n_ctx, 48)]


@pytest.mark.parametrize("key", ["beit-cls-both-token", "data2vec-cls", "dinov3-swiglu", "aimv2-head"])
def test_every_hook_fires_and_an_edit_at_each_reaches_the_output(key):
    model = HookedViT.from_hf(make(key))
    x = images(32)
    with torch.no_grad():
        clean, cache = model.run_with_cache(x)
    optional = ("hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in", "hook_mlp_in", "hook_result")
    assert set(cache.keys()) == {n for n in model.hook_dict if not n.endswith(optional)} | (
        {"attn_pool.hook_result"} if model.attn_pool is not None else set())
    for hook in cache.keys():  # not a multiple of the tensor: a norm would undo a scaling of its input
        with torch.no_grad():
            edited = model.run_with_hooks(x, fwd_hooks=[(hook, lambda t, hook: t * 1.5 + 0.1 * t.flip(-1))])
        assert not torch.allclose(edited, clean), f"an edit at {hook} did not reach the output"
