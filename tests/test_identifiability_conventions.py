"""convention="original": the reference code's variants of the identifiability metrics
(github.com/martinagvilas/vit-cls_emb), each against numbers worked out by hand or an
independent forward pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import circuits.identifiability as idf


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="'ours'.*'original'"):
        idf.identifiable_rates(np.zeros((1, 3), int), 1, convention="paper")
    with pytest.raises(ValueError, match="convention"):
        idf.context_vs_object(np.arange(4.0), np.array([1, 0, 0, 0], bool), convention="Original")


def test_identifiable_rates_tokens_per_convention():
    rank = np.array([[0, 0, 1, 0], [1, 0, 0, 2]])
    # class-token model: ours = original unperturbed = tokens 1:, per image 2/3 and 2/3
    assert idf.identifiable_rates(rank, 1)["identifiable_token_rate"] == pytest.approx(2 / 3)
    assert idf.identifiable_rates(rank, 1, "original")["identifiable_token_rate"] == pytest.approx(2 / 3)
    # perturbed runs, original: all four tokens, class token included: 3/4 and 2/4
    assert idf.identifiable_rates(rank, 1, "original", perturbed=True)["identifiable_token_rate"] == pytest.approx(0.625)
    assert idf.identifiable_rates(rank, 1, perturbed=True)["identifiable_token_rate"] == pytest.approx(2 / 3)
    # GAP model (no prefix): ours counts all 4 patch tokens, original still drops position 0
    assert idf.identifiable_rates(rank, 0)["identifiable_token_rate"] == pytest.approx(0.625)
    assert idf.identifiable_rates(rank, 0, "original")["identifiable_token_rate"] == pytest.approx(2 / 3)
    any_top1 = idf.identifiable_rates(np.array([[0, 1, 1], [1, 1, 1]]), 0, "original")
    assert any_top1["images_with_identifiable_token"] == 0.0  # the only top-1 token is the dropped one
    assert idf.per_image_identifiable_rate(rank, 0, "original").tolist() == pytest.approx([2 / 3, 2 / 3])


def test_block_change_rate_original_drops_position_0_and_block_0():
    pre = np.array([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # [N=1, L=2, P=3], GAP model: all patch tokens
    post = np.array([[[1.0, 1.0, -1.0], [1.0, -1.0, -1.0]]])
    assert idf.block_change_rate(pre, post, 0).tolist() == pytest.approx([2 / 3, 1 / 3])
    got = idf.block_change_rate(pre, post, 0, "original")
    assert np.isnan(got[0]) and got[1] == pytest.approx(0.0)  # tokens 1, 2 of block 1: both fall


def _sublayer_case():
    """[N=1, L=2, P=2] target logits (class token + 1 image token) where the two conventions disagree."""
    pre = np.array([[[0.0, 0.0], [0.0, 0.0]]])
    mid = np.array([[[1.0, 1.0], [1.0, 1.0]]])    # ours, attention: both rise
    post = np.array([[[0.5, 2.0], [0.5, 2.0]]])   # ours, MLP (vs mid): class falls, image rises
    attn = np.array([[[-1.0, 1.0], [-1.0, 1.0]]])  # original, attention alone vs pre: class falls, image rises
    mlp = np.array([[[1.0, -1.0], [1.0, -1.0]]])   # original, MLP alone vs pre: class rises, image falls
    return pre, mid, post, attn, mlp


def test_sublayer_change_rates_original_compares_each_sublayer_alone_with_the_block_input():
    pre, mid, post, attn, mlp = _sublayer_case()
    ours = idf.sublayer_change_rates(pre, mid, post, 1).set_index(["layer", "token", "sublayer"])["rate"]
    assert ours[(1, "cls", "attn")] == 1 and ours[(1, "image", "attn")] == 1
    assert ours[(1, "cls", "mlp")] == 0 and ours[(1, "image", "mlp")] == 1
    orig = idf.sublayer_change_rates(pre, mid, post, 1, "original", attn=attn, mlp=mlp)
    orig = orig.set_index(["layer", "token", "sublayer"])["rate"]
    assert orig[(1, "cls", "attn")] == 0 and orig[(1, "image", "attn")] == 1
    assert orig[(1, "cls", "mlp")] == 1 and orig[(1, "image", "mlp")] == 0
    assert orig.loc[0].isna().all()  # block 0: the reference code had no block input to compare with
    with pytest.raises(ValueError, match="attn= and mlp="):
        idf.sublayer_change_rates(pre, mid, post, 1, "original", attn=attn)


def test_residual_composition_original_counts_every_token_and_checks_attention_twice():
    # [N=1, L=2, P=3]; layer 1: token 0 matches attention, token 1 the MLP, token 2 the previous block
    blk = np.array([[[1, 1, 9], [5, 7, 9]]])
    att = np.array([[[0, 0, 0], [5, 0, 0]]])
    mlp = np.array([[[0, 0, 0], [0, 7, 0]]])
    ours = idf.residual_composition(blk, att, mlp, n_prefix=1).set_index("layer")
    assert ours.loc[1].tolist() == pytest.approx([0.0, 0.5, 0.5, 0.0])  # image tokens 1, 2
    orig = idf.residual_composition(blk, att, mlp, n_prefix=1, convention="original").set_index("layer")
    # all three tokens; "none" ignores the MLP match of token 1
    assert orig.loc[1].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert orig.loc[0].isna().all()


@pytest.mark.parametrize("values,ours_p,original_p", [
    ([0.0, 0.0, 0.0, 10.0], 0.25, 0.0),    # object above context: diff 10 reached only by the identity (1/4)
    ([10.0, 10.0, 10.0, 0.0], 0.25, 0.75),  # object below: one-sided p counts the 3/4 of shuffles above -10
])
def test_context_vs_object_one_sided_original_against_the_exact_permutation_distribution(values, ours_p, original_p):
    # 1 object among 4 tokens: 4 equally likely labelings, so the exact p-values are known
    mask = np.array([False, False, False, True])
    n = 4000
    ours = idf.context_vs_object(np.array(values), mask, n_permutations=n)
    orig = idf.context_vs_object(np.array(values), mask, n_permutations=n, convention="original")
    assert ours["difference"] == orig["difference"] == pytest.approx(values[3] - values[0])
    assert ours["p_value"] == pytest.approx(ours_p, abs=0.03)  # binomial sd 0.007
    assert orig["p_value"] == pytest.approx(original_p, abs=0.03)
    if original_p == 0:
        assert orig["p_value"] == 0.0 and ours["p_value"] >= 1 / (n + 1)


def test_removal_rates_original_counts_the_class_token_and_pools_the_unperturbed_tokens():
    # class token + 4 patches; -1 = removed
    rank_removed = np.array([[0, 0, -1, 3, -1], [2, -1, 0, -1, -1]])
    rank_none = np.array([[0, 1, 0, 0, 0], [0, 5, 0, 0, 0]])
    got = idf.removal_rates_original(rank_removed, rank_none, n_prefix=1)
    assert got["rate_removed"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # kept {cls, p0, p2}, {cls, p1}
    assert got["rate_unperturbed"] == pytest.approx(2 / 3)  # kept patches pooled: ranks 1, 0 | 0
    from circuits.runs.perturb import removal_rates_by_convention

    rows = [(r, n) for r, n in zip(rank_removed, rank_none)] + [(np.zeros(5, int), np.zeros(5, int))]
    df = pd.DataFrame({"index": [0, 1, 2], "label": 0, "removal": "context", "valid": [True, True, False],
                       "n_kept": [2, 1, 4], "rank_removed": [r for r, _ in rows],
                       "rank_unperturbed": [n for _, n in rows]})
    table = removal_rates_by_convention(df, 1, "original").set_index("removal")
    assert table.loc["context", "images"] == 2  # the invalid image is left out
    assert table.loc["context", "rate_removed"] == pytest.approx(got["rate_removed"])
    assert table.loc["context", "rate_unperturbed"] == pytest.approx(got["rate_unperturbed"])


# ------------------------------------------------------------------ on stored runs
@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    from circuits.embedded import SyntheticShapes
    from circuits.runs.identify import identify, load_results
    from circuits.runs.sources import load_model

    model, data = load_model("embedded"), SyntheticShapes(6, split="test")
    out = tmp_path_factory.mktemp("conv") / "run"
    identify(model, data, str(out), batch_size=6, progress=False)
    return model, data, load_results(out)


def test_summarize_original_sublayer_rates_equal_an_independent_forward(embedded_run):
    model, data, res = embedded_run
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    target = torch.tensor([data[i]["label"] for i in range(len(data))])
    _, cache = model.run_with_cache(images)

    def target_logit(name):  # [N, P]: the hook's activation alone through the final norm and head
        logits = model.to_class_logits(cache[name])
        return logits.gather(-1, target[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]

    rates = pd.DataFrame(idf.summarize(res, "original")["sublayer_change_rates"]).set_index(["layer", "token", "sublayer"])
    for layer in range(1, model.cfg.n_layers):
        pre = target_logit(f"blocks.{layer}.hook_resid_pre")
        for sub in ("attn", "mlp"):
            rises = (target_logit(f"blocks.{layer}.hook_{sub}_out") > pre).float()
            assert rates.loc[(layer, "cls", sub), "rate"] == pytest.approx(rises[:, 0].mean().item(), abs=1e-6)
            assert rates.loc[(layer, "image", sub), "rate"] == pytest.approx(rises[:, 1:].mean().item(), abs=1e-6)


def test_summarize_original_refuses_runs_without_the_sublayer_sites(embedded_run):
    _, _, res = embedded_run
    blk = res.site("block")
    only_block = idf.IdentifyResults(sites=["block"], n_classes=res.n_classes, n_prefix=res.n_prefix,
                                     rank=res.rank[:, blk:blk + 1], target_logit=res.target_logit[:, blk:blk + 1],
                                     topk=res.topk[:, blk:blk + 1], pre_target_logit=res.pre_target_logit,
                                     mid_target_logit=res.mid_target_logit, images=res.images)
    assert idf.summarize(only_block)["convention"] == "ours"
    with pytest.raises(ValueError, match="sites 'attn' and 'mlp'"):
        idf.summarize(only_block, "original")


def test_perturbation_rates_original_add_the_class_token_to_perturbed_kinds(tmp_path):
    from circuits.embedded import SyntheticShapes
    from circuits.runs.perturb import perturbation_experiment, perturbation_rates
    from circuits.runs.sources import load_model

    model = load_model("embedded")
    runs = perturbation_experiment(model, SyntheticShapes(5, split="test"), tmp_path, ["none", "self_only"],
                                   batch_size=5, progress=False)
    ours = perturbation_rates(runs).set_index(["kind", "index"])["identifiable_token_rate"]
    orig = perturbation_rates(runs, "original").set_index(["kind", "index"])["identifiable_token_rate"]
    n_patches = model.cfg.n_patches
    for kind in ("none", "self_only"):
        tokens = pd.read_parquet(runs[kind] / "tokens")
        last = tokens[(tokens["site"] == "block") & (tokens["layer"] == model.cfg.n_layers - 1)].sort_values("index")
        for index, rank in zip(last["index"], last["rank"]):
            assert ours[(kind, index)] == pytest.approx(np.mean(rank[1:] == 0))
            expected = np.mean(rank == 0) if kind == "self_only" else np.mean(rank[1:] == 0)
            assert orig[(kind, index)] == pytest.approx(expected)
            assert len(rank) == n_patches + 1


def test_cli_perturb_passes_the_convention_to_the_printed_rates(tmp_path, monkeypatch, capsys):
    import circuits.runs.perturb as perturb
    from circuits.cli import main

    seen = []
    for name in ("perturbation_rates", "removal_rates_by_convention"):
        real = getattr(perturb, name)
        monkeypatch.setattr(perturb, name, lambda *a, _real=real, **k: seen.append(a[-1]) or _real(*a, **k))
    argv = ["perturb", "--data", "synthetic:test:4", "--out", str(tmp_path / "p"), "--kinds", "self_only",
            "--removal", "context", "--batch-size", "4", "--convention", "original"]
    assert main(argv) == 0
    assert seen == ["original", "original"]
    out = capsys.readouterr().out
    assert "rate_removed" in out and "identifiable_token_rate" in out


def test_report_shows_both_conventions_side_by_side(embedded_run):
    """The identify section's conventions table holds summarize(res, c)'s numbers for both."""
    import dataclasses

    from circuits.report.identify import _conventions_table

    _, _, res = embedded_run
    ours, orig = idf.summarize(res, "ours"), idf.summarize(res, "original")
    page = _conventions_table({"run": res}, {"run": ours}, idf.summarize)
    attn = [r["rate"] for r in orig["sublayer_change_rates"] if r["token"] == "image" and r["sublayer"] == "attn"][-1]
    attn_ours = [r["rate"] for r in ours["sublayer_change_rates"] if r["token"] == "image" and r["sublayer"] == "attn"][-1]
    assert attn != attn_ours  # the two conventions differ here, so the table shows something
    assert "attention change rate (image tokens)" in page
    row = page.split("attention change rate (image tokens)")[1].split("</tr>")[0]
    assert f"{attn_ours:.4g}" in row and f"{attn:.4g}" in row
    blk = res.site("block")
    block_only = dataclasses.replace(res, sites=["block"], rank=res.rank[:, [blk]], target_logit=res.target_logit[:, [blk]],
                                     topk=res.topk[:, [blk]])
    # runs without the attn / mlp sites are left out of the table, not refused
    assert _conventions_table({"run": block_only}, {"run": ours}, idf.summarize) == ""
