"""TransformerLens compatibility: ActivationCache decompositions and weight processing."""

from __future__ import annotations

import pytest
import torch

from helpers import images, make_timm
from hooked_vit import HookedViT

PRE_NORM_FAMILIES = ["vit_tiny_patch16_224", "vit_base_patch16_224_miil", "deit_tiny_distilled_patch16_224",
                     "vit_small_patch14_reg4_dinov2", "deit3_small_patch16_224", "vit_base_patch16_reg4_gap_256"]


def load(name, **kw):
    timm_model, size = make_timm(name)
    return HookedViT.from_timm(timm_model, **kw), images(size), timm_model


@pytest.mark.parametrize("name", PRE_NORM_FAMILIES + ["vit_base_patch16_rpn_224"])
def test_decompose_resid_sums_to_final_residual(name):
    model, x, _ = load(name)
    _, cache = model.run_with_cache(x)
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == ["embed", "pos_embed"] and len(labels) == 2 + 2 * model.cfg.n_layers
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(parts.sum(0), final, rtol=1e-5, atol=1e-5)


def test_decompose_resid_with_ln_pre_uses_resid_pre():
    """CLIP towers normalise the embedding (ln_pre): embed + pos_embed is not the stream start."""
    model, x, _ = load("vit_base_patch16_clip_224")
    _, cache = model.run_with_cache(x)
    parts = cache.decompose_resid(incl_embeds=False)
    total = parts.sum(0) + cache["blocks.0.hook_resid_pre"]
    torch.testing.assert_close(total, cache["blocks.1.hook_resid_post"], rtol=1e-5, atol=1e-5)


def test_accumulated_resid_and_head_results():
    model, x, _ = load("vit_small_patch14_reg4_dinov2")  # LayerScale: W_O must include gamma
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(x)
    acc = cache.accumulated_resid()
    assert acc.shape[0] == model.cfg.n_layers + 1
    torch.testing.assert_close(acc[-1], cache["blocks.1.hook_resid_post"])
    heads = cache.stack_head_results(layer=1)  # heads of layer 0
    torch.testing.assert_close(heads.sum(0) + model.blocks[0].attn.b_O, cache["blocks.0.hook_attn_out"],
                               rtol=1e-5, atol=1e-5)
    heads, labels = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert labels[-1] == "remainder" and len(labels) == 2 * model.cfg.n_heads + 1
    torch.testing.assert_close(heads.sum(0), cache["blocks.1.hook_resid_post"], rtol=1e-5, atol=1e-5)


def test_compute_head_results_from_z_matches_hooked_results():
    model, x, _ = load("deit3_small_patch16_224")
    _, cache = model.run_with_cache(x)  # no hook_result cached
    model.set_use_attn_result(True)
    _, ref = model.run_with_cache(x)
    cache.compute_head_results()
    torch.testing.assert_close(cache["blocks.1.attn.hook_result"], ref["blocks.1.attn.hook_result"],
                               rtol=1e-5, atol=1e-5)


TOKEN_NORM_FAMILIES = [n for n in PRE_NORM_FAMILIES if "gap" not in n]  # final norm on every token


@pytest.mark.parametrize("name", TOKEN_NORM_FAMILIES)
def test_apply_ln_to_stack_recovers_final_norm(name):
    model, x, _ = load(name)
    _, cache = model.run_with_cache(x)
    parts = cache.decompose_resid()
    normed = cache.apply_ln_to_stack(parts).sum(0)
    ln = model.ln_final
    expected = (cache["ln_final.hook_normalized"] - ln.bias) / ln.weight
    torch.testing.assert_close(normed, expected, rtol=1e-4, atol=1e-4)


# Distilled logits read two tokens, so a single-token attribution does not sum to them.
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_224_miil", "deit3_small_patch16_224"])
def test_class_logit_attribution_sums_to_logit(name):
    model, x, _ = load(name, fold_ln=True, center_writing_weights=True, fold_layer_scale=True)
    logits, cache = model.run_with_cache(x)
    classes = torch.tensor([3, 7])
    parts = cache.decompose_resid(pos_slice=0)  # [components, batch, d]: the class token
    attrs = cache.logit_attrs(parts, tokens=classes, pos_slice=0)
    recon = attrs.sum(0) + model.b_U[classes]
    torch.testing.assert_close(recon, logits[torch.arange(2), classes], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", PRE_NORM_FAMILIES + ["vit_base_patch16_clip_224"])
def test_weight_processing_leaves_logits_unchanged(name):
    model, x, timm_model = load(name)
    processed, _, _ = load(name, fold_ln=True, center_writing_weights=True, fold_layer_scale=True)
    assert processed.cfg.normalization_type == "LNPre"
    assert processed.blocks[0].ln1.weight is None
    torch.testing.assert_close(processed(x), timm_model(x), rtol=1e-4, atol=1e-4)
    # Centred writing weights: every component written to the stream has zero mean.
    assert processed.W_O.mean(-1).abs().max() < 1e-6
    assert processed.W_out.mean(-1).abs().max() < 1e-6


def test_weight_processing_refuses_post_norm():
    model, _, _ = load("vit_base_patch16_rpn_224")
    with pytest.raises(ValueError, match="post-norm"):
        model.process_weights_()


@pytest.mark.parametrize("expand_neurons", [True, False])
@pytest.mark.parametrize("layer,mlp_input", [(None, False), (1, True), (1, False)])
def test_full_resid_decomposition_sums_to_the_stream(expand_neurons, layer, mlp_input):
    model, x, _ = load("deit3_small_patch16_224")  # LayerScale: biases include the gammas
    _, cache = model.run_with_cache(x)
    parts, labels = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, expand_neurons=expand_neurons,
                                                       return_labels=True)
    assert len(labels) == parts.shape[0] and labels[-1] == "bias"
    assert labels[: model.cfg.n_heads] == model.all_head_labels[: model.cfg.n_heads]
    target = {(None, False): "blocks.1.hook_resid_post", (1, True): "blocks.1.hook_resid_mid",
              (1, False): "blocks.1.hook_resid_pre"}[(layer, mlp_input)]
    torch.testing.assert_close(parts.sum(0), cache[target], rtol=1e-4, atol=1e-4)


def test_accumulated_bias_refuses_post_norm_and_bad_layers():
    model, _, _ = load("vit_base_patch16_rpn_224")
    with pytest.raises(ValueError, match="post-norm"):
        model.accumulated_bias(1)
    model, _, _ = load("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="layer=5"):
        model.accumulated_bias(5)


# Every public ActivationCache method, called as a user would on a HookedViT cache. A method
# TransformerLens adds fails test_every_public_cache_method_is_covered until listed here.
CACHE_CALLS = {
    "accumulated_resid": lambda c, m: c.accumulated_resid(apply_ln=True, incl_mid=True, return_labels=True),
    "apply_ln_to_stack": lambda c, m: c.apply_ln_to_stack(c.decompose_resid()),
    "apply_slice_to_batch_dim": lambda c, m: c.apply_slice_to_batch_dim(0),
    "compute_head_results": lambda c, m: c.compute_head_results(),
    "decompose_resid": lambda c, m: c.decompose_resid(apply_ln=True, return_labels=True),
    "get_full_resid_decomposition": lambda c, m: c.get_full_resid_decomposition(apply_ln=True, return_labels=True),
    "get_neuron_results": lambda c, m: c.get_neuron_results(1),
    "items": lambda c, m: list(c.items()),
    "keys": lambda c, m: list(c.keys()),
    "values": lambda c, m: list(c.values()),
    "logit_attrs": lambda c, m: c.logit_attrs(c.decompose_resid(pos_slice=0), tokens=torch.tensor([1, 2]),
                                              pos_slice=0),
    "remove_batch_dim": lambda c, m: c.apply_slice_to_batch_dim(slice(0, 1)).remove_batch_dim(),
    "ssm_layers": lambda c, m: c.ssm_layers(),
    "stack_activation": lambda c, m: c.stack_activation("resid_post"),
    "stack_head_results": lambda c, m: c.stack_head_results(apply_ln=True, return_labels=True),
    "stack_neuron_results": lambda c, m: c.stack_neuron_results(2, apply_ln=True, return_labels=True),
    "to": lambda c, m: c.to("cpu"),
    "toggle_autodiff": lambda c, m: c.toggle_autodiff(False),
}
# Methods that cannot apply to a ViT, and the reason their error must give.
CACHE_REFUSED = {
    "logit_lens": (lambda c, m: c.logit_lens(), "pooled vector"),
    "compute_ssm_effective_attention": (lambda c, m: c.compute_ssm_effective_attention(), "state-space"),
    "compute_ssm_state": (lambda c, m: c.compute_ssm_state(), "state-space"),
}


def test_every_public_cache_method_is_covered():
    import inspect

    from transformer_lens import ActivationCache

    public = {n for n, _ in inspect.getmembers(ActivationCache) if not n.startswith("_")}
    public -= {"has_batch_dim", "has_embed", "has_pos_embed"}  # instance attributes, not methods
    assert public == set(CACHE_CALLS) | set(CACHE_REFUSED)


@pytest.fixture(scope="module")
def tiny_cache():
    model, x, _ = load("vit_tiny_patch16_224")
    return model, x


@pytest.mark.parametrize("method", sorted(CACHE_CALLS))
def test_public_cache_method_runs(tiny_cache, method):
    model, x = tiny_cache
    _, cache = model.run_with_cache(x)
    grad = torch.is_grad_enabled()
    try:
        assert CACHE_CALLS[method](cache, model) is not False
    finally:  # toggle_autodiff switches autograd globally
        torch.set_grad_enabled(grad)


@pytest.mark.parametrize("method", sorted(CACHE_REFUSED))
def test_inapplicable_cache_method_says_why(tiny_cache, method):
    model, x = tiny_cache
    _, cache = model.run_with_cache(x)
    call, reason = CACHE_REFUSED[method]
    with pytest.raises(NotImplementedError, match=reason):
        call(cache, model)


def test_qk_and_ov_factored_matrices():
    from transformer_lens import FactoredMatrix

    model, _, _ = load("deit3_small_patch16_224")
    cfg = model.cfg
    assert isinstance(model.OV, FactoredMatrix) and isinstance(model.QK, FactoredMatrix)
    assert model.OV.shape == model.QK.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    l, h = 1, 2
    torch.testing.assert_close(model.OV.AB[l, h], model.W_V[l, h] @ model.W_O[l, h])
    torch.testing.assert_close(model.QK.AB[l, h], model.W_Q[l, h] @ model.W_K[l, h].T)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_rpn_224", "deit_tiny_distilled_patch16_224",
                                  "vit_base_patch16_clip_224"])
def test_fold_value_biases_and_refactor_leave_logits_unchanged(name):
    model, x, timm_model = load(name)
    ref = timm_model(x)
    qk, ov = model.QK.AB.clone(), model.OV.AB.clone()
    model.fold_value_biases()
    assert model.b_V.abs().max() == 0
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    model.refactor_factored_attn_matrices()
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.OV.AB, ov, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.QK.AB, qk, rtol=1e-4, atol=1e-5)
    # Balanced factors: W_Q and W_K of a head have the same singular values.
    sq = torch.linalg.svdvals(torch.cat([model.W_Q[0, 0], model.b_Q[0, 0][None]]))
    sk = torch.linalg.svdvals(torch.cat([model.W_K[0, 0], model.b_K[0, 0][None]]))
    torch.testing.assert_close(sq, sk, rtol=1e-4, atol=1e-5)


def test_refactor_needs_layer_scale_folded():
    model, x, timm_model = load("deit3_small_patch16_224")
    with pytest.raises(ValueError, match="fold LayerScale"):
        model.refactor_factored_attn_matrices()
    model.process_weights_(fold_ln=False, center_writing_weights=False).refactor_factored_attn_matrices()
    torch.testing.assert_close(model(x), timm_model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_center_unembed_keeps_softmax(name):
    model, x, timm_model = load(name)
    ref = timm_model(x)
    model.center_unembed()
    out = model(x)
    torch.testing.assert_close(out.log_softmax(-1), ref.log_softmax(-1), rtol=1e-4, atol=1e-5)
    assert model.W_U.mean(-1).abs().max() < 1e-6 and model.b_U.mean().abs() < 1e-6
    assert not torch.allclose(out, ref, atol=1e-3)  # the raw logits shift, as in TransformerLens


def test_n_params_and_loss_fn():
    model, x, timm_model = load("vit_tiny_patch16_224")
    assert model.n_params == sum(p.numel() for p in timm_model.parameters())
    targets = torch.tensor([3, 7])
    logits = model(x)
    per_image = model.loss_fn(logits, targets, per_image=True)
    torch.testing.assert_close(per_image, -logits.log_softmax(-1)[torch.arange(2), targets])
    torch.testing.assert_close(model.loss_fn(logits, targets), per_image.mean())
    torch.testing.assert_close(model(x, return_type="loss", targets=targets), per_image.mean())
    with pytest.raises(ValueError, match=r"targets must be \[batch\]"):
        model.loss_fn(logits, targets[:1])
