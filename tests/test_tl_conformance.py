"""TransformerLens conformance: what TransformerLens's own tests check of `ActivationCache`,
hook points, `HookedRootModule`, `FactoredMatrix` and `transformer_lens.patching`
(TransformerLens tests/unit and tests/acceptance), run on a `HookedViT`.

Written fresh for images: the same properties, checked against explicit computations on
a small randomised model and on the embedded default (circuits/embedded). What still
differs is listed in docs/differences_from_transformer_lens.md.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformer_lens.patching as tlp
from transformer_lens import FactoredMatrix
from transformer_lens.utilities import get_act_name

from circuits.embedded import SyntheticShapes, collate, load_embedded_timm
from circuits.patching import logit_diff, patch_activations
from helpers import images, make_timm
from hooked_vit import HookedViT, UserError


@pytest.fixture(scope="module")
def small():
    """2 blocks, 4 heads, 10 tokens, every parameter random."""
    model = HookedViT.from_timm(make_timm("vit_tiny_patch16_224")[0])
    return model, images(48, 2, seed=1), images(48, 2, seed=7)


@pytest.fixture(scope="module")
def embedded():
    """The embedded default (6 blocks, 4 heads, 65 tokens): two shapes as the clean run,
    two other shapes as the corruption."""
    model = HookedViT.from_timm(load_embedded_timm("default"))
    batch = collate([SyntheticShapes(8, split="test")[i] for i in range(8)])
    labels = batch["label"].tolist()
    clean_i = [0, 1]
    corrupt_i = [next(j for j in range(8) if labels[j] != labels[i] and j not in clean_i) for i in clean_i]
    return model, batch["image"][clean_i], batch["image"][corrupt_i]


def quiet(monkeypatch):
    monkeypatch.setattr(tlp, "tqdm", lambda it, *a, **k: it)


# --------------------------------------------------------------- get_act_name (issue 25, item 1)
# Every get_act_name short name that applies to a ViT, with the flag it needs.
ACT_NAMES = {"resid_pre": None, "resid_mid": None, "resid_post": None, "attn_out": None, "mlp_out": None,
             "q": None, "k": None, "v": None, "z": None, "attn_scores": None, "pattern": None,
             "result": "use_attn_result", "q_input": "use_split_qkv_input", "k_input": "use_split_qkv_input",
             "v_input": "use_split_qkv_input", "attn_in": "use_attn_in", "mlp_in": "use_hook_mlp_in",
             "pre": None, "post": None, "scale": None, "normalized": None,
             # get_act_name's aliases of the above
             "attn": None, "attn_logits": None, "query": None, "key": None, "value": None,
             "mlp_pre": None, "mlp_post": None}


@pytest.mark.parametrize("short", sorted(ACT_NAMES))
def test_every_get_act_name_resolves_and_an_edit_changes_the_output(small, short):
    model, x, _ = small
    names = [get_act_name(short, 1)] if short not in ("scale", "normalized") else \
        [get_act_name(short, 1, "ln1"), get_act_name(short, 1, "ln2"), get_act_name(short)]
    flag = ACT_NAMES[short]
    if flag:
        getattr(model, f"set_{flag}")(True)
    try:
        clean = model(x)
        for name in names:
            assert name in model.hook_dict, name
            edit = (lambda a, hook: a * 1.5) if short == "scale" else \
                (lambda a, hook: a + torch.randn(a.shape, generator=torch.Generator().manual_seed(0)))
            out = model.run_with_hooks(x, fwd_hooks=[(name, edit)])
            assert not torch.allclose(out, clean, atol=1e-3), name
            _, cache = model.run_with_cache(x, names_filter=name)
            assert cache[name].shape[0] == 2
    finally:
        if flag:
            getattr(model, f"set_{flag}")(False)


def test_top_level_get_act_names_resolve(small):
    model, x, _ = small
    for short in ("embed", "pos_embed"):
        assert get_act_name(short) in model.hook_dict
        noise = lambda a, hook: a + torch.randn(a.shape, generator=torch.Generator().manual_seed(0))  # noqa: E731
        out = model.run_with_hooks(x, fwd_hooks=[(get_act_name(short), noise)])  # (a constant the norms would undo)
        assert not torch.allclose(out, model(x), atol=1e-3)
    _, cache = model.run_with_cache(x)
    torch.testing.assert_close(cache["embed"] + cache["pos_embed"], cache["resid_pre", 0])


def test_attention_level_aliases_name_the_block_hooks(small):
    """TL 4.3's get_act_patch_direct_path spells them blocks.L.attn.hook_q_input."""
    model, x, _ = small
    model.set_use_split_qkv_input(True)
    try:
        via_alias = model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_k_input", lambda a, hook: a.flip(1))])
        direct = model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_k_input", lambda a, hook: a.flip(1))])
        torch.testing.assert_close(via_alias, direct)
        assert not torch.allclose(direct, model(x))
        _, cache = model.run_with_cache(x, names_filter=["blocks.1.attn.hook_q_input"])
        assert list(cache.keys()) == ["blocks.1.hook_q_input"]
        assert cache["blocks.1.attn.hook_q_input"] is cache["q_input", 1] and "blocks.1.attn.hook_q_input" in cache
    finally:
        model.set_use_split_qkv_input(False)
    assert "blocks.1.attn.hook_q_input" not in model.hook_dict  # listed once, under its block name
    with pytest.raises(KeyError, match="unknown hook point"):
        model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_mlp_in", lambda a, hook: a)])


# --------------------------------------------------------------- ActivationCache (TL acceptance tests)
def test_cache_indexing_keys_values_and_items(small):
    model, x, _ = small
    _, cache = model.run_with_cache(x)
    assert cache["resid_post", -1] is cache["blocks.1.hook_resid_post"] is cache["resid_post", 1]
    assert cache["scale", 0, "ln1"] is cache["blocks.0.ln1.hook_scale"]
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert list(cache.keys()) == list(cache.cache_dict) and len(cache) == len(cache.cache_dict)
    assert all(a is b for a, b in zip(cache.values(), cache.cache_dict.values()))
    assert all(cache[k] is v for k, v in cache.items())


def test_remove_batch_dim_and_batch_slices(small):
    model, x, _ = small
    _, one = model.run_with_cache(x[:1], remove_batch_dim=True)
    _, both = model.run_with_cache(x)
    torch.testing.assert_close(one["resid_pre", 1], both["resid_pre", 1][0])
    assert not one.has_batch_dim
    with pytest.raises(AssertionError, match="batch size 2"):
        both.remove_batch_dim()
    first = both.apply_slice_to_batch_dim(0)
    assert first["z", 0].shape == both["z", 0].shape[1:]


def test_stack_activation_and_accumulated_resid(small):
    model, x, _ = small
    _, cache = model.run_with_cache(x)
    stacked = cache.stack_activation("resid_pre")
    torch.testing.assert_close(stacked, torch.stack([cache["resid_pre", l] for l in range(2)]))
    acc, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"] and acc.shape[0] == 5
    torch.testing.assert_close(acc[-1], cache["resid_post", 1])
    # apply_ln runs ln_final on every stream (TL 4.3): on the last one, the final norm's output
    normed = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(normed[-1], cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normed[0], model.ln_final(cache["resid_pre", 0]))


def test_head_and_neuron_stacks_with_remainder_sum_to_the_stream(small):
    model, x, _ = small
    _, cache = model.run_with_cache(x)
    final = cache["resid_post", -1]
    heads = cache.stack_head_results(layer=-1, incl_remainder=True)
    torch.testing.assert_close(heads.sum(0), final, atol=1e-4, rtol=1e-4)
    neurons, labels = cache.stack_neuron_results(layer=-1, incl_remainder=True, return_labels=True)
    torch.testing.assert_close(neurons.sum(0), final, atol=1e-4, rtol=1e-4)
    assert labels[-1] == "remainder" and len(labels) == 2 * model.cfg.d_mlp + 1


def test_logit_attrs_of_class_names_match_an_explicit_projection(embedded):
    model, clean, _ = embedded
    _, cache = model.run_with_cache(clean)
    stack = cache.decompose_resid(pos_slice=0)  # [components, b, d]
    attrs = cache.logit_attrs(stack, tokens="star", pos_slice=0)
    star = model.cfg.class_names.index("star")
    expected = cache.apply_ln_to_stack(stack, pos_slice=0) @ model.W_U[:, star]
    torch.testing.assert_close(attrs, expected)
    correct, incorrect = model.to_class_ids(["star", "disc"]), model.to_class_ids(["ring", 3])  # one class per image
    diff = cache.logit_attrs(stack, tokens=correct, incorrect_tokens=incorrect, pos_slice=0)
    dirs = model.tokens_to_residual_directions(["star", "disc"]) - model.tokens_to_residual_directions(["ring", 3])
    torch.testing.assert_close(diff, (cache.apply_ln_to_stack(stack, pos_slice=0) * dirs).sum(-1))


# --------------------------------------------------------------- hook points / HookedRootModule
def test_permanent_hooks_survive_reset_hooks(small):
    model, x, _ = small
    fired = []
    model.add_perma_hook("blocks.0.hook_resid_mid", lambda a, hook: fired.append(hook.name))
    try:
        model.reset_hooks()
        model(x)
        assert fired == ["blocks.0.hook_resid_mid"]
        assert model.hook_dict["blocks.0.hook_resid_mid"].has_hooks(dir="fwd", including_permanent=True)
        assert not model.hook_dict["blocks.0.hook_resid_mid"].has_hooks(including_permanent=False)
    finally:
        model.reset_hooks(including_permanent=True)
    model(x)
    assert len(fired) == 1


def test_nested_hook_contexts_and_prepend_order(small):
    model, x, _ = small
    order = []
    outer = ("blocks.0.hook_attn_out", lambda a, hook: order.append("outer"))
    with model.hooks(fwd_hooks=[outer]):
        with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", lambda a, hook: order.append("inner"))]):
            model(x)
        model(x)
    model(x)
    assert order == ["outer", "inner", "outer"]
    order.clear()
    model.add_hook("blocks.0.hook_attn_out", lambda a, hook: order.append("second"))
    model.add_hook("blocks.0.hook_attn_out", lambda a, hook: order.append("first"), prepend=True)
    try:
        model(x)
    finally:
        model.reset_hooks()
    assert order == ["first", "second"]


def test_name_filter_functions_and_backward_hooks(small):
    model, x, _ = small
    seen, grads = [], {}
    with model.hooks(fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), lambda a, hook: seen.append(hook.name))],
                     bwd_hooks=[("blocks.1.hook_resid_post", lambda g, hook: grads.setdefault(hook.name, g))]):
        model(x).sum().backward()
    assert seen == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert grads["blocks.1.hook_resid_post"].shape == (2, model.cfg.n_ctx, model.cfg.d_model)
    model.zero_grad(set_to_none=True)


def test_use_attn_result_and_split_qkv_input_keep_the_outputs(small):
    """TL tests/unit/test_use_attn_result.py and test_split_qkv.py."""
    model, x, _ = small
    plain, cache = model.run_with_cache(x)
    for flag in ("use_attn_result", "use_split_qkv_input", "use_attn_in"):
        getattr(model, f"set_{flag}")(True)
        try:
            out, flagged = model.run_with_cache(x)
        finally:
            getattr(model, f"set_{flag}")(False)
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
        if flag == "use_attn_result":
            attn = model.blocks[0].attn
            torch.testing.assert_close(flagged["result", 0].sum(-2) + attn.b_O, cache["attn_out", 0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------- FactoredMatrix (TL tests/unit/factored_matrix)
def test_factored_ov_and_qk_match_dense_products(small):
    model, _, _ = small
    ov, qk = model.OV, model.QK
    dense_ov = model.W_V @ model.W_O
    assert isinstance(ov, FactoredMatrix) and ov.shape == (2, 4, 48, 48) and ov.ndim == 4
    torch.testing.assert_close(ov.AB, dense_ov)
    torch.testing.assert_close(ov.BA, model.W_O @ model.W_V)
    torch.testing.assert_close(qk.T.AB, (model.W_Q @ model.W_K.transpose(-2, -1)).transpose(-2, -1))
    torch.testing.assert_close(ov.norm(), dense_ov.norm(dim=(-2, -1)), atol=1e-4, rtol=1e-4)
    u, s, vh = ov.svd()
    torch.testing.assert_close((u * s[..., None, :]) @ vh.transpose(-2, -1), dense_ov, atol=1e-4, rtol=1e-4)
    one = ov[1, 2]
    torch.testing.assert_close(one.AB, dense_ov[1, 2])
    vec = torch.randn(48)
    torch.testing.assert_close(one @ vec, dense_ov[1, 2] @ vec, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((one @ qk[1, 0]).AB, dense_ov[1, 2] @ qk.AB[1, 0], atol=1e-4, rtol=1e-4)
    eig = one.eigenvalues  # the d_head non-trivial eigenvalues of the rank-d_head map
    dense_eig = torch.linalg.eigvals(dense_ov[1, 2])
    top = dense_eig[dense_eig.abs().argsort(descending=True)[: eig.shape[-1]]]
    torch.testing.assert_close(eig.abs().sort().values, top.abs().sort().values, atol=1e-4, rtol=1e-4)


def test_all_composition_scores_match_dense_definitions(small):
    model, _, _ = small
    ov = model.W_V @ model.W_O  # [l, h, d, d]
    qk = model.W_Q @ model.W_K.transpose(-2, -1)
    readers = {"Q": qk, "K": qk.transpose(-2, -1), "V": ov}
    for mode, reader in readers.items():
        scores = model.all_composition_scores(mode)
        assert scores.shape == (2, 4, 2, 4)
        for h1 in range(4):
            for h2 in range(4):
                a, b = ov[0, h1], reader[1, h2]
                expected = (a @ b).norm() / (a.norm() * b.norm())
                torch.testing.assert_close(scores[0, h1, 1, h2], expected, atol=1e-5, rtol=1e-4)
        assert (scores[1, :, :, :] == 0).all() and (scores[:, :, 0] == 0).all()  # only later layers read
    with pytest.raises(UserError, match="'Q', 'K' or 'V'"):
        model.all_composition_scores("O")


# --------------------------------------------------------------- dtype, class names (item 3)
def test_cfg_dtype_follows_the_model_and_low_precision_models_cast_inputs():
    model = HookedViT.from_timm(make_timm("vit_tiny_patch16_224")[0])
    x = images(48)
    assert model.cfg.dtype == torch.float32
    reference = model(x)
    model.to(torch.bfloat16)
    assert model.cfg.dtype == torch.bfloat16
    out = model(x)  # fp32 images into a bf16 model, cast as TL's components cast their input
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, model(x.to(torch.bfloat16)))
    torch.testing.assert_close(out.float(), reference, atol=0.15, rtol=0.1)
    assert type(model.cfg).from_dict(model.cfg.to_dict()) == model.cfg  # dtype stored by name
    with pytest.raises(ValueError, match="not a torch dtype"):
        dataclasses.replace(model.cfg, dtype="float31")


def test_tokens_to_residual_directions_takes_class_names_and_ids(embedded):
    model, _, _ = embedded
    star = model.cfg.class_names.index("star")
    torch.testing.assert_close(model.tokens_to_residual_directions("star"), model.W_U[:, star])
    torch.testing.assert_close(model.tokens_to_residual_directions(["star", 2]), model.W_U[:, [star, 2]].T)
    torch.testing.assert_close(model.tokens_to_residual_directions(torch.tensor([[1, 2]])), model.W_U.T[torch.tensor([[1, 2]])])
    assert model.to_single_token("star") == star
    with pytest.raises(UserError, match="did you mean"):
        model.tokens_to_residual_directions("sta")
    with pytest.raises(UserError, match="out of range"):
        model.tokens_to_residual_directions(10)
    unnamed = HookedViT.from_timm(make_timm("vit_tiny_patch16_224")[0])
    with pytest.raises(UserError, match="no class names"):
        unnamed.tokens_to_residual_directions("star")


# --------------------------------------------------------------- transformer_lens.patching (item 2)
def _metric(model, clean, corrupted):
    clean_t, corr_t = model(clean).argmax(-1), model(corrupted).argmax(-1)
    return (lambda logits: logit_diff(logits, clean_t, corr_t).mean()), clean_t, corr_t


def test_tl_resid_pre_sweep_over_image_tokens_equals_circuits_patching(embedded, monkeypatch):
    """Issue 25's [6, 32]: TL reads the position count from the input's last dimension."""
    quiet(monkeypatch)
    model, clean, corrupted = embedded
    metric, clean_t, corr_t = _metric(model, clean, corrupted)
    _, clean_cache = model.run_with_cache(clean)
    with torch.inference_mode():
        tl = tlp.get_act_patch_resid_pre(model, model.to_tokens(corrupted), clean_cache, metric)
    assert tl.shape == (6, 65)
    cells = [0, 1, 33, 64]
    ours = patch_activations(model, clean, corrupted, "resid_pre", positions=cells, metric="logit_diff",
                             clean_targets=clean_t, corrupted_targets=corr_t)
    torch.testing.assert_close(tl[:, cells].cpu(), ours.mean(), atol=1e-5, rtol=1e-5)
    assert tl[0].abs().max() > 0.1  # the corruption matters somewhere


def test_tl_head_sweeps_on_the_embedded_default_equal_circuits_patching(embedded, monkeypatch):
    quiet(monkeypatch)
    model, clean, corrupted = embedded
    metric, clean_t, corr_t = _metric(model, clean, corrupted)
    _, clean_cache = model.run_with_cache(clean)
    with torch.inference_mode():
        out = tlp.get_act_patch_attn_head_out_all_pos(model, model.to_tokens(corrupted), clean_cache, metric)
        raw = tlp.get_act_patch_attn_head_pattern_all_pos(model, corrupted, clean_cache, metric)
    assert out.shape == raw.shape == (6, 4)
    for values, site in [(out, "z"), (raw, "pattern")]:  # layer x head sweeps need no token count: images work too
        ours = patch_activations(model, clean, corrupted, site, positions="all", metric="logit_diff",
                                 clean_targets=clean_t, corrupted_targets=corr_t)
        torch.testing.assert_close(values.cpu(), ours.mean()[:, 0], atol=1e-5, rtol=1e-5)


def test_tl_block_and_by_position_head_sweeps_equal_circuits_patching(small, monkeypatch):
    quiet(monkeypatch)
    model, clean, corrupted = small
    metric, clean_t, corr_t = _metric(model, clean, corrupted)
    _, clean_cache = model.run_with_cache(clean)
    tokens = model.to_tokens(corrupted)
    with torch.inference_mode():
        block = tlp.get_act_patch_block_every(model, tokens, clean_cache, metric)
        mid = tlp.get_act_patch_resid_mid(model, tokens, clean_cache, metric)
        z_by_pos = tlp.get_act_patch_attn_head_out_by_pos(model, tokens, clean_cache, metric)
        every = tlp.get_act_patch_attn_head_all_pos_every(model, tokens, clean_cache, metric)
    assert block.shape == (3, 2, 10) and z_by_pos.shape == (2, 10, 4) and every.shape == (5, 2, 4)
    for values, site in [(block[0], "resid_pre"), (block[1], "attn_out"), (block[2], "mlp_out"),
                         (mid, "resid_mid"), (z_by_pos, "z")]:
        ours = patch_activations(model, clean, corrupted, site, metric="logit_diff",
                                 clean_targets=clean_t, corrupted_targets=corr_t)
        torch.testing.assert_close(values.cpu(), ours.mean(), atol=1e-5, rtol=1e-5)
    for i, site in enumerate(("z", "q", "k", "v", "pattern")):
        ours = patch_activations(model, clean, corrupted, site, positions="all", metric="logit_diff",
                                 clean_targets=clean_t, corrupted_targets=corr_t)
        torch.testing.assert_close(every[i].cpu(), ours.mean()[:, 0], atol=1e-5, rtol=1e-5)


def test_tl_position_sweeps_over_raw_images_are_refused(small, monkeypatch):
    quiet(monkeypatch)
    model, clean, corrupted = small
    metric, _, _ = _metric(model, clean, corrupted)
    _, clean_cache = model.run_with_cache(clean)
    for sweep in (tlp.get_act_patch_resid_pre, tlp.get_act_patch_attn_head_pattern_by_pos):
        with pytest.raises(UserError, match=r"image width \(48\).*model.to_tokens.*circuits.patching"):
            sweep(model, corrupted, clean_cache, metric)


def test_tl_direct_path_patching_runs_through_the_aliases(small):
    """TL 4.3's get_act_patch_direct_path adds a source head's clean-minus-corrupted write
    to later heads' inputs at blocks.L.attn.hook_q_input."""
    model, clean, corrupted = small
    metric, _, _ = _metric(model, clean, corrupted)
    _, clean_cache = model.run_with_cache(clean)
    _, corrupted_cache = model.run_with_cache(corrupted)
    with torch.inference_mode():
        res = tlp.get_act_patch_direct_path(model, corrupted, clean_cache, corrupted_cache, metric,
                                            src_layer=0, src_head=1, component="q", verbose=False)
    assert res.shape == (2, 4) and (res[0] == 0).all() and not model.cfg.use_split_qkv_input
    w_o = model.blocks[0].attn.W_O[1]
    delta = (clean_cache["z", 0][:, :, 1] - corrupted_cache["z", 0][:, :, 1]) @ w_o

    def add(a, hook):
        a = a.clone()
        a[:, :, 2] += delta
        return a

    model.set_use_split_qkv_input(True)
    try:
        by_hand = metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_q_input", add)]))
    finally:
        model.set_use_split_qkv_input(False)
    torch.testing.assert_close(res[1, 2], by_hand.detach(), atol=1e-5, rtol=1e-5)
