"""The newer ViT families (SigLIP MAP heads; EVA02 / DINOv3 RoPE, registers, SwiGLU, sub-LN):
new hook points live (edits flow, backward hooks fire), token removal with RoPE positions
following the kept tokens (against timm's own patch-dropout path), and every analysis run
on them (exact, or refused with its reason)."""

from __future__ import annotations

import pytest
import torch

import zoo
from hooked_vit import HookedViT
from hooked_vit.errors import UnsupportedModelError

SIGLIP = "vit_base_patch16_siglip_224"  # MAP head
EVA02 = "eva02_base_patch14_224"  # RoPE (cat), SwiGLU, sub-LN in the MLP, avg pool
DINOV3 = "vit_small_plus_patch16_dinov3"  # RoPE (dinov3), 4 registers, LayerScale, SwiGLU
BEIT = "beitv2_base_patch16_224"  # relative position bias, LayerScale, q/v biases
NAMES = (SIGLIP, EVA02, DINOV3, BEIT)
TOL = 1e-5

_CACHE: dict[str, tuple] = {}


def built(name: str):
    if name not in _CACHE:
        timm_model, size = zoo.small_variant(name)
        model = HookedViT.from_timm(timm_model)
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
        _CACHE[name] = timm_model, model, x
    return _CACHE[name]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_families_have_their_options():
    assert built(SIGLIP)[1].cfg.global_pool == "map"
    eva = built(EVA02)[1].cfg
    assert eva.rope_type == "cat" and eva.mlp_type == "glu" and eva.mlp_norm
    dino = built(DINOV3)[1].cfg
    assert dino.rope_type == "dinov3" and dino.n_reg_tokens == 4 and dino.layer_scale and dino.mlp_type == "glu"


NEW_HOOKS = {
    SIGLIP: {"attn_pool.hook_q": (2, 1, 4, 16), "attn_pool.hook_k": (2, 12, 4, 16),
             "attn_pool.hook_pattern": (2, 4, 1, 12), "attn_pool.hook_z": (2, 1, 4, 16),
             "attn_pool.hook_result": (2, 4, 64), "attn_pool.hook_attn_out": (2, 64),
             "attn_pool.hook_mlp_out": (2, 64)},
    EVA02: {"blocks.0.attn.hook_rot_q": (2, 13, 4, 16), "blocks.1.attn.hook_rot_k": (2, 13, 4, 16),
            "blocks.0.mlp.hook_pre_linear": None, "blocks.0.mlp.ln.hook_normalized": None},
    DINOV3: {"blocks.0.attn.hook_rot_q": (2, 17, 4, 16), "blocks.0.mlp.hook_pre": None},
    BEIT: {"blocks.0.attn.hook_rel_pos_bias": (1, 4, 13, 13)},
}


@pytest.mark.parametrize("name", NAMES)
def test_new_hooks_fire_with_shapes_and_edits_flow(name):
    _, model, x = built(name)
    with torch.no_grad():
        clean, cache = model.run_with_cache(x)
    optional = ("hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in", "hook_mlp_in", "hook_result")
    assert set(cache.keys()) == {n for n in model.hook_dict if not n.endswith(optional)} | (
        {"attn_pool.hook_result"} if model.attn_pool is not None else set())
    for hook, shape in NEW_HOOKS[name].items():
        assert shape is None or tuple(cache[hook].shape) == shape, hook
        with torch.no_grad():
            edited = model.run_with_hooks(x, fwd_hooks=[(hook, lambda t, hook: t.flip(-1))])
        assert not torch.allclose(edited, clean), f"an edit at {hook} did not reach the logits"


@pytest.mark.parametrize("name", NAMES)
def test_backward_hooks_fire_on_new_hooks(name):
    _, model, x = built(name)
    seen = []
    hooks = [(h, lambda g, hook: seen.append(hook.name)) for h in NEW_HOOKS[name]]
    with model.hooks(bwd_hooks=hooks):
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    assert set(seen) == set(NEW_HOOKS[name])


@pytest.mark.parametrize("name", NAMES)
def test_fused_and_explicit_attention_match_timm(name):
    timm_model, model, x = built(name)
    with torch.no_grad():
        ref = timm_model(x)
        assert rel(model(x), ref) < TOL
        names = lambda n: n.endswith("hook_pattern")
        logits, cache = model.run_with_cache(x, names_filter=names)
    assert rel(logits, ref) < TOL and len(cache.keys()) >= model.cfg.n_layers


class _KeepIndices(torch.nn.Module):
    """timm's PatchDropoutWithIndices with chosen patches kept instead of random ones."""

    def __init__(self, keep: torch.Tensor, n_prefix: int):
        super().__init__()
        self.keep, self.n_prefix = keep, n_prefix

    def forward(self, x):
        prefix, patches = x[:, : self.n_prefix], x[:, self.n_prefix:]
        kept = torch.gather(patches, 1, self.keep[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([prefix, kept], 1), self.keep


@pytest.mark.parametrize("name", (EVA02, DINOV3))
def test_token_removal_rope_positions_follow_kept_tokens(name):
    """keep_mask removes tokens and each kept patch keeps its own rotary position: equal to
    timm's patch-dropout path (which gathers the rotary table at the kept indices)."""
    timm_model, model, x = built(name)
    n_prefix, n_patches = model.cfg.n_prefix_tokens, model.cfg.n_patches
    keep_idx = torch.tensor([[0, 2, 3, 7, 11], [1, 4, 5, 6, 10]])
    keep_mask = torch.zeros(2, n_prefix + n_patches, dtype=torch.bool)
    keep_mask[:, :n_prefix] = True
    keep_mask.scatter_(1, keep_idx + n_prefix, True)
    timm_model.patch_drop = _KeepIndices(keep_idx, n_prefix)
    try:
        with torch.no_grad():
            ref = timm_model(x)
    finally:
        timm_model.patch_drop = None
    with torch.no_grad():
        ours = model(x, keep_mask=keep_mask)
        # The same tokens at the positions 0..k-1 (RoPE not following them) differ:
        resid = model.embed_images(x)[keep_mask].view(2, n_prefix + 5, -1)
        shifted = model(resid, start_at_layer=0, positions=torch.arange(n_prefix + 5).expand(2, -1))
    assert rel(ours, ref) < TOL
    assert rel(shifted, ref) > 1e-3


def test_map_logit_lens_is_the_head_on_the_token_alone():
    """The logit lens of a MAP model reads a vector as the head reads a one-token sequence."""
    _, model, x = built(SIGLIP)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter="blocks.1.hook_resid_post")
        resid = cache["blocks.1.hook_resid_post"]
        lens = model.to_class_logits(resid)  # [b, p, c]
        token = model.ln_final(resid[:, 5:6])  # one-token sequence through the hooked head
        alone = model.head(model.attn_pool(token))
    assert lens.shape == (2, resid.shape[1], model.cfg.n_classes)
    assert rel(lens[:, 5], alone) < TOL


@pytest.mark.parametrize("name", NAMES)
def test_identifiability_and_perturbations_run(name):
    from circuits.interventions import perturbation_hooks
    from circuits.token_removal import last_block_ranks

    _, model, x = built(name)
    targets = torch.tensor([1, 2])
    rank, pred = last_block_ranks(model, x, targets)
    assert rank.shape == (2, model.cfg.n_ctx) and int(rank.min()) >= 0
    with torch.no_grad():
        clean = model(x)
        for kind in ("self_only", "no_cls") if model.cfg.class_token else ("self_only",):
            perturbed = model.run_with_hooks(x, fwd_hooks=perturbation_hooks(model, kind))
            assert torch.isfinite(perturbed).all() and not torch.allclose(perturbed, clean)


@pytest.mark.parametrize("name", NAMES)
def test_patching_runs_and_clean_patch_restores(name):
    from circuits.patching import patch_activations

    _, model, x = built(name)
    grid = patch_activations(model, x, x.flip(0), "resid_pre", layers=[1], clean_targets=torch.tensor([1, 2]),
                             corrupted_targets=torch.tensor([2, 1]))
    assert torch.isfinite(torch.as_tensor(grid.values if hasattr(grid, "values") else grid.scores)).all()


@pytest.mark.parametrize("name", (EVA02, DINOV3, BEIT))
def test_decomposition_exact(name):
    from circuits.decomposition.decompose import decompose

    _, model, x = built(name)
    dec = decompose(model, x)
    assert ((dec.total() - dec.representation).norm() / dec.representation.norm()) < TOL
    logit_terms, _ = dec.logit_terms(model)
    assert rel(logit_terms.sum(1), dec.logits) < 1e-4


def test_decomposition_refuses_map_with_reason():
    from circuits.decomposition.decompose import decompose

    _, model, x = built(SIGLIP)
    with pytest.raises(UnsupportedModelError, match="attention-pooling"):
        decompose(model, x)


@pytest.mark.parametrize("name", NAMES)
def test_memories_run(name):
    from circuits.memories import class_value_agreement

    _, model, _ = built(name)
    table = class_value_agreement(model)
    assert len(table) > 0


AIMV2 = "aimv2_large_patch14_224"  # RMSNorm, a norm in the patch embedding, SwiGLU


@pytest.mark.parametrize("name,center", [(SIGLIP, True), (AIMV2, False), (DINOV3, True), (EVA02, True)])
def test_weight_processing_keeps_logits(name, center):
    import copy

    _, model, x = built(name)
    processed = copy.deepcopy(model).process_weights_(fold_ln=True, center_writing_weights=center,
                                                      fold_layer_scale=True)
    with torch.no_grad():
        assert rel(processed(x), model(x)) < 1e-4


def test_centring_refused_for_rmsnorm():
    import copy

    _, model, _ = built(AIMV2)
    with pytest.raises(ValueError, match="RMSNorm"):
        copy.deepcopy(model).process_weights_(fold_ln=True, center_writing_weights=True)


def test_relative_position_bias_follows_kept_tokens():
    """BEiT after token removal: each kept pair keeps its own offset's bias (tests/test_timm_families.py)."""
    from test_timm_families import removal_matches_masking

    _, model, x = built(BEIT)
    assert removal_matches_masking(model, x, drop=3) < TOL
