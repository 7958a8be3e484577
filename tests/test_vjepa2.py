"""V-JEPA 2 (transformers' VJEPA2Model and VJEPA2ForVideoClassification) as configuration of
HookedViT: tubelet embedding, 3D RoPE over (time, row, col) (rope_type="3d"), the final norm,
and the classifier's attentive probe as the MAP head's options; exact with every parameter
randomised, on the fused and the explicit attention path (docs/video.md)."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed: pip install 'hooked-vit[hf]'")
import transformers as T

from helpers import randomize_, rel_err
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.errors import UserError

RTOL = 1e-5
FRAMES, SIZE = 4, 32
SMALL = dict(crop_size=SIZE, frames_per_clip=FRAMES, patch_size=8, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=2,
             num_pooler_layers=2, attn_implementation="eager")


def make_hf(kind: str = "VJEPA2ForVideoClassification", seed: int = 0, **extra) -> torch.nn.Module:
    config = T.VJEPA2Config(**{**SMALL, **extra}, num_labels=5)
    return randomize_(getattr(T, kind)(config).eval(), seed=seed, std=0.2)


def clips(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def reference(hf: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' output (logits, or the normed tokens of VJEPA2Model) and each block's output."""
    with torch.no_grad():
        if isinstance(hf, T.VJEPA2ForVideoClassification):
            out = hf(pixel_values_videos=x, output_hidden_states=True)
            return out.logits, list(out.hidden_states[1:])
        out = hf(pixel_values_videos=x, skip_predictor=True, output_hidden_states=True)
        return out.last_hidden_state, list(out.hidden_states[1:])  # [0] is the embedding


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("kind", ["VJEPA2Model", "VJEPA2ForVideoClassification"])
def test_matches_transformers(kind, explicit):
    hf, x = make_hf(kind), clips()
    ref, ref_blocks = reference(hf, x)
    model = HookedViT.from_hf(hf)
    assert model.cfg.rope_type == "3d" and model.cfg.n_ctx == 2 * 16 and not model.cfg.class_token
    wanted = lambda n: n.endswith(("resid_post", "ln_final.hook_normalized")) or (explicit and n.endswith("hook_pattern"))
    with torch.no_grad():
        out, cache = model.run_with_cache(x, names_filter=wanted)
    assert ("blocks.0.attn.hook_pattern" in cache.keys()) == explicit
    if kind == "VJEPA2ForVideoClassification":
        assert ("attn_pool.hook_pattern" in cache.keys()) == explicit
        assert ("attn_pool.blocks.1.attn.hook_pattern" in cache.keys()) == explicit
        assert out.shape == ref.shape == (2, 5) and rel_err(out, ref) < RTOL
    else:  # the encoder's normed tokens; the pooled vector is their mean
        assert rel_err(cache["ln_final.hook_normalized"], ref) < RTOL
        assert rel_err(out, ref.mean(1)) < RTOL
    assert len(ref_blocks) == model.cfg.n_layers
    for layer, block in enumerate(ref_blocks):
        assert rel_err(cache[f"blocks.{layer}.hook_resid_post"], block) < RTOL, f"block {layer}"


def test_head_dims_not_divisible_by_six_and_three_pooler_layers():
    """d_head 20: three rotated segments of 6 dims and 2 left unrotated; 3 probe layers."""
    hf = make_hf(hidden_size=40, num_attention_heads=2, num_pooler_layers=3, mlp_ratio=2.0, qkv_bias=False)
    ref, _ = reference(hf, clips())
    model = HookedViT.from_hf(hf)
    assert model.cfg.attn_pool_layers == 3 and model.cfg.d_mlp == 80 and model.cfg.attn_pool_d_mlp == 160
    with torch.no_grad():
        assert rel_err(model(clips()), ref) < RTOL


def test_loads_from_a_saved_folder(tmp_path, caplog):
    hf = make_hf()
    hf.save_pretrained(tmp_path)
    ref, _ = reference(hf, clips())
    with caplog.at_level(logging.INFO, logger="hooked_vit"):
        model = HookedViT.from_hf(str(tmp_path))
    assert "predictor" in caplog.text and "not loaded" in caplog.text  # said, not silent
    # no preprocessor_config.json: VJEPA2VideoProcessor's defaults at the model's size (said too)
    assert "VJEPA2VideoProcessor" in caplog.text
    data = model.cfg.data_config
    assert data["mean"] == pytest.approx([0.485, 0.456, 0.406]) and data["input_size"] == [3, SIZE, SIZE]
    assert data["resize"] == {"shortest_edge": int(SIZE * 256 / 224)} and data["center_crop"]
    with torch.no_grad():
        assert rel_err(model(clips()), ref) < RTOL


def test_reads_the_video_processor_of_a_folder(tmp_path):
    hf = make_hf("VJEPA2Model")
    hf.save_pretrained(tmp_path)
    T.VJEPA2VideoProcessor(crop_size=SIZE, image_mean=[0.1, 0.2, 0.3]).save_pretrained(tmp_path)
    assert (tmp_path / "video_preprocessor_config.json").is_file()
    data = HookedViT.from_hf(str(tmp_path)).cfg.data_config
    assert data["mean"] == pytest.approx([0.1, 0.2, 0.3]) and data["input_size"] == [3, SIZE, SIZE]


def test_loads_a_folder_without_predictor_weights_but_not_one_without_the_probe(tmp_path):
    from safetensors.torch import load_file, save_file

    from hooked_vit.loading import UnsupportedModelError

    hf = make_hf()
    ref, _ = reference(hf, clips())
    for name, dropped in (("no_predictor", ".predictor."), ("no_probe", "pooler.")):
        hf.save_pretrained(tmp_path / name)
        weights = tmp_path / name / "model.safetensors"
        state = load_file(weights)
        save_file({k: v for k, v in state.items() if dropped not in k}, weights, metadata={"format": "pt"})
    with torch.no_grad():
        assert rel_err(HookedViT.from_hf(str(tmp_path / "no_predictor"))(clips()), ref) < RTOL
    with pytest.raises(UnsupportedModelError, match="lacks weights.*pooler"):  # the probe would be random
        HookedViT.from_hf(str(tmp_path / "no_probe"))


def test_randomisation_reaches_every_loaded_parameter():
    hf = make_hf()
    constant = [n for n, p in hf.named_parameters() if bool((p == p.flatten()[0]).all())]
    assert not constant, constant
    model = HookedViT.from_hf(hf)
    encoder_and_probe = sum(p.numel() for n, p in hf.named_parameters() if ".predictor." not in n)
    assert model.n_params == encoder_and_probe  # everything but the predictor, nothing invented


def test_rope_table_layout():
    """The 3D table: segment k of each head rotates by the token's k-th coordinate."""
    from hooked_vit.rope import build_rope
    from hooked_vit.tokens import token_coords

    model = HookedViT.from_hf(make_hf())
    table = build_rope(model.cfg).get_embed()  # [n, 2 * d_head]: sin, cos
    e, a = model.cfg.d_head, 4  # 2 * ((16 // 3) // 2)
    sin, cos = table[:, :e], table[:, e:]
    coords = torch.tensor([c for c in token_coords(model) if c is not None], dtype=torch.float32)
    for axis in range(3):
        assert torch.allclose(sin[:, axis * a], torch.sin(coords[:, axis]))  # omega_0 = 1
        assert torch.allclose(sin[:, axis * a + 2], torch.sin(coords[:, axis]))  # repeated, not interleaved
        assert torch.allclose(sin[:, axis * a + 1], torch.sin(coords[:, axis] / 100.0))  # omega_1 = 10000^-1/2
    assert bool((sin[:, 3 * a:] == 0).all()) and bool((cos[:, 3 * a:] == 1).all())  # the unrotated rest
    model.to(torch.float64)  # the table is a buffer: it moves with the model, as timm's rotary tables do
    assert model.rope.table.dtype == torch.float64 and "rope.table" not in model.state_dict()
    with pytest.raises(UserError, match="rope_options"):
        HookedViTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_classes=0, class_token=False, global_pool="avg",
                        rope_type="3d", rope_options={"dim": 4})


def test_an_edit_at_the_rotated_query_reaches_the_logits_and_gradients_flow():
    model = HookedViT.from_hf(make_hf())
    x = clips()

    def swap_time(rot_q, hook):  # the queries of the two time positions exchanged
        return torch.cat([rot_q[:, 16:], rot_q[:, :16]], dim=1)

    with torch.no_grad():
        clean = model(x)
        edited = model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_rot_q", swap_time)])
    assert rel_err(edited, clean) > 1e-3
    grads = {}

    def keep(grad, hook):
        grads[hook.name] = grad[0] if isinstance(grad, tuple) else grad

    names = ["blocks.0.attn.hook_rot_q", "blocks.1.attn.hook_rot_k", "attn_pool.hook_pattern",
             "attn_pool.blocks.0.attn.hook_v", "attn_pool.ln_kv.hook_normalized"]
    with model.hooks(bwd_hooks=[(n, keep) for n in names]):
        model(x, return_type="loss", targets=torch.tensor([0, 3])).backward()
    assert set(grads) == set(names) and all(bool(g.abs().sum() > 0) for g in grads.values())


def test_probe_hooks_and_logit_lens():
    model = HookedViT.from_hf(make_hf())
    model.set_use_attn_result(True)
    with torch.no_grad():
        logits, cache = model.run_with_cache(clips())
    h, p, d = model.cfg.attn_pool_heads, model.cfg.n_ctx, model.cfg.d_model
    assert cache["attn_pool.hook_q"].shape == (2, 1, h, d // h)
    assert cache["attn_pool.hook_k"].shape == (2, p, h, d // h)
    assert cache["attn_pool.hook_pattern"].shape == (2, h, 1, p)
    assert cache["attn_pool.blocks.0.attn.hook_pattern"].shape == (2, h, p, p)
    assert cache["attn_pool.blocks.0.attn.hook_result"].shape == (2, p, h, d)  # the model's switch reaches the probe
    # no output projection: each head's result is its z in its own slice; they sum to attn_out
    assert torch.allclose(cache["attn_pool.hook_result"].sum(1), cache["attn_pool.hook_attn_out"], atol=1e-6)
    pooled = model.attn_pool.latent[0, 0] + cache["attn_pool.hook_attn_out"] + cache["attn_pool.hook_mlp_out"]
    assert torch.allclose(pooled, cache["hook_pooled"], atol=1e-5)
    # the logit lens reads a vector as the probe reads a one-token sequence
    one = cache["blocks.1.hook_resid_post"][:, :1]
    with torch.no_grad():
        single = model.pool(one)
        assert rel_err(model.to_class_logits(one[:, 0]), model.unembed(single)) < RTOL


def test_weight_processing():
    hf = make_hf("VJEPA2Model")
    ref, _ = reference(hf, clips())
    model = HookedViT.from_hf(hf, fold_ln=True, center_writing_weights=True)
    assert all(b.ln1.weight is None and b.ln2.weight is None for b in model.blocks)
    assert model.ln_final.weight is not None  # no head reads it: its affine part is part of the features
    with torch.no_grad():  # folding and centring leave the encoder's features unchanged
        assert rel_err(model(clips()), ref.mean(1)) < RTOL
    with pytest.raises(UserError, match="attentive probe"):
        HookedViT.from_hf(make_hf(), fold_ln=True)
    hf = make_hf()
    ref, _ = reference(hf, clips())
    with torch.no_grad():  # centring the encoder's writes: the final norm's output, so the probe's input, is unchanged
        assert rel_err(HookedViT.from_hf(hf, center_writing_weights=True)(clips()), ref) < RTOL
    with pytest.raises(UserError, match="global_pool='map'"):
        HookedViTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_classes=2, attn_pool_layers=1)


def test_token_removal_matches_the_masked_encoder():
    """keep_mask keeps each token's own 3D rotation: transformers' layers run on the kept tokens
    with their original indices as position ids (`position_mask`, the V-JEPA masked encoder),
    then the probe on them; rows keep different numbers of tokens (padding masked in the probe)."""
    hf, x = make_hf(), clips()
    model = HookedViT.from_hf(hf)
    g = torch.Generator().manual_seed(3)
    kept = [torch.randperm(32, generator=g)[:n].sort().values for n in (20, 11)]
    mask = torch.zeros(2, 32, dtype=torch.bool)
    for row, ids in enumerate(kept):
        mask[row, ids] = True
    with torch.no_grad():
        out = model(x, keep_mask=mask)
        for row, ids in enumerate(kept):
            h = hf.vjepa2.encoder.embeddings(x[row:row + 1])[:, ids]
            for layer in hf.vjepa2.encoder.layer:
                h = layer(h, ids[None])[0]
            ref = hf.classifier(hf.pooler(hf.vjepa2.encoder.layernorm(h)))
            assert rel_err(out[row:row + 1], ref) < RTOL, f"row {row}"


@pytest.mark.gpu
def test_cuda_matches_transformers():
    hf = make_hf().cuda()
    model = HookedViT.from_hf(hf)
    x = clips().cuda()
    with torch.no_grad():
        ref = hf(pixel_values_videos=x).logits
        fused = model(x)
        explicit = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda a, hook: a)])
    assert model.rope.table.is_cuda
    for out in (fused, explicit):
        assert rel_err(out, ref) < 1e-4  # TF32 may be on
