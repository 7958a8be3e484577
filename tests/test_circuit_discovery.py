"""Circuit discovery: AtP, path patching, EAP/EAP-IG, pruning and faithfulness."""

from __future__ import annotations

import pytest
import torch

from circuits.circuit_discovery import (ViTGraph, attribution_patch, corrupt, edge_attribution, faithfulness,
                                        path_patch, prune)
from circuits.circuit_discovery.eap import Circuit
from circuits.patching import ALL, patch_activations
from hooked_vit import HookedViT
from tests.conftest import make_timm


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
