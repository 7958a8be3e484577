"""The newer ViT families (SigLIP MAP heads; EVA02 / DINOv3 RoPE, registers, SwiGLU, sub-LN):
new hook points live (edits flow, backward hooks fire), token removal with RoPE positions
following the kept tokens (against timm's own patch-dropout path), and every analysis run
on them (exact, or refused with its reason)."""

from __future__ import annotations

import pytest
import torch

import zoo
from helpers import keep_mask_of, rel_err, timm_on_kept_patches
from hooked_vit import HookedViT
from hooked_vit.errors import UnsupportedModelError

SIGLIP = "vit_base_patch16_siglip_224"  # MAP head
EVA02 = "eva02_base_patch14_224"  # RoPE (cat), SwiGLU, sub-LN in the MLP, avg pool
DINOV3 = "vit_small_plus_patch16_dinov3"  # RoPE (dinov3), 4 registers, LayerScale, SwiGLU
BEIT = "beitv2_base_patch16_224"  # relative position bias, LayerScale, q/v biases
AIMV2 = "aimv2_large_patch14_224"  # RMSNorm, a norm in the patch embedding, SwiGLU
BEIT3 = "beit3_base_patch16_224"  # a norm inside attention (scale_attn_norm)
PE = "vit_pe_core_base_patch16_224"  # MAP head over the class token too, RoPE + APE, ln_pre
NAMES = (SIGLIP, EVA02, DINOV3, BEIT)
ALL = (*NAMES, AIMV2)
TOL = 1e-5

_CACHE: dict[str, tuple] = {}


def built(name: str):
    if name not in _CACHE:
        timm_model, size = zoo.small_variant(name)
        model = HookedViT.from_timm(timm_model)
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
        _CACHE[name] = timm_model, model, x
    return _CACHE[name]


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
    AIMV2: {"embed.norm.hook_scale": (2, 12, 1), "blocks.0.ln1.hook_scale": (2, 12, 1),
            "blocks.0.mlp.hook_pre_linear": (2, 12, 176), "ln_final.hook_normalized": (2, 12, 64)},
}


@pytest.mark.parametrize("name", ALL)
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


@pytest.mark.parametrize("name", ALL)
def test_backward_hooks_fire_on_new_hooks(name):
    _, model, x = built(name)
    seen = []
    hooks = [(h, lambda g, hook: seen.append(hook.name)) for h in NEW_HOOKS[name]]
    with model.hooks(bwd_hooks=hooks):
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    assert set(seen) == set(NEW_HOOKS[name])


@pytest.mark.parametrize("name", ALL)
def test_fused_and_explicit_attention_match_timm(name):
    timm_model, model, x = built(name)
    with torch.no_grad():
        ref = timm_model(x)
        assert rel_err(model(x), ref) < TOL
        names = lambda n: n.endswith("hook_pattern")
        logits, cache = model.run_with_cache(x, names_filter=names)
    assert rel_err(logits, ref) < TOL and len(cache.keys()) >= model.cfg.n_layers


@pytest.mark.parametrize("name", (EVA02, DINOV3))
def test_token_removal_rope_positions_follow_kept_tokens(name):
    """keep_mask removes tokens and each kept patch keeps its own rotary position: equal to
    timm's patch-dropout path (which gathers the rotary table at the kept indices)."""
    timm_model, model, x = built(name)
    n_prefix, n_patches = model.cfg.n_prefix_tokens, model.cfg.n_patches
    keep_idx = torch.tensor([[0, 2, 3, 7, 11], [1, 4, 5, 6, 10]])
    keep_mask = keep_mask_of(keep_idx, n_prefix, n_prefix + n_patches)
    ref = timm_on_kept_patches(timm_model, x, keep_idx, n_prefix, with_indices=True)
    with torch.no_grad():
        ours = model(x, keep_mask=keep_mask)
        # The same tokens at the positions 0..k-1 (RoPE not following them) differ:
        resid = model.embed_images(x)[keep_mask].view(2, n_prefix + 5, -1)
        shifted = model(resid, start_at_layer=0, positions=torch.arange(n_prefix + 5).expand(2, -1))
    assert rel_err(ours, ref) < TOL
    assert rel_err(shifted, ref) > 1e-3


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
    assert rel_err(lens[:, 5], alone) < TOL


@pytest.mark.parametrize("name", ALL)
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


@pytest.mark.parametrize("name", ALL)
def test_patching_runs_and_clean_patch_restores(name):
    from circuits.patching import patch_activations

    _, model, x = built(name)
    grid = patch_activations(model, x, x.flip(0), "resid_pre", layers=[1], clean_targets=torch.tensor([1, 2]),
                             corrupted_targets=torch.tensor([2, 1]))
    assert torch.isfinite(torch.as_tensor(grid.values if hasattr(grid, "values") else grid.scores)).all()


@pytest.mark.parametrize("name", (SIGLIP, EVA02, DINOV3, BEIT, AIMV2, PE))
def test_decomposition_exact(name):
    """Components sum to the model's own pooled representation (= timm's pre-logits) and their
    logits to the logits, for MAP heads (SigLIP) and RMSNorm (AIMv2) too."""
    from circuits.decomposition.decompose import decompose, token_terms

    timm_model, model, x = built(name)
    dec = decompose(model, x)
    with torch.no_grad():
        pre_logits = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
    assert rel_err(dec.representation[:, 0], pre_logits) < TOL
    assert ((dec.total() - dec.representation).norm() / dec.representation.norm()) < TOL
    logit_terms, _ = dec.logit_terms(model)
    assert rel_err(logit_terms.sum(1), dec.logits) < 1e-4
    (chunk,) = token_terms(model, x, dec, layers=[1])  # [b, r, h, k, d] sums over k to the head terms
    assert rel_err(chunk.terms.sum(3).transpose(1, 2), dec.terms[:, dec.index("head", 1)]) < TOL


def test_map_decomposition_flows_through_the_pooling_weights():
    """MAP head: the stream components and the constants sum to the pooling attention's output,
    the head's MLP is one component (its real output); a zeroed head has a zero term."""
    from circuits.decomposition.decompose import decompose
    from hooked_vit.errors import UserError

    _, model, x = built(SIGLIP)
    dec = decompose(model, x)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.startswith("attn_pool.hook"))
    mlp = dec.index("attn_pool.mlp")
    assert dec.names[-3:] == ["ln_final.b", "attn_pool.b", "attn_pool.mlp"]
    assert rel_err(dec.terms[:, mlp].sum(1)[:, 0], cache["attn_pool.hook_mlp_out"]) < TOL
    rest = [i for i in range(len(dec.components)) if i not in mlp]
    assert rel_err(dec.terms[:, rest].sum(1)[:, 0], cache["attn_pool.hook_attn_out"]) < TOL

    def zero_head(z, hook):
        z[:, :, 2] = 0
        return z

    cut = decompose(model, x, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
    assert float(cut.terms[:, cut.names.index("L1H2")].abs().max()) == 0.0
    assert ((cut.total() - cut.representation).norm() / cut.representation.norm()) < TOL
    for kwargs in ({"biases": "split"}, {"start_layer": 1}):
        other = decompose(model, x, **kwargs)
        assert ((other.total() - other.representation).norm() / other.representation.norm()) < TOL, kwargs
    with pytest.raises(UserError, match="attention-pooling"):
        decompose(model, x, biases="reference")
    # The pooling weights matter: uniform ones (a GAP-style reading) give another representation.
    uniform = decompose(model, x, fwd_hooks=[("attn_pool.hook_pattern", lambda p, hook: torch.full_like(
        p, 1 / p.shape[-1]))])
    assert rel_err(uniform.representation, dec.representation) > 1e-3


@pytest.mark.parametrize("name", (SIGLIP, AIMV2))
def test_decomposition_exact_after_folding(name):
    import copy

    from circuits.decomposition.decompose import decompose

    _, model, x = built(name)
    folded = copy.deepcopy(model).process_weights_(fold_ln=True, center_writing_weights=False,
                                                   fold_layer_scale=True)
    dec = decompose(folded, x)
    assert ((dec.total() - dec.representation).norm() / dec.representation.norm()) < TOL


def test_rmsnorm_decomposition_does_not_centre():
    """RMSNorm is linearised without centring: a LayerNorm-style centred read-out misses."""
    from dataclasses import replace

    from circuits.decomposition.decompose import _from_cache, _cache_names

    _, model, x = built(AIMV2)
    names = _cache_names(model, 0)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=lambda n: n in names, return_cache_object=False)
    dec = _from_cache(model, cache, 0, "separate")
    assert not dec.readout.final_center
    centred = replace(dec.readout, final_center=True)
    with torch.no_grad():
            wrong = centred.stream(cache["blocks.0.hook_resid_pre"]) + sum(
            centred.stream(cache[f"blocks.{l}.hook_mlp_out"]) for l in range(2))
    right = dec.terms[:, [0, *dec.index("mlp"), *dec.index("b_out")]].sum(1)
    assert rel_err(wrong, right) > 1e-3


def test_decomposition_refuses_attn_norm_with_reason():
    from circuits.decomposition.decompose import decompose

    _, model, x = built(BEIT3)
    with pytest.raises(UnsupportedModelError, match="attn_norm"):
        decompose(model, x)


@pytest.mark.parametrize("name", ALL)
def test_memories_run(name):
    from circuits.memories import class_value_agreement

    _, model, _ = built(name)
    table = class_value_agreement(model)
    assert len(table) > 0


@pytest.mark.parametrize("name,center", [(SIGLIP, True), (AIMV2, False), (DINOV3, True), (EVA02, True)])
def test_weight_processing_keeps_logits(name, center):
    import copy

    _, model, x = built(name)
    processed = copy.deepcopy(model).process_weights_(fold_ln=True, center_writing_weights=center,
                                                      fold_layer_scale=True)
    with torch.no_grad():
        assert rel_err(processed(x), model(x)) < 1e-4


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


# ----------------------------------------------------------------------------- every analysis


@pytest.mark.parametrize("name", ALL)
def test_explanation_maps_run(name):
    """Every explanation method gives a finite map over the image tokens, or refuses with its
    reason (Chefer's transformer attribution is defined for class-token read-outs)."""
    from circuits.explain import METHODS, explain_many
    from hooked_vit.errors import UserError

    _, model, x = built(name)
    refused = {}
    for method in METHODS:
        try:
            rel_map = explain_many(model, x, torch.tensor([1, 2]), [method])[method]
        except UserError as err:
            refused[method] = str(err)
            continue
        assert rel_map.shape == (2, model.cfg.n_patches) and torch.isfinite(rel_map).all(), method
    class_token_readout = model.cfg.global_pool == "token"
    assert set(refused) == (set() if class_token_readout else {"transformer_attribution"}), refused
    assert all("use gae" in reason for reason in refused.values())


def test_map_explanations_read_the_pooling_weights():
    """With a MAP head the "CLS row" is each image's pooling weights (heads averaged), so raw
    attention is the pooling-weighted row of the last block, not a uniform (GAP) reading."""
    from circuits.explain import readout_weights, trace

    _, model, x = built(SIGLIP)
    t = trace(model, x)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter="attn_pool.hook_pattern")
    assert t.readout.shape == (2, model.cfg.n_ctx)
    assert rel_err(t.readout, cache["attn_pool.hook_pattern"][:, :, 0].mean(1)) < TOL
    last = t.patterns[-1].detach()
    uniform = torch.einsum("q,bhqk->bhk", readout_weights(model.cfg, model.cfg.n_ctx), last)
    assert rel_err(t.read_row(last), uniform) > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_probes_run(name):
    from circuits.probes import probe_batch, train_probes

    _, model, x = built(name)
    labels = torch.tensor([1, 2])
    data = [{"image": x[i], "label": int(labels[i]), "index": i} for i in range(2)]
    probes = train_probes(model, data, layers=[1], batch_size=2, progress=False)
    result = probe_batch(model, probes, x, labels)
    assert result.probe_rank.shape[0] == 2 and int(result.probe_rank.min()) >= 0


@pytest.mark.parametrize("name", ALL)
def test_circuit_discovery_full_and_empty_circuits(name):
    """EAP runs, and the full / empty circuits reproduce the clean / corrupted runs exactly."""
    from circuits.circuit_discovery import Circuit, ViTGraph, edge_attribution, faithfulness

    _, model, x = built(name)
    clean, corrupted = x, x.flip(0) * 0.5
    scores = edge_attribution(model, clean, corrupted, clean_targets=torch.tensor([1, 2]),
                              corrupted_targets=torch.tensor([2, 1]))
    assert torch.isfinite(scores.scores).all()
    graph = ViTGraph.of(model)
    full = faithfulness(model, Circuit(graph, graph.edge_mask()), clean, corrupted)
    empty = faithfulness(model, Circuit(graph, torch.zeros_like(graph.edge_mask())), clean, corrupted)
    assert full.recovered == pytest.approx(1.0, abs=1e-3) and empty.recovered == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("name", ALL)
def test_sae_splices_with_error_term(name):
    """A dictionary spliced into the residual stream with SAELens's error term leaves the
    logits unchanged; its features are cached per token."""
    from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
    from circuits.sae.splice import spliced

    _, model, x = built(name)
    hook = "blocks.1.hook_resid_post"
    sae = SparseDictionary(DictionaryConfig(model.cfg.d_model, 96, "topk", k=5, hook_name=hook), seed=2)
    with torch.no_grad():
        ref = model(x)
        with spliced(model, sae, use_error=True):
            logits, cache = model.run_with_cache(x)
    assert rel_err(logits, ref) < TOL
    assert cache[f"{hook}.hook_sae_acts_post"].shape == (2, model.cfg.n_ctx, 96)


@pytest.mark.parametrize("name", ALL)
def test_unhooked_forward_uses_fused_attention(name, monkeypatch):
    """No hooks: every block (and a MAP head's pooling attention) runs SDPA, on the RoPE, MAP,
    GLU, RMSNorm and relative-position-bias paths alike; a cached pattern takes the explicit
    path in that block only."""
    import torch.nn.functional as F

    _, model, x = built(name)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = model.cfg.n_layers + (model.attn_pool is not None)
    with torch.no_grad():
        model(x)
        assert len(calls) == fused
        model.run_with_cache(x, names_filter="blocks.0.attn.hook_pattern")
    assert len(calls) == 2 * fused - 1


@pytest.mark.parametrize("name", (*ALL, BEIT3, PE, "vit_small_patch16_rope_mixed_224", "vit_base_patch16_dinov3"))
def test_timm_state_dict_round_trip(name):
    """to_timm_state_dict(like=<timm model>) writes timm's own layout (EVA's q/k/v, SwiGLU
    halves, BEiT's names): a fresh timm model loads it strictly and reproduces the original."""
    timm_model, model, x = built(name)
    fresh, _ = zoo.small_variant(name, seed=99)
    fresh.load_state_dict(model.to_timm_state_dict(like=fresh))  # strict
    with torch.no_grad():
        assert rel_err(fresh(x), timm_model(x)) < 1e-6


def test_timm_state_dict_without_layout_refused_for_eva():
    _, model, _ = built(EVA02)
    with pytest.raises(ValueError, match="like="):
        model.to_timm_state_dict()


@pytest.mark.parametrize("name", (SIGLIP, AIMV2))
def test_token_removal_matches_timm_on_the_kept_tokens(name):
    """keep_mask on a MAP head (pooling over the kept tokens only) and on RMSNorm / embed-norm
    models equals timm run on the kept tokens (its patch-drop slot); rows keeping different
    numbers of tokens (padded, masked) equal each image run alone."""
    timm_model, model, x = built(name)
    n_prefix, n_patches = model.cfg.n_prefix_tokens, model.cfg.n_patches
    keep_idx = torch.tensor([[0, 2, 3, 7, 11], [1, 4, 5, 6, 10]])
    keep = keep_mask_of(keep_idx, n_prefix, n_prefix + n_patches)
    ref = timm_on_kept_patches(timm_model, x, keep_idx, n_prefix)
    with torch.no_grad():
        assert rel_err(model(x, keep_mask=keep), ref) < TOL
        ragged = keep.clone()
        ragged[1, n_prefix + 4] = False  # the second image keeps one token fewer
        both = model(x, keep_mask=ragged)
        alone = torch.cat([model(x[i:i + 1], keep_mask=ragged[i:i + 1]) for i in range(2)])
    assert rel_err(both, alone) < TOL
