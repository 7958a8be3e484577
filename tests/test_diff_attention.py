"""Differential attention (Ye et al. 2024, "Differential Transformer", arXiv:2410.05258): timm's
DiffAttention (in a pre-norm Block) and DiffParallelScalingBlock as cfg.diff_attn.

Every parameter randomised (norm weights and biases, the lambdas, the sub-norm), both lambda
parameterisations, qk_norm and the scale norm: logits within 1e-5 of timm on our fused and
explicit paths (and timm's own explicit path); the hooks carry what the model uses
(hook_pattern = map1 - lambda * map2 multiplies v) and are live; the analyses either stay exact
(decomposition, token terms, perturbations, token removal) or refuse naming differential attention.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DiffAttention
from timm.models.vision_transformer import DiffParallelScalingBlock

from helpers import keep_mask_of, rel_err, timm_on_kept_patches, timm_pair
from hooked_vit import HookedViT
from hooked_vit.attention import diff_lambda_init
from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import UnsupportedModelError, UserError

RTOL = 1e-5
SMALL = dict(depth=3, embed_dim=64, num_heads=4, num_classes=10, img_size=(64, 48))
DWEE, DLITTLE, DPWEE = "vit_dwee_patch16_reg1_gap_256", "vit_dlittle_patch16_reg1_gap_256", "vit_dpwee_patch16_reg1_gap_256"


def _dual_attention(model: torch.nn.Module, qk_norm: bool, scale_norm: bool) -> torch.nn.Module:
    """Each block's DiffAttention rebuilt with dual_lambda=True (timm's VisionTransformer passes
    no dual_lambda to an attn_layer; the class builds both forms)."""
    for i, block in enumerate(model.blocks):
        old = block.attn
        norm = functools.partial(type(block.norm1), eps=block.norm1.eps)
        block.attn = DiffAttention(64, old.num_heads, qkv_bias=old.qkv.bias is not None, qk_norm=qk_norm,
                                   scale_norm=scale_norm, norm_layer=norm, depth=i, dual_lambda=True)
    return model


# name -> (timm name, create_model options, post-build edit or None)
VARIANTS = {
    "dwee": (DWEE, {}, None),
    "dlittle": (DLITTLE, {}, None),
    "dpwee": (DPWEE, {}, None),
    "dwee_dual_qk_scale_norm": (DWEE, dict(qk_norm=True, scale_attn_norm=True),
                                functools.partial(_dual_attention, qk_norm=True, scale_norm=True)),
    "dpwee_dual_qk_norm_no_bias": (DPWEE, dict(qk_norm=True, qkv_bias=False,
                                               block_fn=functools.partial(DiffParallelScalingBlock, dual_lambda=True)),
                                   None),
    "dwee_class_token": (DWEE, dict(class_token=True, reg_tokens=0, no_embed_class=False, global_pool="token"), None),
}
_BUILT: dict = {}


def built(name: str):
    """(timm model, HookedViT, images), every parameter randomised; built once per module."""
    if name not in _BUILT:
        arch, extra, edit = VARIANTS[name]
        _BUILT[name] = timm_pair(arch, {**SMALL, **extra}, SMALL["img_size"], edit)
    return _BUILT[name]


def _timm_diff_modules(timm_model):
    return [m for m in timm_model.modules() if isinstance(m, (DiffAttention, DiffParallelScalingBlock))]


# ------------------------------------------------------------------ conversion and equivalence
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_reads_differential_attention(name):
    timm_model, model, _ = built(name)
    cfg = model.cfg
    diff = _timm_diff_modules(timm_model)
    assert cfg.diff_attn and cfg.diff_dual_lambda == diff[0].dual_lambda
    assert cfg.d_head == 2 * diff[0].head_dim == 16 and cfg.parallel_attn_mlp == name.startswith("dpwee")
    for layer, module in enumerate(diff):  # the per-depth lambda_init, as timm's set_lambda_init
        assert model.blocks[layer].attn.lambda_init == module.lambda_init == diff_lambda_init(layer)
        with torch.no_grad():
            assert torch.equal(model.blocks[layer].attn.diff_lambda(), module._compute_lambda())
    assert len({float(m.lambda_init) for m in diff}) == 3  # depth 3: the schedule is exercised


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_timm_on_both_attention_paths(name):
    """Our fused path (two SDPA calls) and explicit path against timm's fused and explicit paths."""
    timm_model, model, x = built(name)
    with torch.no_grad():
        ref = timm_model(x)
        fused = model(x)
        with model.hooks([("blocks.0.attn.hook_pattern", lambda t, hook: t)]):  # block 0 explicit
            explicit = model(x)
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))  # every block
        every_explicit = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("attn.hook_softmax_maps"),
                                                              lambda t, hook: t)])
        modules = _timm_diff_modules(timm_model)
        for m in modules:
            m.fused_attn = False
        try:
            ref_explicit = timm_model(x)
        finally:
            for m in modules:
                m.fused_attn = True
    assert rel_err(ref_explicit, ref) < RTOL
    for out in (fused, explicit, every_explicit):
        assert rel_err(out, ref) < RTOL and rel_err(out, ref_explicit) < RTOL


def test_unhooked_forward_runs_two_sdpa_calls_per_block(monkeypatch):
    """No hook on scores, maps or pattern: timm's fused path (map1 @ v and map2 @ v by SDPA)."""
    import hooked_vit.attention as attention

    _, model, x = built("dwee")
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(x)
        assert len(calls) == 2 * model.cfg.n_layers
        calls.clear()
        model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("attn.hook_pattern"), lambda t, hook: t)])
    assert not calls


def test_other_models_build_no_differential_parts():
    cfg = HookedViTConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=3, img_size=32, patch_size=8)
    model = HookedViT(cfg)
    attn = model.blocks[0].attn
    assert attn.sub_norm is None and attn.hook_lambda is None and attn.hook_softmax_maps is None
    assert not any("lambda" in n or "sub_norm" in n or "softmax_maps" in n for n in model.hook_dict)
    assert not any("lambda" in n or "sub_norm" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("flag", ["use_split_qkv_input", "use_attn_in", "use_attn_result", "use_hook_mlp_in"])
def test_optional_hook_flags_keep_timm_outputs(flag):
    """Per-head inputs give each head's q, k (its two half-heads) and v from its own copy."""
    timm_model, model, x = built("dwee")
    setattr(model.cfg, flag, True)
    try:
        with torch.no_grad():
            ref = timm_model(x)
            fused = model(x)
            explicit = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, hook: t)])
    finally:
        setattr(model.cfg, flag, False)
    assert rel_err(fused, ref) < RTOL and rel_err(explicit, ref) < RTOL


def test_timm_state_dict_round_trip():
    """Block + DiffAttention weights back under timm's names: a fresh timm model loads them strictly."""
    timm_model, model, x = built("dwee_dual_qk_scale_norm")
    fresh = _dual_attention(timm.create_model(DWEE, pretrained=False, **SMALL, qk_norm=True, scale_attn_norm=True),
                            qk_norm=True, scale_norm=True).eval()
    fresh.load_state_dict(model.to_timm_state_dict())
    with torch.no_grad():
        assert rel_err(fresh(x), timm_model(x)) < RTOL


# ------------------------------------------------------------------ hooks
def test_hook_shapes():
    _, model, x = built("dwee")
    b, p, h, d = 2, model.cfg.n_ctx, model.cfg.n_heads, model.cfg.d_head
    expected = {"hook_q": (b, p, 2 * h, d // 2), "hook_k": (b, p, 2 * h, d // 2), "hook_v": (b, p, h, d),
                "hook_attn_scores": (b, 2 * h, p, p), "hook_softmax_maps": (b, 2 * h, p, p), "hook_lambda": (b, h),
                "hook_pattern": (b, h, p, p), "hook_z": (b, p, h, d), "sub_norm.hook_scale": (b, p, h, 1),
                "sub_norm.hook_normalized": (b, p, h, d)}
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.startswith("blocks.1.attn."))
    for hook, shape in expected.items():
        assert tuple(cache[f"blocks.1.attn.{hook}"].shape) == shape, hook


@pytest.mark.parametrize("name", ["dwee", "dpwee_dual_qk_norm_no_bias"])
def test_pattern_is_the_difference_of_the_maps_and_multiplies_v(name):
    """hook_pattern = map1 - lambda * map2 (half-heads 2i, 2i + 1), z = pattern @ v, and the
    attention output built from it is timm's attention sublayer output."""
    timm_model, model, x = built(name)
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    for layer in range(model.cfg.n_layers):
        a = lambda n: cache[f"blocks.{layer}.attn.{n}"]
        maps, lam = a("hook_softmax_maps"), a("hook_lambda")
        assert torch.allclose(maps, a("hook_attn_scores").softmax(-1))
        expected = maps[:, 0::2] - lam[..., None, None] * maps[:, 1::2]
        assert torch.allclose(a("hook_pattern"), expected, atol=1e-6)
        assert torch.allclose(a("hook_pattern").sum(-1), (1 - lam)[..., None].expand(-1, -1, model.cfg.n_ctx),
                              atol=1e-5)  # rows sum to 1 - lambda
        z = torch.einsum("bhqk,bkhe->bqhe", a("hook_pattern"), a("hook_v"))
        assert rel_err(a("hook_z"), z) < RTOL
    block, resid = timm_model.blocks[1], cache["blocks.1.hook_resid_pre"]
    with torch.no_grad():
        if name == "dwee":
            ref = block.ls1(block.attn(block.norm1(resid)))
            assert rel_err(cache["blocks.1.hook_attn_out"], ref) < RTOL
        else:  # the parallel block: attention and MLP outputs together
            ref = block(resid) - resid
            got = cache["blocks.1.hook_attn_out"] + cache["blocks.1.hook_mlp_out"]
            assert rel_err(got, ref) < RTOL


def test_lambda_zero_equals_the_first_map_as_pattern():
    """An edit of hook_lambda and the same edit written into hook_pattern give the same output."""
    _, model, x = built("dwee")
    with torch.no_grad():
        via_lambda = model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_lambda", lambda t, hook: 0 * t)])
        maps = {}
        keep = lambda t, hook: maps.setdefault("m", t)
        via_pattern = model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_softmax_maps", keep),
                                                          ("blocks.1.attn.hook_pattern",
                                                           lambda t, hook: maps["m"][:, 0::2])])
        clean = model(x)
    assert rel_err(via_lambda, via_pattern) < RTOL and (via_lambda - clean).abs().max() > 1e-3


HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_softmax_maps", "hook_lambda", "hook_pattern",
         "hook_z", "sub_norm.hook_scale", "sub_norm.hook_normalized")


@pytest.mark.parametrize("name", ["dwee", "dpwee"])
@pytest.mark.parametrize("hook", HOOKS)
def test_hooks_are_live(name, hook):
    """An edit changes the output; a backward hook fires; an identity hook changes nothing."""
    _, model, x = built(name)
    full = f"blocks.1.attn.{hook}"
    with torch.no_grad():
        clean = model(x)
        same = model.run_with_hooks(x, fwd_hooks=[(full, lambda t, hook: t.clone())])
        # Not a uniform factor: the sub-norm undoes a rescaled v or z.
        edited = model.run_with_hooks(x, fwd_hooks=[(full, lambda t, hook: t * torch.linspace(0.5, 1.5, t.shape[-1]))])
    assert rel_err(same, clean) < RTOL
    assert (edited - clean).abs().max() > 1e-4, hook
    grads = []
    with model.hooks(bwd_hooks=[(full, lambda g, hook: grads.append(g.shape))]):
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    assert grads, hook


def test_head_results_read_the_sub_normalised_heads():
    """hook_result (use_attn_result) and the cache's compute_head_results both apply W_O to
    sub_norm(z) * (1 - lambda_init); with b_O they sum to hook_attn_out."""
    _, model, x = built("dwee")
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
        model.set_use_attn_result(True)
        try:
            logits, live = model.run_with_cache(x, names_filter=lambda n: n.endswith("attn.hook_result"))
        finally:
            model.set_use_attn_result(False)
    stacked = cache.stack_head_results()  # computed from the cache
    for layer in range(model.cfg.n_layers):
        result = cache[f"blocks.{layer}.attn.hook_result"]
        assert rel_err(result, live[f"blocks.{layer}.attn.hook_result"]) < RTOL
        total = result.sum(-2) + model.blocks[layer].attn.b_O
        assert rel_err(total, cache[f"blocks.{layer}.hook_attn_out"]) < RTOL
    assert stacked.shape[0] == model.cfg.n_layers * model.cfg.n_heads
    _, partial = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_z"))
    with pytest.raises(UserError, match="sub_norm.hook_normalized"):
        partial.compute_head_results()


# ------------------------------------------------------------------ analyses
@pytest.mark.parametrize("name", ["dwee", "dpwee", "dwee_class_token", "dwee_dual_qk_scale_norm"])
def test_decomposition_is_exact_through_the_sub_norm(name):
    """Heads stay separate terms (the sub-norm is per head): components sum to the representation
    and logits, each layer's attention group is its sublayer output, token terms sum to the heads."""
    from circuits.decomposition.decompose import decompose, token_terms
    from hooked_vit.errors import UnsupportedModelError as Refused

    timm_model, model, x = built(name)
    if model.cfg.attn_norm:  # the scale norm mixes the heads: refused as for every model with it
        with pytest.raises(Refused, match="attn_norm"):
            decompose(model, x)
        return
    dec = decompose(model, x)
    with torch.no_grad():
        pre_logits = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_attn_out"))
    assert rel_err(dec.representation[:, 0], pre_logits) < RTOL
    assert float((dec.total() - dec.representation).norm() / dec.representation.norm()) < RTOL
    logit_terms, _ = dec.logit_terms(model)
    assert float((logit_terms.sum(1) - dec.logits).norm() / dec.logits.norm()) < RTOL
    grouped, keys = dec.sublayer_terms()
    for layer in range(model.cfg.n_layers):
        expected = dec.readout.stream(cache[f"blocks.{layer}.hook_attn_out"]).detach()
        got = grouped[:, keys.index(f"L{layer}.attn")]
        assert float((got - expected).norm() / expected.norm()) < RTOL, layer
        (chunk,) = token_terms(model, x, dec, layers=[layer])  # [b, r, h, k, d]
        heads = dec.terms[:, dec.index("head", layer)]
        assert float((chunk.terms.sum(3).transpose(1, 2) - heads).norm() / heads.norm()) < RTOL, layer


def test_token_removal_matches_timm_on_the_kept_tokens():
    """keep_mask removes tokens (both softmax maps renormalise over the kept keys): equal to timm
    run on the same shortened sequence (its patch-dropout slot)."""
    timm_model, model, x = built("dwee")
    n_prefix = model.cfg.n_prefix_tokens
    keep_idx = torch.tensor([[0, 2, 3, 7, 11], [1, 4, 5, 6, 10]])
    keep = keep_mask_of(keep_idx, n_prefix, model.cfg.n_ctx)

    ref = timm_on_kept_patches(timm_model, x, keep_idx, n_prefix)
    with torch.no_grad():
        fused = model(x, keep_mask=keep)
        explicit = model.run_with_hooks(x, keep_mask=keep, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: t)])
    assert rel_err(fused, ref) < RTOL and rel_err(explicit, ref) < RTOL


def test_self_only_perturbation_edits_the_pattern_that_multiplies_v():
    """circuits.interventions edits hook_pattern: a one-hot row makes z[t] = v[t] exactly."""
    from circuits.interventions import perturbation_hooks

    _, model, x = built("dwee")
    hooks = perturbation_hooks(model, "self_only", layers=[1])
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.startswith("blocks.1.attn."))
    n = model.cfg.n_prefix_tokens
    assert torch.allclose(cache["blocks.1.attn.hook_z"][:, n:], cache["blocks.1.attn.hook_v"][:, n:], atol=1e-6)


@pytest.mark.parametrize("method", ["rollout", "tokentm", "transformer_attribution"])
def test_explanation_methods_that_assume_softmax_attention_refuse(method):
    from circuits.explain.methods import explain

    _, model, x = built("dwee_class_token")
    with pytest.raises(UserError, match="differential attention"):
        explain(method, model, x)


@pytest.mark.parametrize("name", ["dwee", "dwee_class_token"])
def test_explanation_methods_on_the_used_pattern_run(name):
    from circuits.explain.methods import METHODS, explain
    from circuits.explain.methods import DIFF_ATTN_REFUSALS

    _, model, x = built(name)
    for method in sorted(set(METHODS) - set(DIFF_ATTN_REFUSALS)):
        relevance = explain(method, model, x)
        assert relevance.shape == (2, model.cfg.n_patches) and torch.isfinite(relevance).all(), method


@pytest.mark.parametrize("what", ["QK", "OV", "composition", "fold_value_biases", "refactor"])
def test_circuit_views_refuse(what):
    _, model, x = built("dwee")
    model = HookedViT.from_timm(built("dwee")[0])  # a copy: refusals must not half-edit the shared one
    calls = {"QK": lambda: model.QK, "OV": lambda: model.OV, "composition": lambda: model.all_composition_scores("Q"),
             "fold_value_biases": model.fold_value_biases, "refactor": model.refactor_factored_attn_matrices}
    with pytest.raises(UserError, match="differential attention"):
        calls[what]()


def test_qk_fix_attribution_patching_refuses():
    from circuits.circuit_discovery.attribution_patching import attribution_patch

    _, model, x = built("dwee")
    with pytest.raises(UserError, match="differential attention"):
        attribution_patch(model, x, x.flip(0), sites=["q"], qk_fix=True, clean_targets=torch.tensor([1, 2]),
                          corrupted_targets=torch.tensor([2, 1]))


@pytest.mark.parametrize("name", ["dwee", "dpwee"])
def test_weight_processing_keeps_logits(name):
    timm_model, _, x = built(name)
    model = HookedViT.from_timm(timm_model, fold_ln=True, center_writing_weights=True, fold_layer_scale=True)
    with torch.no_grad():
        assert rel_err(model(x), timm_model(x)) < 1e-4


# ------------------------------------------------------------------ refusals of the config / conversion
def test_config_refuses_what_differential_attention_does_not_combine_with():
    base = dict(d_model=32, n_layers=1, n_heads=4, d_mlp=64, n_classes=3, img_size=32, patch_size=8)
    with pytest.raises(UserError, match="diff_attn"):
        HookedViTConfig(**base, diff_dual_lambda=True)
    with pytest.raises(UserError, match="even"):
        HookedViTConfig(**{**base, "d_model": 36}, diff_attn=True)
    with pytest.raises(UserError, match="RoPE"):
        HookedViTConfig(**base, diff_attn=True, rope_type="cat")


def test_conversion_refuses_a_lambda_init_off_timms_schedule():
    timm_model = timm.create_model(DWEE, pretrained=False, **SMALL)
    timm_model.blocks[1].attn.set_lambda_init(5)
    with pytest.raises(UnsupportedModelError, match="lambda_init"):
        HookedViT.from_timm(timm_model)


# ------------------------------------------------------------------ the other analyses run
@pytest.mark.parametrize("name", ["dwee", "dpwee"])
def test_identifiability_patching_and_circuit_discovery_run(name):
    """Analyses that read the stream, per-head results or per-head inputs: identifiability,
    activation patching, AtP (the q site has the 2h half-heads), EAP whose full / empty
    circuits reproduce the clean / corrupted runs."""
    from circuits.circuit_discovery import Circuit, ViTGraph, edge_attribution, faithfulness
    from circuits.circuit_discovery.attribution_patching import attribution_patch
    from circuits.patching import patch_activations
    from circuits.token_removal import last_block_ranks

    _, model, x = built(name)
    clean_t, corrupt_t = torch.tensor([1, 2]), torch.tensor([2, 1])
    rank, _ = last_block_ranks(model, x, clean_t)
    assert rank.shape == (2, model.cfg.n_ctx) and int(rank.min()) >= 0
    grid = patch_activations(model, x, x.flip(0), "resid_pre", layers=[1], clean_targets=clean_t,
                             corrupted_targets=corrupt_t)
    assert torch.isfinite(torch.as_tensor(grid.values if hasattr(grid, "values") else grid.scores)).all()
    atp = attribution_patch(model, x, x.flip(0), sites=["q", "z", "resid_pre"], clean_targets=clean_t,
                            corrupted_targets=corrupt_t)
    assert atp["q"].shape == (model.cfg.n_layers, model.cfg.n_ctx, 2 * model.cfg.n_heads)
    assert atp["z"].shape == (model.cfg.n_layers, model.cfg.n_ctx, model.cfg.n_heads)
    clean, corrupted = x, x.flip(0) * 0.5
    scores = edge_attribution(model, clean, corrupted, clean_targets=clean_t, corrupted_targets=corrupt_t)
    assert torch.isfinite(scores.scores).all()
    graph = ViTGraph.of(model)
    full = faithfulness(model, Circuit(graph, graph.edge_mask()), clean, corrupted)
    empty = faithfulness(model, Circuit(graph, torch.zeros_like(graph.edge_mask())), clean, corrupted)
    assert full.recovered == pytest.approx(1.0, abs=1e-3) and empty.recovered == pytest.approx(0.0, abs=1e-3)
