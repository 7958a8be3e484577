"""Fast tests for the embedded synthetic dataset and the shipped embedded ViTs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.embedded import (CLASS_NAMES, EMBEDDED_NAMES, MEAN, N_CLASSES, STD, SyntheticShapes, collate,
                               embedded_info, load_embedded_timm, normalize)


def _same_item(a: dict, b: dict) -> bool:
    return (torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
            and all(a[k] == b[k] for k in ("label", "background", "group", "index")))


def test_constants():
    assert N_CLASSES == len(CLASS_NAMES) == 10
    assert MEAN == STD == (0.5, 0.5, 0.5)


def test_item_format():
    item = SyntheticShapes(4, seed=1, transform=None)[2]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.bool
    assert isinstance(item["label"], int) and 0 <= item["label"] < N_CLASSES
    assert item["background"] in (0, 1) and item["index"] == 2
    with pytest.raises(IndexError):
        SyntheticShapes(4)[4]


def test_determinism_from_seed():
    a, b, c = SyntheticShapes(50, seed=7), SyntheticShapes(50, seed=7), SyntheticShapes(50, seed=8)
    for i in (0, 13, 49):
        assert _same_item(a[i], b[i])
        assert not torch.equal(a[i]["image"], c[i]["image"])
    assert not torch.equal(a[3]["image"], a[4]["image"])
    # split and dataset length do not change unrelated items / do change the stream
    assert _same_item(SyntheticShapes(1000, seed=7)[13], a[13])
    assert not torch.equal(SyntheticShapes(50, seed=7, split="test")[13]["image"], a[13]["image"])


@pytest.mark.parametrize("difficulty", ["normal", "hard"])
def test_masks_cover_object(difficulty):
    ds = SyntheticShapes(60, seed=3, difficulty=difficulty)
    for i in range(len(ds)):
        img, mask, colour, _, _ = ds.render(i)
        assert mask.sum() >= 6, "object mask is (nearly) empty"
        assert mask.sum() < 0.5 * mask.size
        dist = np.abs(img - colour).max(-1)  # [H, W] distance to the object colour
        assert np.median(dist[mask]) < 0.12, "pixels under the mask do not show the object"
        assert torch.equal(ds[i]["mask"], torch.from_numpy(mask))
        # the mask is the whole object: pixels just outside it are not object-coloured on average
        assert np.median(dist[~mask]) > np.median(dist[mask])
    big = SyntheticShapes(30, seed=3)
    assert np.mean([big[i]["mask"].sum().item() for i in range(30)]) > 40


def test_correlation_knob():
    n = 2000
    for rho in (0.1, 0.9, 0.97):
        ds = SyntheticShapes(n, seed=11, spurious_corr=rho)
        metas = [ds.meta(i) for i in range(n)]
        p = np.mean([bg == lab % 2 for lab, bg in metas])
        assert abs(p - rho) < 0.03, (rho, p)
    ds = SyntheticShapes(n, seed=11, spurious_corr=None)
    labels, bgs = np.array([ds.meta(i) for i in range(n)]).T
    assert abs(np.mean(bgs == labels % 2) - 0.5) < 0.04
    assert abs(bgs[labels % 2 == 0].mean() - bgs[labels % 2 == 1].mean()) < 0.07  # independence
    assert set(np.unique(labels)) == set(range(N_CLASSES))
    for i in (0, 5, 77):  # meta agrees with the rendered items
        item = ds[i]
        assert (item["label"], item["background"]) == ds.meta(i)
    with pytest.raises(ValueError):
        SyntheticShapes(10, spurious_corr=1.5)


def test_group_ids_and_collate():
    ds = SyntheticShapes(64, seed=2, spurious_corr=0.5)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate)))
    default = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["mask"].shape == (16, 32, 32)
    assert torch.equal(batch["group"], batch["label"] * 2 + batch["background"])
    assert torch.equal(batch["image"], default["image"]) and torch.equal(batch["group"], default["group"])
    assert ((batch["group"] >= 0) & (batch["group"] < 2 * N_CLASSES)).all()
    assert torch.equal(batch["index"], torch.arange(16))


def test_transform_applied():
    ds = SyntheticShapes(3, seed=0)  # normalised by default: the embedded models' preprocessing
    raw = SyntheticShapes(3, seed=0, transform=None)
    assert torch.allclose(ds[1]["image"], (raw[1]["image"] - 0.5) / 0.5)


def _fresh_eval(which: str, n: int, seed: int = 12345) -> dict:
    """Accuracy and group accuracies of a shipped model on fresh independent test data."""
    model = load_embedded_timm(which)
    difficulty = embedded_info(which)["test_dataset"]["difficulty"]
    ds = SyntheticShapes(n, seed=seed, split="test", difficulty=difficulty, transform=None)
    batch = collate([ds[i] for i in range(n)])
    with torch.no_grad():
        preds = model(normalize(batch["image"])).argmax(-1)  # [n]
    correct = (preds == batch["label"]).float()
    groups = [correct[batch["group"] == g].mean().item() for g in batch["group"].unique()]
    return {"acc": correct.mean().item(), "avg_group": float(np.mean(groups)), "worst_group": min(groups)}


def test_default_weights_accuracy():
    import timm.data
    from timm.models.vision_transformer import VisionTransformer
    model = load_embedded_timm("default")
    assert isinstance(model, VisionTransformer) and not model.training
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and tuple(cfg["mean"]) == MEAN and tuple(cfg["std"]) == STD
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert _fresh_eval("default", 256)["acc"] >= 0.9


def test_spurious_weights_use_background():
    res = _fresh_eval("spurious", 1200)
    assert res["worst_group"] < res["avg_group"] - 0.15, res
    info = embedded_info("spurious")
    assert info["worst_group_accuracy"] < info["avg_group_accuracy"]
    assert info["train_dataset"]["spurious_corr"] >= 0.9


def test_info_and_identifiability():
    info = embedded_info("default")
    assert info["model_kwargs"]["global_pool"] == "token" and info["model_kwargs"]["class_token"]
    assert info["test_accuracy"] >= 0.92 and info["test_dataset"]["split"] == "test"
    ident = info["identifiability"]
    assert len(ident) == info["model_kwargs"]["depth"]
    assert ident[-1] > 0.6 and ident[-1] > max(ident[:2])
    assert embedded_info("spurious")["model_kwargs"] == info["model_kwargs"]


def test_identifiability_recomputed():
    from circuits.embedded.synthetic import materialize
    from circuits.embedded.train import identifiability
    data = materialize(SyntheticShapes(128, seed=99, split="test"))
    ident = identifiability(load_embedded_timm("default"), data["images"], data["labels"])
    assert ident[-1] > 0.6 and ident[-1] > ident[0]


def test_unknown_and_no_pickle(monkeypatch):
    with pytest.raises(ValueError, match="default"):
        load_embedded_timm("nope")
    with pytest.raises(ValueError, match="spurious"):
        embedded_info("nope")

    def _no_pickle(*a, **k):
        raise AssertionError("torch.load (pickle) must not be used")
    monkeypatch.setattr(torch, "load", _no_pickle)
    assert set(EMBEDDED_NAMES) == {"default", "spurious"}
    for which in EMBEDDED_NAMES:
        load_embedded_timm(which)
