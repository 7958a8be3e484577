"""Class-identifiability metrics (Vilas et al. 2023) on small hand-made inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from circuits import identifiability as idf


def test_identifiability_by_layer_splits_cls_and_image_tokens():
    rank = np.array([[[[0, 5, 10], [2, 0, 0]]]])  # N=1, S=1, L=2, P=3 (1 prefix token)
    df = idf.identifiability_by_layer(rank, n_classes=10, n_prefix=1, sites=["block"])
    got = {(r.layer, r.token): r.identifiability for r in df.itertuples()}
    assert got[(0, "cls")] == pytest.approx(1.0)
    assert got[(0, "image")] == pytest.approx(1 - 15 / 20)
    assert got[(1, "cls")] == pytest.approx(0.8)
    assert got[(1, "image")] == pytest.approx(1.0)


def test_identifiable_rates():
    rank_last = np.array([[9, 0, 0, 3, 1],  # 2 of 4 image tokens identifiable
                          [0, 4, 4, 4, 4]])  # none (the class token does not count)
    rates = idf.identifiable_rates(rank_last, n_prefix=1)
    assert rates["identifiable_token_rate"] == pytest.approx((0.5 + 0.0) / 2)
    assert rates["images_with_identifiable_token"] == pytest.approx(0.5)


def test_block_and_sublayer_change_rates():
    pre = np.array([[[0.0, 1.0, 1.0, 1.0]]])  # N=1, L=1, P=4
    mid = np.array([[[1.0, 2.0, 0.0, 1.0]]])
    post = np.array([[[0.0, 3.0, 1.0, 0.5]]])
    assert idf.block_change_rate(pre, post, n_prefix=1).tolist() == pytest.approx([1 / 3])  # 1 -> 3 only
    df = idf.sublayer_change_rates(pre, mid, post, n_prefix=1).set_index(["token", "sublayer"])["rate"]
    assert df[("cls", "attn")] == 1.0 and df[("cls", "mlp")] == 0.0
    assert df[("image", "attn")] == pytest.approx(1 / 3)  # only token 1 rises (1 -> 2)
    assert df[("image", "mlp")] == pytest.approx(2 / 3)  # tokens 1 (2 -> 3) and 2 (0 -> 1)


def test_residual_composition():
    blk = np.array([[[0, 1, 2, 3], [0, 1, 2, 3]]])  # N=1, L=2, P=4, no prefix
    att = np.array([[[0, 9, 9, 9], [9, 9, 9, 3]]])
    mlp = np.array([[[9, 1, 9, 9], [9, 9, 2, 3]]])
    df = idf.residual_composition(blk, att, mlp, n_prefix=0)
    assert df.loc[0, ["attn", "mlp", "none"]].tolist() == [0.25, 0.25, 0.5]
    assert np.isnan(df.loc[0, "previous"])
    assert df.loc[1, ["attn", "mlp", "previous", "none"]].tolist() == [0.25, 0.5, 1.0, 0.0]


def test_context_vs_object_permutation_test():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 16)) < 0.3
    values = np.where(mask, 0.9, 0.5) + rng.normal(0, 0.05, mask.shape)
    res = idf.context_vs_object(values, mask, n_permutations=300)
    assert res["difference"] == pytest.approx(0.4, abs=0.02)
    assert res["p_value"] == pytest.approx(1 / 301)
    null = idf.context_vs_object(rng.normal(0, 1, mask.shape), mask, n_permutations=300)
    assert null["p_value"] > 0.01


def test_pretrained_vs_random_wilcoxon_is_one_sided():
    rng = np.random.default_rng(1)
    random = rng.random(30) * 0.1
    assert idf.pretrained_vs_random(random + 0.5, random)["p_value"] < 1e-4
    assert idf.pretrained_vs_random(random, random + 0.5)["p_value"] > 0.99
