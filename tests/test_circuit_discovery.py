"""Circuit discovery: AtP, path patching, EAP/EAP-IG, pruning and faithfulness."""

from __future__ import annotations

import pytest
import torch

from circuits.circuit_discovery import (ViTGraph, attribution_patch, corrupt, edge_attribution, faithfulness,
                                        path_patch, prune)
from circuits.circuit_discovery.eap import Circuit
from circuits.patching import ALL, patch_activations
from hooked_vit import HookedViT
from helpers import make_timm


@pytest.fixture(scope="module")
def small():
    """A randomised small ViT (every parameter, norms included) and a clean/corrupted pair."""
    timm_model, size = make_timm("vit_tiny_patch16_224", seed=3)
    model = HookedViT.from_timm(timm_model)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 3, size, size, generator=gen)
    return model, clean, corrupt(clean, "shuffle")


def test_atp_is_exact_for_a_linear_metric_on_a_linear_edit(small):
    """The final-norm output -> logits -> logit difference is linear: AtP equals patching."""
    model, clean, corrupted = small
    site = "ln_final.hook_normalized"
    atp = attribution_patch(model, clean, corrupted, "logit_diff", sites=[site])[site]
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean, names_filter=site)
        base = model(corrupted)
    ct, rt = clean_logits.argmax(-1), base.argmax(-1)
    ld = lambda lg: (lg.gather(1, ct[:, None]) - lg.gather(1, rt[:, None]))[:, 0]  # noqa: E731
    exact = []
    for p in range(atp.shape[0]):
        def hook(x, hook, p=p):
            x[:, p] = cache[site][:, p]
            return x
        with torch.no_grad():
            exact.append((ld(model.run_with_hooks(corrupted, fwd_hooks=[(site, hook)])) - ld(base)).mean())
    exact = torch.stack(exact)
    assert exact.abs().max() > 0.1  # the class token moves the metric: the check has teeth
    torch.testing.assert_close(atp, exact, atol=1e-4, rtol=1e-4)


def _saturated_linear_model(head: int):
    """A randomised 2-block ViT whose layer-0 head `head` has its queries scaled by 15 (its
    softmax rows near one-hot), and hooks that make the logits affine in layer 0's pattern:
    MLP outputs zeroed, layer 1's pattern and every norm scale after layer 0 fixed. Patching
    a layer-0 query or key then moves the metric through the pattern only, and linearly."""
    timm_model, size = make_timm("vit_tiny_patch16_224", seed=3)
    model = HookedViT.from_timm(timm_model)
    d = model.cfg.d_head
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[head * d:(head + 1) * d] *= 15
        model.blocks[0].attn.qkv.bias[head * d:(head + 1) * d] *= 15
    frozen = [("blocks.0.hook_mlp_out", lambda x, hook: torch.zeros_like(x)),
              ("blocks.1.ln1.hook_scale", lambda x, hook: torch.full_like(x, 1.5)),
              ("blocks.1.attn.hook_pattern", lambda x, hook: torch.full_like(x, 1.0 / x.shape[-1])),
              ("blocks.1.hook_mlp_out", lambda x, hook: torch.zeros_like(x)),
              ("ln_final.hook_scale", lambda x, hook: torch.full_like(x, 2.0))]
    clean = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, frozen, clean, corrupt(clean, "shuffle")


def test_atp_star_qk_fix_is_exact_where_the_metric_is_linear_in_the_pattern():
    """AtP* (Kramar et al. 2024, sec. 3.1.1) recomputes the pattern with the clean query / key:
    with the metric affine in the pattern it equals exact patching of every layer-0 query and
    key; plain AtP, linear through the saturated softmax, underestimates the saturated head."""
    head = 1
    model, frozen, clean, corrupted = _saturated_linear_model(head)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter="blocks.0.attn.hook_pattern")
    assert cache["blocks.0.attn.hook_pattern"][:, head].max(-1).values.mean() > 0.99  # saturated
    plain = attribution_patch(model, clean, corrupted, sites=["q", "k"], fwd_hooks=frozen)
    fixed = attribution_patch(model, clean, corrupted, sites=["q", "k"], qk_fix=True, fwd_hooks=frozen)
    with model.hooks(fwd_hooks=frozen):
        grids = patch_activations(model, clean, corrupted, ["q", "k"], layers=[0])
    for side in ("q", "k"):
        exact = (grids[side].mean() - grids[side].corrupted.mean())[0]  # [pos, head]
        assert exact[:, head].abs().sum() > 1.0  # the saturated head's q / k matter
        torch.testing.assert_close(fixed[side][0], exact, atol=1e-5, rtol=1e-5)
        assert plain[side][0][:, head].abs().sum() < 0.5 * exact[:, head].abs().sum()
    with pytest.raises(ValueError, match="qk_fix"):
        attribution_patch(model, clean, corrupted, sites=["z"], qk_fix=True)


@pytest.mark.parametrize("spread", [30.0, 1000.0])  # saturated rows; beyond float64's exp range
def test_key_patch_effect_equals_one_softmax_per_patched_key(spread):
    from circuits.circuit_discovery.attribution_patching import key_patch_effect

    gen = torch.Generator().manual_seed(0)
    scores, column, grad = (torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64) * m for m in (spread, spread, 1))
    expected = torch.empty_like(scores)
    for s in range(scores.shape[-1]):
        patched = scores.clone()
        patched[..., s] = column[..., s]
        expected[..., s] = (grad * (patched.softmax(-1) - scores.softmax(-1))).sum(-1)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(key_patch_effect(scores, column, grad), expected, atol=1e-12, rtol=1e-9)


def test_path_patching_every_path_equals_patching_the_sender(small):
    model, clean, corrupted = small
    for sender, layer, head in (("L0H1", 0, 1), ("L1H3", 1, 3)):
        full = patch_activations(model, clean, corrupted, "z", layers=[layer], positions="all", heads=[head])
        expected = full.values[0, 0, 0] - full.corrupted
        got = path_patch(model, clean, corrupted, sender, "all")
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_path_patching_refuses_a_receiver_before_the_sender(small):
    model, clean, corrupted = small
    with pytest.raises(ValueError, match="no path"):
        path_patch(model, clean, corrupted, "L1H0", ["L0H0.q"])
    with pytest.raises(ValueError, match="unknown reader"):
        path_patch(model, clean, corrupted, "L0H0", ["L9H0.q"])


def test_full_and_empty_circuits_give_the_clean_and_corrupted_runs(small):
    model, clean, corrupted = small
    graph = ViTGraph.of(model)
    full = faithfulness(model, Circuit(graph, graph.edge_mask()), clean, corrupted)
    empty = faithfulness(model, Circuit(graph, torch.zeros_like(graph.edge_mask())), clean, corrupted)
    assert abs(full.clean - full.corrupted) > 1e-2
    assert full.recovered == pytest.approx(1.0, abs=1e-4) and empty.recovered == pytest.approx(0.0, abs=1e-4)


def test_eap_edge_score_matches_single_edge_patch_on_the_logits(small):
    """With the final norm's scale frozen, the logits are affine in the last residual stream:
    the EAP score of an edge into the logits equals patching that edge alone."""
    model, clean, corrupted = small
    frozen = [("ln_final.hook_scale", lambda x, hook: torch.full_like(x, 2.0))]
    scores = edge_attribution(model, clean, corrupted, fwd_hooks=frozen)
    df = scores.to_frame()
    assert (df["rank"].diff().dropna() > 0).all()
    graph = scores.graph
    top = df[df.downstream == "logits"].iloc[0]
    patched = torch.zeros(len(graph.writers), len(graph.readers))
    patched[graph.writer_index(top.upstream), -1] = 1
    from circuits.circuit_discovery.graph import cache_writers, run_patched
    clean_logits, clean_w = cache_writers(model, clean, frozen)
    corr_logits, _ = cache_writers(model, corrupted, frozen)
    ct, rt = clean_logits.argmax(-1), corr_logits.argmax(-1)
    ld = lambda lg: (lg.gather(1, ct[:, None]) - lg.gather(1, rt[:, None]))[:, 0].mean()  # noqa: E731
    with torch.no_grad():
        exact = float(ld(run_patched(model, corrupted, clean_w, patched, frozen)) - ld(corr_logits))
    assert abs(exact) > 1e-2 and top.score == pytest.approx(exact, rel=1e-4)


def test_prune_by_budget_and_threshold(small):
    model, clean, corrupted = small
    scores = edge_attribution(model, clean, corrupted, method="eap-ig", ig_steps=2)
    c = prune(scores, budget=7)
    assert c.n_edges == 7 and (c.edges <= scores.mask).all()
    cut = scores.scores.abs()[c.edges].min()
    assert (scores.scores.abs()[scores.mask & ~c.edges] <= cut).all()
    assert prune(scores, threshold=float(cut)).n_edges >= 7
    with pytest.raises(ValueError, match="exactly one"):
        prune(scores)
    with pytest.raises(ValueError, match="zero gradient"):
        edge_attribution(model, clean, corrupted, "rank")


# ------------------------------------------------------------------ embedded models
@pytest.fixture(scope="module")
def embedded():
    from circuits.data import collate_samples
    from circuits.runs.sources import synthetic_for
    from circuits.runs.sources import load_model

    model = load_model("embedded")
    ds = synthetic_for("default", "test", 400)
    return model, collate_samples([ds[i] for i in range(len(ds))])


def test_atp_correlates_with_activation_patching_on_the_embedded_default(embedded):
    """Per head x position (z) of the last three blocks, and per residual position of every
    block: AtP against exact patching, second-image corruption, 16 images. The full-model
    figures are in docs/circuit_discovery.md."""
    model, batch = embedded
    clean = batch["image"][:16]
    corrupted = corrupt(clean, "shuffle")
    atp = attribution_patch(model, clean, corrupted, sites=["z", "resid_pre"])
    z = patch_activations(model, clean, corrupted, "z", layers=[3, 4, 5])
    resid = patch_activations(model, clean, corrupted, "resid_pre")
    for a, grid in ((atp["z"][3:], z), (atp["resid_pre"], resid)):
        exact = grid.mean() - grid.corrupted.mean()
        r = torch.corrcoef(torch.stack([a.flatten(), exact.flatten()]))[0, 1]
        assert r > 0.7, f"AtP vs exact patching correlation {float(r):.3f}"


def planted_pairs(batch, n=32):
    """Clean images on background 0 and corrupted ones: the same object on the background
    of another image of the same class with background 1 (only the background differs)."""
    from circuits.circuit_discovery.corruptions import swap_background

    lab, bg = batch["label"], batch["background"]
    clean_i, donor_i, used = [], [], set()
    for i in (bg == 0).nonzero()[:, 0].tolist():
        j = next((j for j in ((bg == 1) & (lab == lab[i])).nonzero()[:, 0].tolist() if j not in used), None)
        if j is not None:
            clean_i.append(i), donor_i.append(j), used.add(j)
        if len(clean_i) == n:
            break
    clean = batch["image"][clean_i]
    return clean, swap_background(clean, batch["mask"][clean_i], batch["image"][donor_i])


def parity_readout(n_classes: int):
    """The planted shortcut's own read-out: mean logit of the odd classes minus the even ones
    (what plant_background_shortcut writes towards), as fn(logits, clean_t, corrupted_t)."""
    sign = torch.tensor([1.0 if c % 2 else -1.0 for c in range(n_classes)])
    return lambda logits, clean_t, corrupted_t: (logits * sign.to(logits)).mean(-1)


def test_eap_finds_the_planted_shortcut_head_and_a_small_faithful_circuit(embedded):
    """Plant a background shortcut head (circuits/decomposition/planted.py, default strength)
    in the embedded default; corrupt only the background; measure the shortcut's read-out
    (parity logit). EAP and EAP-IG rank the planted head's edge to the logits first and the
    greedy circuit of 20 edges recovers >= 80 % of the clean-minus-corrupted metric. Without
    the plant the same pairs barely move the metric: the plant is the behaviour's ground truth
    (with the logit difference it is not; see docs/circuit_discovery.md)."""
    from circuits.decomposition.planted import plant_background_shortcut
    from circuits.runs.sources import synthetic_for

    model, batch = embedded
    hooks, planted = plant_background_shortcut(model, synthetic_for("default", "val", 256))
    clean, corrupted = planted_pairs(batch)
    metric = parity_readout(model.cfg.n_classes)
    for method in ("eap", "eap-ig"):
        df = edge_attribution(model, clean, corrupted, metric, method=method, ig_steps=3, fwd_hooks=hooks).to_frame()
        assert (df.iloc[0].upstream, df.iloc[0].downstream) == (planted, "logits"), df.head()
    scores = edge_attribution(model, clean, corrupted, metric, fwd_hooks=hooks)
    result = faithfulness(model, prune(scores, budget=20, greedy=True), clean, corrupted, metric, fwd_hooks=hooks)
    assert result.n_edges == 20 and result.recovered >= 0.8, result
    with torch.no_grad():
        gap = [float(metric(model(x), None, None).mean()) for x in (clean, corrupted)]
    assert abs(gap[0] - gap[1]) < 0.1 * abs(result.clean - result.corrupted)
    # Without the planted head the top edge is another one: the ranking follows the plant.
    plain = edge_attribution(model, clean, corrupted).to_frame()
    assert plain.iloc[0].upstream != planted or plain.iloc[0].downstream != "logits"


def test_atp_and_eap_find_what_reads_the_background_in_embedded_spurious():
    """embedded:spurious was trained where the background predicts label % 2; swapping only
    the background moves its parity read-out ~100x more than the default model's (the control).
    AtP's per-component totals (heads' z and MLP outputs, summed over positions) match exact
    patching of each component, agree on the top component, which alone carries a large share
    of the effect; EAP's top edges move the metric when patched alone, far more than random edges."""
    from circuits.data import collate_samples
    from circuits.runs.sources import load_model, synthetic_for

    metric = parity_readout(10)
    gaps = {}
    for name, data in (("embedded:spurious", "spurious"), ("embedded", "default")):
        model = load_model(name)
        ds = synthetic_for(data, "test", 400)
        clean, corrupted = planted_pairs(collate_samples([ds[i] for i in range(len(ds))]))
        with torch.no_grad():
            gaps[name] = float(metric(model(clean), None, None).mean() - metric(model(corrupted), None, None).mean())
    assert abs(gaps["embedded:spurious"]) > 20 * abs(gaps["embedded"]), gaps
    model = load_model("embedded:spurious")
    ds = synthetic_for("spurious", "test", 400)
    clean, corrupted = planted_pairs(collate_samples([ds[i] for i in range(len(ds))]))
    atp = attribution_patch(model, clean, corrupted, metric, sites=["z", "mlp_out"])
    estimate = torch.cat([atp["z"].sum(1).flatten(), atp["mlp_out"].sum(1)])  # [heads..., MLPs...]
    grids = [patch_activations(model, clean, corrupted, site, positions="all", metric=metric)
             for site in ("z", "mlp_out")]
    exact = torch.cat([(g.mean() - g.corrupted.mean()).flatten() for g in grids])
    assert torch.corrcoef(torch.stack([estimate, exact]))[0, 1] > 0.9
    top = int(estimate.abs().argmax())
    assert top == int(exact.abs().argmax()) and abs(float(exact[top])) > 0.3 * abs(gaps["embedded:spurious"])
    scores = edge_attribution(model, clean, corrupted, metric)
    df = scores.to_frame()
    def effect(row) -> float:  # the edge patched alone
        return float(path_patch(model, clean, corrupted, row.upstream, [row.downstream], metric).mean())

    best = [effect(row) for row in df.head(8).itertuples()]
    others = [effect(row) for row in df.sample(8, random_state=0).itertuples()]
    assert sum(abs(x) for x in best) > 10 * sum(abs(x) for x in others), (best, others)
    # The majority has EAP's sign (6 of 8 measured: L0H0 -> MLP0 and embed -> L0H0.v, through MLP0's
    # nonlinearity, are overestimated; docs/circuit_discovery.md).
    assert sum((b > 0) == (s > 0) for b, s in zip(best, df.head(8).score)) >= 5


def test_greedy_pruning_keeps_only_edges_on_paths_to_the_logits(small):
    model, clean, corrupted = small
    scores = edge_attribution(model, clean, corrupted)
    graph, owner = scores.graph, scores.graph.reader_owner()
    for circuit in (prune(scores, budget=15, greedy=True), prune(scores, threshold=0.05, greedy=True)):
        w, r = circuit.edges.nonzero(as_tuple=True)
        in_circuit = set(w.tolist())
        assert circuit.n_edges > 0 and all(int(owner[j]) == -1 or int(owner[j]) in in_circuit for j in r.tolist())
    assert prune(scores, budget=15, greedy=True).n_edges == 15
    assert (scores.scores.abs()[prune(scores, threshold=0.05, greedy=True).edges] >= 0.05).all()
    top = prune(scores, budget=30)  # by |score| alone: some kept edges feed nothing kept
    w, r = top.edges.nonzero(as_tuple=True)
    assert any(int(owner[j]) != -1 and int(owner[j]) not in set(w.tolist()) for j in r.tolist())
    assert not torch.equal(top.edges, prune(scores, budget=30, greedy=True).edges)


def test_corruptions():
    from circuits.circuit_discovery.corruptions import swap_background

    images = torch.randn(6, 3, 8, 8)
    shuffled = corrupt(images, "shuffle", seed=1)
    assert all(any(torch.equal(s, x) for x in images) and not torch.equal(s, x) for s, x in zip(shuffled, images))
    flat = torch.full((2, 3, 8, 8), 0.5)
    torch.testing.assert_close(corrupt(flat, "blur", sigma=1.5), flat)  # blur keeps a constant image
    assert corrupt(images, "blur").std() < images.std()
    assert torch.equal(corrupt(images, "mean")[0], images.mean(0))
    masks = torch.zeros(6, 8, 8, dtype=torch.bool)
    masks[:, 2:4, 2:4] = True
    swapped = swap_background(images, masks, shuffled)
    assert torch.equal(swapped[:, :, 2:4, 2:4], images[:, :, 2:4, 2:4]) and torch.equal(swapped[:, :, 0], shuffled[:, :, 0])
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "jpeg")
    with pytest.raises(ValueError, match="at least 2"):
        corrupt(images[:1], "shuffle")


def test_circuit_command_writes_scores_and_summary(tmp_path):
    import json

    import pandas as pd

    from circuits.cli import main

    out = tmp_path / "circuit"
    assert main(["circuit", "--model", "embedded", "--data", "synthetic:val:16", "--out", str(out),
                 "--budget", "10", "--batch-size", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    edges = pd.read_parquet(out / "edge_scores.parquet")
    nodes = pd.read_parquet(out / "node_scores.parquet")
    assert summary["n_edges_kept"] == 10 == int(edges.in_circuit.sum()) and summary["n_edges"] == len(edges) == 1108
    assert summary["n_images"] == 16 and summary["metric_clean"] > summary["metric_corrupted"]
    assert summary["faithfulness"] == pytest.approx((summary["metric_circuit"] - summary["metric_corrupted"])
                                                    / (summary["metric_clean"] - summary["metric_corrupted"]))
    assert set(nodes.site) == {"resid_pre", "z", "mlp_out"} and len(nodes[nodes.site == "z"]) == 6 * 65 * 4
    assert main(["circuit", "--model", "embedded", "--data", "synthetic:val:16", "--out", str(out)]) == 2
    # the same settings again: the finished run is returned, nothing recomputed
    before = (out / "edge_scores.parquet").stat().st_mtime_ns
    assert main(["circuit", "--model", "embedded", "--data", "synthetic:val:16", "--out", str(out),
                 "--budget", "10", "--batch-size", "8"]) == 0
    assert (out / "edge_scores.parquet").stat().st_mtime_ns == before
    # another --limit is another set of images: recomputed, not the finished run handed back
    assert main(["circuit", "--model", "embedded", "--data", "synthetic:val:16", "--out", str(out),
                 "--budget", "10", "--batch-size", "8", "--limit", "8"]) == 0
    assert json.loads((out / "summary.json").read_text())["n_images"] == 8
    # its report section: the graph of the 10 kept edges and the per-head heatmap with token names
    from circuits.report import build_report

    page = build_report([out], tmp_path / "report.html").read_text()
    assert "Circuit discovery" in page and "the kept edges" in page and "patch (0, 0)" in page
    # greedy pruning from the logits: every kept edge feeds the logits or a node that is kept
    greedy = tmp_path / "greedy"
    assert main(["circuit", "--model", "embedded", "--data", "synthetic:val:16", "--out", str(greedy),
                 "--budget", "10", "--batch-size", "8", "--greedy"]) == 0
    summary = json.loads((greedy / "summary.json").read_text())
    kept = pd.read_parquet(greedy / "edge_scores.parquet").query("in_circuit")
    assert summary["greedy"] and len(kept) == 10
    assert all(d == "logits" or d.split(".")[0] in set(kept.upstream) for d in kept.downstream)
    assert "greedy from the logits" in build_report([greedy], tmp_path / "greedy.html").read_text()
