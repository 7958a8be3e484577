"""The image analyses on video models (issue 26, item 3; docs/video.md "Analyses"): token
removal by frame or tube, patching with video corruptions, explanation maps as space-time
volumes, decomposition, SAEs on clips, and the refusals where an analysis does not fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from circuits.video import freeze_frames, shuffle_frames
from helpers import randomize_
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.tokens import token_index, token_labels
from test_video_analyses import clips, small_video


def video_model(attention_type: str = "joint", pool: str = "token", tubelet: int = 1, seed: int = 0) -> HookedViT:
    """4 frames of 2 x 2 patches; joint (ViViT-style) or divided (TimeSformer-style) attention."""
    divided = attention_type == "divided_space_time"
    cfg = HookedViTConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=5, img_size=16, patch_size=8,
                          num_frames=4, tubelet_size=tubelet, attention_type=attention_type,
                          pos_embed_type="space_time" if divided else "learned",
                          class_token=pool == "token", global_pool=pool,
                          final_norm="pooled" if pool == "avg" else "token")
    return randomize_(HookedViT(cfg), seed=seed, std=0.3).eval()


# ----------------------------------------------------------------------------- token removal
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_frame_removal_equals_the_model_on_the_kept_frames(pool):
    """Removing time positions 1 and 3 equals a 2-frame model, given the kept frames and the
    kept rows of the position table (the tokens physically dropped, positions kept right)."""
    from circuits.token_removal import frame_keep_mask

    model = video_model(pool=pool)
    x = clips()
    keep = frame_keep_mask(model, [1, 3], batch=2)
    n = model.cfg.n_prefix_tokens
    assert keep[0].tolist() == [True] * n + [t in (0, 2) for t in range(4) for _ in range(4)]
    short = HookedViT(dataclasses.replace(model.cfg, num_frames=2)).eval()
    state = model.state_dict()
    state["embed.pos_embed"] = state["embed.pos_embed"][:, keep[0]]
    short.load_state_dict(state)
    with torch.no_grad():
        removed, expected, whole = model(x, keep_mask=keep), short(x[:, [0, 2]]), model(x)
    torch.testing.assert_close(removed, expected, atol=1e-5, rtol=1e-5)
    assert (removed - whole).abs().max() > 1e-3  # the removal changed the output


def test_tube_removal_equals_running_only_the_kept_tokens():
    from circuits.token_removal import tube_keep_mask

    model = video_model()
    x = clips()
    keep = tube_keep_mask(model, [(0, 1)], batch=2)
    gone = [token_index(model, t, 0, 1) for t in range(4)]
    assert (~keep[0]).nonzero()[:, 0].tolist() == gone
    with torch.no_grad():
        resid = model.embed_images(x)[:, keep[0]]  # the embedded tokens, the tube dropped
        expected = model.unembed(model.pool(model(resid, start_at_layer=0, return_type="resid")))
        torch.testing.assert_close(model(x, keep_mask=keep), expected, atol=1e-5, rtol=1e-5)


def test_frame_and_tube_removal_refusals():
    from circuits.token_removal import frame_keep_mask, tube_keep_mask

    with pytest.raises(ValueError, match="divided_space_time"):
        frame_keep_mask(video_model("divided_space_time"), [0])
    with pytest.raises(ValueError, match="image model"):
        tube_keep_mask(HookedViT(HookedViTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_classes=2)), [(0, 0)])
    model = video_model(pool="avg")
    with pytest.raises(ValueError, match="outside"):
        frame_keep_mask(model, [4])
    with pytest.raises(ValueError, match="no patch token"):
        tube_keep_mask(model, [(r, c) for r in range(2) for c in range(2)])


# ----------------------------------------------------------------------------- corruptions + patching
def test_video_corruptions():
    x = clips()
    shuffled = shuffle_frames(x, seed=3)
    order = [next(j for j in range(4) if torch.equal(shuffled[:, i], x[:, j])) for i in range(4)]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    assert torch.equal(shuffle_frames(x, seed=3), shuffled)
    assert all(not torch.equal(shuffle_frames(x, seed=s), x) for s in range(20))  # never the identity
    frozen = freeze_frames(x, frame=2)
    assert all(torch.equal(frozen[:, i], x[:, 2]) for i in range(4))
    assert torch.equal(freeze_frames(x, -1)[:, 0], x[:, 3])
    with pytest.raises(ValueError, match="frames"):
        shuffle_frames(x[:, :1])
    with pytest.raises(ValueError, match="outside"):
        freeze_frames(x, frame=4)
    with pytest.raises(ValueError, match="clips must be"):
        freeze_frames(x[0])


@pytest.mark.parametrize("attention_type", ["joint", "divided_space_time"])
@pytest.mark.parametrize("corruption", ["second_clip", "shuffle", "freeze"])
def test_activation_patching_with_video_corruptions_names_tokens_in_time(attention_type, corruption):
    from circuits.patching import patch_activations

    model = video_model(attention_type)
    clean = clips(seed=1)
    corrupted = {"second_clip": clips(seed=2), "shuffle": shuffle_frames(clean, 1),
                 "freeze": freeze_frames(clean)}[corruption]
    grid = patch_activations(model, clean, corrupted, "resid_pre", layers=[0], metric="target_logit")
    everything = patch_activations(model, clean, corrupted, "resid_pre", layers=[0], positions="all",
                                   metric="target_logit")
    torch.testing.assert_close(everything.values[0, 0], everything.clean, atol=1e-4, rtol=1e-4)
    assert (grid.clean - grid.corrupted).abs().max() > 1e-3
    assert grid.labels == token_labels(model) and grid.values.shape == (1, model.cfg.n_ctx, 2)
    frame = grid.to_frame()
    pos = token_index(model, 3, 1, 0)
    assert set(frame.loc[frame["pos"] == pos, "token"]) == {"t3 patch (1, 0)"}
    assert set(everything.to_frame()["token"]) == {"all"}


def test_head_patching_sites_are_refused_on_divided_attention():
    from circuits.circuit_discovery.attribution_patching import attribution_patch
    from circuits.circuit_discovery.path_patching import path_patch
    from circuits.patching import patch_activations

    model = video_model("divided_space_time")
    x, y = clips(seed=1), clips(seed=2)
    for site in ("z", "pattern"):
        with pytest.raises(ValueError, match="grouped"):
            patch_activations(model, x, y, site)
    with pytest.raises(ValueError, match="grouped"):
        attribution_patch(model, x, y, sites=("z",))
    with pytest.raises(ValueError, match="qk_fix"):
        attribution_patch(model, x, y, sites=("blocks.0.attn.hook_q",), qk_fix=True)
    with pytest.raises(ValueError, match="divided space-time"):
        path_patch(model, x, y, "L0H0")


@pytest.mark.parametrize("attention_type", ["joint", "divided_space_time"])
def test_attribution_patching_on_clips_is_exact_where_linear_and_names_tokens(attention_type):
    """With the final norm's scale frozen the logits are affine in the last resid_post: AtP of
    a last-block position equals patching it (clean frame-shuffled into corrupted)."""
    from circuits.circuit_discovery.attribution_patching import attribution_patch, scores_frame
    from circuits.patching import patch_activations

    model = video_model(attention_type, pool="avg")
    clean, corrupted = clips(seed=1), shuffle_frames(clips(seed=1), 2)
    frozen = [("ln_final.hook_scale", lambda x, hook: torch.full_like(x, 2.0))]
    scores = attribution_patch(model, clean, corrupted, "target_logit", sites=("resid_post",), fwd_hooks=frozen)
    assert scores["resid_post"].shape == (2, model.cfg.n_ctx)
    with model.hooks(fwd_hooks=frozen):
        grid = patch_activations(model, clean, corrupted, "resid_post", layers=[1], metric="target_logit")
    effect = (grid.values[0] - grid.corrupted).mean(-1)
    assert effect.abs().max() > 1e-3
    torch.testing.assert_close(scores["resid_post"][1], effect, atol=1e-4, rtol=1e-4)
    table = scores_frame(scores, model)
    assert table.loc[table["pos"] == token_index(model, 2, 0, 1), "token"].unique().tolist() == ["t2 patch (0, 1)"]


def test_path_patching_on_clips_every_path_equals_patching_the_sender():
    from circuits.circuit_discovery.path_patching import path_patch
    from circuits.patching import patch_activations

    model = video_model()
    clean, corrupted = clips(seed=1), freeze_frames(clips(seed=1))
    full = patch_activations(model, clean, corrupted, "z", layers=[0], positions="all", heads=[2],
                             metric="target_logit")
    expected = full.values[0, 0, 0] - full.corrupted
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(path_patch(model, clean, corrupted, "L0H2", "all", "target_logit"), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- explanation maps
def test_explanation_maps_are_space_time_volumes():
    from circuits.explain import explain, perturbation_curve, upsample

    model = video_model(tubelet=2)  # 2 time positions of 2 x 2 patches, each over 2 frames
    x = clips()
    vol = explain("attention", model, x)
    assert vol.shape == (2, 2, 2, 2)
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    row = cache["blocks.1.attn.hook_pattern"][:, :, 0, 1:].mean(1)  # the class token's row, heads averaged
    for t, r, c in [(0, 0, 1), (1, 1, 0), (1, 1, 1)]:
        torch.testing.assert_close(vol[:, t, r, c], row[:, token_index(model, t, r, c) - 1])
    for method in ("rollout", "gae", "gradcam", "class_embedding", "tokentm", "transformer_attribution", "random"):
        assert explain(method, model, x).shape == (2, 2, 2, 2), method
    pix = upsample(vol, 16, frames_per_time=2)
    assert pix.shape == (2, 4, 16, 16) and torch.equal(pix[:, 0], pix[:, 1]) and not torch.equal(pix[:, 1], pix[:, 2])
    assert float(pix.amax()) == pytest.approx(1.0) and float(pix.amin()) == pytest.approx(0.0)
    correct = perturbation_curve(model, x, model(x).argmax(-1), vol, fractions=(0.0, 0.5))
    assert correct.shape == (2, 2) and bool(correct[:, 0].all())
    with pytest.raises(ValueError, match="mode='remove'"):
        perturbation_curve(model, x, torch.zeros(2, dtype=torch.long), vol, mode="zero")


def test_explanation_maps_refuse_divided_attention():
    from circuits.explain import explain

    with pytest.raises(ValueError, match="divided space-time"):
        explain("rollout", video_model("divided_space_time"), clips())


# ----------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("attention_type,pool", [("joint", "token"), ("joint", "avg"),
                                                 ("divided_space_time", "token"), ("divided_space_time", "avg")])
def test_decomposition_of_video_models_is_exact(attention_type, pool):
    """The components (divided: the temporal heads as extra per-head components) sum to the
    representation; the temporal heads write to patch tokens only, so a class-token readout
    gets nothing from them directly and a mean-pooled one does."""
    from circuits.decomposition import decompose

    model = video_model(attention_type, pool=pool)
    dec = decompose(model, clips())
    torch.testing.assert_close(dec.total(), dec.representation, atol=1e-5, rtol=1e-5)
    time_heads = dec.index("time_head")
    if attention_type == "joint":
        assert time_heads == []
        return
    assert [dec.components[i].name for i in time_heads[:2]] == ["L0H0.time", "L0H1.time"]
    assert len(time_heads) == model.cfg.n_layers * model.cfg.n_heads and len(dec.index("attn_time.b_O")) == 2
    size = dec.terms[:, time_heads].abs().max()
    assert (size == 0) if pool == "token" else (size > 1e-3)
    with torch.no_grad():
        _, cache = model.run_with_cache(clips())
    for layer in range(2):  # each attention's heads + bias: what its output hook adds, read out
        for kinds, hook in ((("time_head", "attn_time.b_O"), "hook_attn_time_out"), (("head", "b_O"), "hook_attn_out")):
            idx = [i for i, c in enumerate(dec.components) if c.kind in kinds and c.layer == layer]
            expected = dec.readout.stream(cache[f"blocks.{layer}.{hook}"])
            torch.testing.assert_close(dec.terms[:, idx].sum(1), expected, atol=1e-5, rtol=1e-5)
    stacked, groups = dec.sublayer_terms()
    assert groups[:4] == ["embed", "L0.attn_time", "L0.attn", "L0.mlp"]
    torch.testing.assert_close(stacked.sum(1), dec.representation, atol=1e-5, rtol=1e-5)
    for mode in ("split", "reference"):
        other = decompose(model, clips(), biases=mode)
        torch.testing.assert_close(other.total(), other.representation, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention_type", ["joint", "divided_space_time"])
def test_per_time_terms_split_each_component_by_the_read_tokens_time(attention_type):
    """A mean-pooled model with a per-token final norm: time position t's share, summed over
    components, is the mean over all tokens of LN_f(resid) - b restricted to t's tokens."""
    from circuits.decomposition import per_time_terms

    model = video_model(attention_type, pool="avg")
    model.cfg.final_norm = "token"  # the same parameters read per token
    x = clips()
    split = per_time_terms(model, x)
    assert split.groups == ["t0", "t1", "t2", "t3"] and split.terms.shape[:2] == (2, 4)
    dec = split.decomposition
    bias = dec.index("ln_final.b")
    torch.testing.assert_close(split.terms.sum(1).sum(1) + dec.terms[:, bias].sum(1), dec.representation,
                               atol=1e-5, rtol=1e-5)
    assert bool((split.terms[:, :, bias] == 0).all())
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    normed = model.ln_final(cache["blocks.1.hook_resid_post"]) - model.ln_final.bias  # [b, p, d]
    for t in range(4):
        own = normed[:, 4 * t:4 * (t + 1)].sum(1) / model.cfg.n_ctx
        torch.testing.assert_close(split.terms[:, t].sum(1)[:, 0], own, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="image model"):
        per_time_terms(HookedViT(HookedViTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_classes=2)),
                       torch.zeros(1, 3, 224, 224))


def test_per_time_terms_has_a_prefix_group_with_a_class_token():
    from circuits.decomposition import per_time_terms, token_terms

    model = video_model("divided_space_time")
    split = per_time_terms(model, clips())
    assert split.groups == ["prefix", "t0", "t1", "t2", "t3"]
    assert split.terms[:, 1:].abs().max() == 0  # the class token reads only itself
    with pytest.raises(ValueError, match="divided"):
        next(token_terms(model, clips(), split.decomposition))


# ----------------------------------------------------------------------------- SAEs on clips
@pytest.mark.parametrize("pool", ["token", "avg"])  # avg: no prefix, so both groupings are [b, 4, 4, d]
def test_divided_attentions_grouped_norm_hooks_are_laid_onto_the_tokens(pool):
    from circuits.sae.activations import hook_activations, token_activations, token_positions

    model = video_model("divided_space_time", pool=pool)
    x = clips()
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    block = model.blocks[0]
    every = token_positions(model, "all")
    space = token_activations(model, "blocks.0.ln1.hook_normalized", cache["blocks.0.ln1.hook_normalized"], every)
    expected = block.ln1(cache["blocks.0.hook_resid_time"])
    torch.testing.assert_close(space, expected, atol=1e-5, rtol=1e-5)  # the prefix token's copies are one vector
    patches = token_positions(model, "patch")
    time = token_activations(model, "blocks.0.ln_time.hook_normalized", cache["blocks.0.ln_time.hook_normalized"],
                             patches)
    expected = block.ln_time(cache["blocks.0.hook_resid_pre"][:, patches])
    torch.testing.assert_close(time, expected, atol=1e-5, rtol=1e-5)
    if pool == "token":
        with pytest.raises(ValueError, match="tokens='patch'"):
            hook_activations(model, x, ["blocks.0.ln_time.hook_normalized"], tokens="all")
    with pytest.raises(ValueError, match="per-token hooks"):
        hook_activations(model, x, ["blocks.0.attn_time.hook_z"])
    rows, token = hook_activations(model, x, ["blocks.0.ln_time.hook_normalized"], tokens="patch")
    assert rows["blocks.0.ln_time.hook_normalized"].shape == (2 * 16, 32) and token[:16].tolist() == patches.tolist()
    torch.testing.assert_close(rows["blocks.0.ln_time.hook_normalized"][:16], time[0], atol=0, rtol=0)


def test_activation_store_on_clips_writes_space_time_token_rows(tmp_path):
    from circuits.embedded.synthetic_video import MovingShapes
    from circuits.runs.activation_store import build_activation_store
    from circuits.sae.activations import token_activations, token_positions

    model = video_model("divided_space_time")
    data = MovingShapes(4, num_frames=4, img_size=16)
    hook = "blocks.0.ln_time.hook_normalized"
    store = build_activation_store(model, data, tmp_path, [hook], tokens="patch", batch_size=2, progress=False)
    rows = {hook: [], "token": [], "image_index": []}
    for batch in store.batches(64, seed=0, hooks=list(rows)):
        for key in rows:
            rows[key].append(batch[key])
    rows = {k: torch.cat(v) for k, v in rows.items()}
    assert rows[hook].shape == (4 * 16, 32) and sorted(set(rows["token"].tolist())) == list(range(1, 17))
    clip = torch.stack([data[i]["image"] for i in range(4)])
    with torch.no_grad():
        _, cache = model.run_with_cache(clip)
    every = token_activations(model, hook, cache[hook], token_positions(model, "patch"))  # [4, 16, d]
    i, t = int(rows["image_index"][5]), int(rows["token"][5])
    torch.testing.assert_close(rows[hook][5], every[i, t - 1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attention_type,hook", [("joint", "blocks.1.hook_resid_post"),
                                                 ("divided_space_time", "blocks.1.ln_time.hook_normalized")])
def test_sae_trains_evaluates_and_studies_features_on_clips(attention_type, hook):
    """A dictionary trains on streamed clip activations, splices back exactly with its error
    term, and its top-activating tokens are named in time, thumbnails showing their frame."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from circuits.embedded.synthetic_video import MovingShapes
    from circuits.plot import display_rgb
    from circuits.sae.activations import stream_activations
    from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
    from circuits.sae.evaluate import evaluate_dictionary
    from circuits.sae.features import feature_thumbnails, study_features
    from circuits.sae.train import TrainConfig, train_dictionary

    model = video_model(attention_type, tubelet=2)
    data = MovingShapes(6, num_frames=4, img_size=16)
    sae = SparseDictionary(DictionaryConfig(32, 48, "topk", k=4, hook_name=hook, tokens="patch"), seed=1)
    log = train_dictionary(sae, lambda epoch: stream_activations(model, data, [hook], 8, tokens="patch", image_batch=3,
                                                                 seed=epoch),
                           TrainConfig(steps=4, warmup_steps=1), progress=False)
    assert len(log) == 4 and all(np.isfinite(row["loss"]) for row in log)
    metrics = evaluate_dictionary(model, sae, data, batch_size=3, progress=False)
    assert metrics["max_logit_change_with_error"] < 1e-4
    result = study_features(model, sae, data, batch_size=3, top_k=2, attributes=("label",))
    labels = token_labels(model)
    feature = int(np.argmax(result["top_values"][:, 0]))
    tok = int(result["top_tokens"][feature, 0])
    assert result["top_token_labels"][feature, 0] == labels[tok] and labels[tok].startswith("t")
    (first, *_) = feature_thumbnails(model, data, result, [feature], max_px=16)[feature]
    assert first["token_label"] == labels[tok]
    t, r, c = (tok - 1) // 4, ((tok - 1) % 4) // 2, (tok - 1) % 2
    frame = data[first["image"]]["image"][2 * t]  # the first frame of the token's tubelet
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["png"]))))
    np.testing.assert_array_equal(png, display_rgb(model, frame[None])[0])
    assert first["box"] == [8 * c, 8 * r, 8, 8]


# ----------------------------------------------------------------------------- token maps of one image grid
def test_token_maps_are_laid_on_the_space_time_grid_or_refused():
    from circuits.decomposition import decompose, token_heatmaps
    from circuits.decomposition.scoring import patch_grid
    from circuits.runs.explain import benchmark_batch

    model = video_model(tubelet=2)  # 2 time positions of 2 x 2 patches
    heat = torch.arange(model.cfg.n_ctx, dtype=torch.float32)[None]
    grid = patch_grid(heat, model)
    assert grid.shape == (1, 2, 2, 2)
    assert all(grid[0, t, r, c] == token_index(model, t, r, c) for t in range(2) for r in range(2) for c in range(2))
    with pytest.raises(ValueError, match="patch tokens"):
        patch_grid(heat[:, :-1], model)
    x = clips()
    dec = decompose(model, x)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    maps = patch_grid(token_heatmaps(model, x, dec, direction), model)
    assert maps.shape == (2, 2, model.cfg.n_heads, 2, 2, 2)  # [b, layers, heads, T, rows, cols]
    heads = dec.terms[:, dec.index("head")].reshape(2, 2, model.cfg.n_heads, -1) @ direction
    prefix = token_heatmaps(model, x, dec, direction)[..., 0]
    torch.testing.assert_close(maps.flatten(-3).sum(-1) + prefix, heads, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="video model"):
        benchmark_batch(model, {"image": x, "label": torch.zeros(2, dtype=torch.long), "index": [0, 1]}, ["rollout"])
