"""HookedViT reproduces transformers' video transformers (VideoMAE, ViViT, TimeSformer) with
every parameter randomised, LayerNorms included, on the fused and the explicit attention
path, loaded from the instance and from a save_pretrained folder (docs/video.md)."""

from __future__ import annotations

import einops
import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed: pip install 'hooked-vit[hf]'")
import transformers as T

from helpers import randomize_, rel_err
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.loading import UnsupportedModelError

RTOL = 1e-5
FRAMES, SIZE, PATCH = 4, 32, 8
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=SIZE,
             num_frames=FRAMES)

# id -> (class, config class, extra config)
VIDEO_MODELS = {
    "VideoMAEForVideoClassification": ("VideoMAEForVideoClassification", "VideoMAEConfig",
                                       dict(patch_size=PATCH, tubelet_size=2, num_labels=5)),
    "VideoMAEModel": ("VideoMAEModel", "VideoMAEConfig", dict(patch_size=PATCH, tubelet_size=2)),
    "VideoMAEModel-layernorm": ("VideoMAEModel", "VideoMAEConfig",
                                dict(patch_size=PATCH, tubelet_size=2, use_mean_pooling=False)),
    "VideoMAE-no-qv-bias": ("VideoMAEForVideoClassification", "VideoMAEConfig",
                            dict(patch_size=PATCH, tubelet_size=2, num_labels=5, qv_bias=False)),
    "VivitForVideoClassification": ("VivitForVideoClassification", "VivitConfig",
                                    dict(tubelet_size=(2, PATCH, PATCH), num_labels=5)),
    "VivitModel": ("VivitModel", "VivitConfig", dict(tubelet_size=(2, PATCH, PATCH))),
    "TimesformerForVideoClassification": ("TimesformerForVideoClassification", "TimesformerConfig",
                                          dict(patch_size=PATCH, num_labels=5)),
    "Timesformer-joint": ("TimesformerForVideoClassification", "TimesformerConfig",
                          dict(patch_size=PATCH, num_labels=5, attention_type="joint_space_time")),
    "TimesformerModel": ("TimesformerModel", "TimesformerConfig", dict(patch_size=PATCH)),
}


def make_hf(name: str, seed: int = 0) -> torch.nn.Module:
    kind, cfg_cls, extra = VIDEO_MODELS[name]
    config = getattr(T, cfg_cls)(**SMALL, **extra, attn_implementation="eager")
    kwargs = {"add_pooling_layer": False} if kind == "VivitModel" else {}
    return randomize_(getattr(T, kind)(config, **kwargs).eval(), seed=seed, std=0.2)


def clips(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def to_frame_major(hidden: torch.Tensor, name: str) -> torch.Tensor:
    """transformers' TimeSformer orders patch tokens ((row, col), time); HookedViT (time, (row, col))."""
    if not name.startswith("Timesformer"):
        return hidden
    patches = einops.rearrange(hidden[:, 1:], "b (s t) d -> b (t s) d", t=FRAMES)
    return torch.cat([hidden[:, :1], patches], dim=1)


def hf_reference(hf, name: str, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's output (logits, or the pooled vector HookedViT returns for a backbone) and
    each block's output in HookedViT's token order."""
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
    blocks = [to_frame_major(h, name) for h in out.hidden_states[1:]]
    if hasattr(out, "logits"):
        return out.logits, blocks
    last = to_frame_major(out.last_hidden_state, name)
    if name.startswith("VideoMAE"):  # no class token: the pooled vector is the mean token
        return last.mean(1), blocks
    return last[:, 0], blocks  # the class token after the final norm


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("name", list(VIDEO_MODELS))
def test_matches_transformers(name, explicit):
    hf = make_hf(name)
    x = clips()
    ref, ref_blocks = hf_reference(hf, name, x)
    model = HookedViT.from_hf(hf)
    names = lambda n: n.endswith("resid_post") or (explicit and n.endswith("hook_pattern"))
    with torch.no_grad():
        out, cache = model.run_with_cache(x, names_filter=names)
    assert ("blocks.0.attn.hook_pattern" in cache.keys()) == explicit
    assert out.shape == ref.shape and rel_err(out, ref) < RTOL
    for layer, block in enumerate(ref_blocks):
        assert rel_err(cache[f"blocks.{layer}.hook_resid_post"], block) < RTOL, f"block {layer}"


@pytest.mark.parametrize("name", ["VideoMAEForVideoClassification", "TimesformerForVideoClassification"])
def test_loads_from_a_saved_folder(name, tmp_path):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path)
    ref, _ = hf_reference(hf, name, clips())
    with torch.no_grad():
        assert rel_err(HookedViT.from_hf(str(tmp_path))(clips()), ref) < RTOL


def test_randomisation_reaches_every_parameter():
    for name in ("VideoMAEForVideoClassification", "TimesformerForVideoClassification"):
        hf = make_hf(name)
        constant = [n for n, p in hf.named_parameters() if bool((p == p.flatten()[0]).all())]
        assert not constant, constant


def test_divided_attention_hooks_are_grouped_and_separate():
    model = HookedViT.from_hf(make_hf("TimesformerForVideoClassification"))
    cfg = model.cfg
    assert (cfg.attention_type, cfg.pos_embed_type, cfg.n_time, cfg.n_ctx) == ("divided_space_time", "space_time", 4, 65)
    with torch.no_grad():
        _, cache = model.run_with_cache(clips())
    s, t, h = cfg.n_patches_per_frame, cfg.n_time, cfg.n_heads
    assert cache["blocks.0.attn_time.hook_pattern"].shape == (2, s, h, t, t)  # each (row, col) over time
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, t, h, 1 + s, 1 + s)  # each frame, with the cls token
    assert cache["blocks.0.attn_time.hook_q"].shape == (2, s, t, h, cfg.d_head)
    assert bool((cache["blocks.0.hook_attn_time_out"][:, 0] == 0).all())  # the class token takes no part in time
    resid_time = cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_time_out"]
    assert torch.allclose(cache["blocks.1.hook_resid_time"], resid_time)
    assert torch.allclose(cache["blocks.1.hook_resid_mid"], resid_time + cache["blocks.1.hook_attn_out"])


def test_an_edit_of_the_temporal_pattern_changes_the_output():
    """Hiding other frames in attn_time (its pattern set to the identity) is a real intervention."""
    model = HookedViT.from_hf(make_hf("TimesformerForVideoClassification"))

    def self_only(pattern, hook):
        return torch.eye(pattern.shape[-1]).expand_as(pattern)

    with torch.no_grad():
        clean = model(clips())
        edited = model.run_with_hooks(clips(), fwd_hooks=[("blocks.0.attn_time.hook_pattern", self_only)])
    assert rel_err(edited, clean) > 1e-3


@pytest.mark.parametrize("name", ["VideoMAEForVideoClassification", "TimesformerForVideoClassification",
                                  "VivitForVideoClassification"])
def test_weight_processing_keeps_the_logits(name):
    hf = make_hf(name)
    ref, _ = hf_reference(hf, name, clips())
    model = HookedViT.from_hf(hf, fold_ln=True, center_writing_weights=True)
    assert model.cfg.normalization_type == "LNPre"
    assert all(getattr(b, "ln_time", b.ln1).weight is None for b in model.blocks)
    with torch.no_grad():
        assert rel_err(model(clips()), ref) < RTOL


def test_config_and_input_refusals():
    with pytest.raises(ValueError, match="set num_frames"):
        HookedViTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_classes=2, tubelet_size=2)
    with pytest.raises(ValueError, match="multiple of tubelet_size"):
        HookedViTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_classes=2, num_frames=3, tubelet_size=2)
    model = HookedViT.from_hf(make_hf("TimesformerForVideoClassification"))
    with pytest.raises(ValueError, match=r"\[batch, frames, channels, height, width\]"):
        model(clips()[:, 0])
    with pytest.raises(ValueError, match="keep_mask"):
        model(clips(), keep_mask=torch.ones(2, model.cfg.n_ctx, dtype=torch.bool))
    with pytest.raises(ValueError, match="accumulated_bias"):
        model.accumulated_bias(1)


def test_refuses_unsupported_video_features():
    space_only = T.TimesformerForVideoClassification(T.TimesformerConfig(**SMALL, patch_size=PATCH,
                                                                        attention_type="space_only"))
    with pytest.raises(UnsupportedModelError, match="space_only"):
        HookedViT.from_hf(space_only)
    first_token = T.VideoMAEForVideoClassification(T.VideoMAEConfig(**SMALL, patch_size=PATCH, use_mean_pooling=False))
    with pytest.raises(UnsupportedModelError, match="use_mean_pooling=False"):
        HookedViT.from_hf(first_token)
    pooled = T.VivitModel(T.VivitConfig(**SMALL, tubelet_size=(2, PATCH, PATCH)))
    with pytest.raises(UnsupportedModelError, match="add_pooling_layer=False"):
        HookedViT.from_hf(pooled)


def test_videomae_positions_are_the_fixed_table():
    hf = make_hf("VideoMAEForVideoClassification")
    model = HookedViT.from_hf(hf)
    assert "embed.pos_table" not in model.state_dict()  # a buffer, as in transformers
    assert rel_err(model.W_pos, hf.videomae.embeddings.position_embeddings[0]) < 1e-6
    assert model.cfg.final_norm == "pooled" and model.ln_final.eps == 1e-5  # fc_norm's own eps


def test_tokens_know_time_row_and_col():
    from hooked_vit.tokens import frame_token_mask, token_coords, token_frames, token_index, token_labels

    vivit = HookedViT.from_hf(make_hf("VivitForVideoClassification"))  # tubelet 2: 2 time positions, 4x4 grid
    labels = token_labels(vivit)
    assert len(labels) == vivit.cfg.n_ctx == 1 + 2 * 16
    assert labels[0] == "cls" and labels[1] == "t0 patch (0, 0)" and labels[1 + 16 + 4 + 2] == "t1 patch (1, 2)"
    assert token_coords(vivit)[token_index(vivit, 1, 3, 0)] == (1, 3, 0)
    assert list(token_frames(vivit, 1)) == [2, 3]
    assert sum(frame_token_mask(vivit, [0])) == 16 and not frame_token_mask(vivit, [0])[0]
    # The layout is the embedding's: a change confined to frames 2-3 reaches only t1's tokens.
    x = clips()
    y = x.clone()
    y[:, 2:] += 1.0
    with torch.no_grad():
        _, c0 = vivit.run_with_cache(x, names_filter="hook_embed")
        _, c1 = vivit.run_with_cache(y, names_filter="hook_embed")
    changed = (c0["hook_embed"] - c1["hook_embed"]).abs().amax((0, 2)) > 0
    assert changed.tolist() == frame_token_mask(vivit, [1])
    with pytest.raises(ValueError, match="outside"):
        token_index(vivit, 2, 0, 0)


def test_per_head_results_add_up_in_both_attentions():
    model = HookedViT.from_hf(make_hf("TimesformerForVideoClassification"))
    with torch.no_grad():
        clean = model(clips())
        model.set_use_attn_result(True)
        out, cache = model.run_with_cache(clips())
    assert rel_err(out, clean) < RTOL
    result = cache["blocks.0.attn_time.hook_result"]  # [b, s, t, h, d]
    assert result.shape == (2, 16, 4, 4, 64)
    time_out = einops.rearrange(result.sum(-2) + model.blocks[0].attn_time.b_O, "b s t d -> b (t s) d")
    assert rel_err(time_out, cache["blocks.0.hook_attn_time_out"][:, 1:]) < RTOL
    model.set_use_attn_result(False)
    model.set_use_split_qkv_input(True)
    with pytest.raises(ValueError, match="per-head attention inputs"):
        model(clips())
