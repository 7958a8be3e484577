"""Class folders -> the model's class ids; model class metadata; targets (label/predicted/class)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from circuits.data import (ImageFolderDataset, ModelClasses, TargetSpec, class_name, map_class_folders,
                           make_loader, resolve_targets, transform_for)
from circuits.embedded import CLASS_NAMES, load_embedded_timm
from hooked_vit import HookedViT
from hooked_vit.config import HookedViTConfig
from tests.conftest import make_timm


@pytest.fixture(scope="module")
def imagenet_model():
    """A randomised vit_tiny with ImageNet's 1000 outputs (timm's pretrained_cfg, no download)."""
    timm_model, size = make_timm("vit_tiny_patch16_224", num_classes=1000)
    return HookedViT.from_timm(timm_model), timm_model, size


def make_folders(root, names, per_class: int = 1, size: int = 20):
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{k}.png")
    return root


def test_wnid_folders_get_imagenet_ids(tmp_path, imagenet_model):
    hooked, timm_model, size = imagenet_model
    root = make_folders(tmp_path, ["n01530575", "n01443537"], per_class=2)  # brambling, goldfish
    for classes in (hooked, timm_model):
        ds = ImageFolderDataset(root, transform_for(hooked), classes=classes)
        assert ds.class_to_idx == {"n01443537": 1, "n01530575": 10}
        assert [ds[i]["label"] for i in range(len(ds))] == [1, 1, 10, 10]
    batch = next(iter(make_loader(ds, batch_size=4)))
    assert batch["label"].tolist() == [1, 1, 10, 10] and batch["image"].shape == (4, 3, size, size)
    assert resolve_targets(TargetSpec.parse("label"), batch["label"]).tolist() == [1, 1, 10, 10]


def test_model_class_metadata(imagenet_model):
    hooked, _, _ = imagenet_model
    assert len(hooked.cfg.label_names) == 1000 and hooked.cfg.label_names[1] == "n01443537"
    assert hooked.cfg.class_names[1].startswith("goldfish")
    assert class_name(hooked, 1) == "goldfish" and class_name(hooked, 10) == "brambling"
    small, _ = make_timm("vit_tiny_patch16_224")  # 10 classes: no known label set
    cfg = HookedViT.from_timm(small).cfg
    assert cfg.label_names is None and cfg.class_names is None and class_name(cfg, 3) == "3"
    big, _ = make_timm("vit_tiny_patch16_224", num_classes=11821, depth=1)  # timm's ImageNet-12k
    classes = ModelClasses.of(big)
    assert len(classes.label_names) == 11821 and classes.label_names[0] == "n00005787"
    embedded = HookedViT.from_timm(load_embedded_timm())
    assert embedded.cfg.label_names == CLASS_NAMES and class_name(embedded, 7) == "L"


def test_config_class_fields():
    base = dict(d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_classes=2)
    cfg = HookedViTConfig.from_dict({**base, "label_names": ["a", "b"]})  # json gives lists
    assert cfg.label_names == ("a", "b") and HookedViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="class_names has 3 entries for n_classes=2"):
        HookedViTConfig(**base, class_names=("a", "b", "c"))


def test_class_name_folders(tmp_path, imagenet_model):
    hooked, _, _ = imagenet_model
    mapped = map_class_folders(["goldfish", "Great_White_Shark", "n01484850", "TENCH"], hooked)
    assert dict(mapped.folder_to_id) == {"goldfish": 1, "Great_White_Shark": 2, "n01484850": 2, "TENCH": 0}
    assert mapped.source == "model classes"
    with pytest.raises(ValueError, match=r"'crane' matches classes \[134, 517\]"):
        map_class_folders(["crane"], hooked)  # the bird and the machine
    with pytest.raises(ValueError, match="'gold fish', 'goldfsh' match no class.*labels file"):
        map_class_folders(["goldfish", "gold fish", "goldfsh"], hooked)  # exact only, never fuzzy
    with pytest.raises(ValueError, match="goldfsh"):
        ImageFolderDataset(make_folders(tmp_path, ["goldfsh"]), classes=hooked)


def test_integer_and_sorted_folders(imagenet_model):
    hooked, _, _ = imagenet_model
    assert dict(map_class_folders(["10", "2", "007"], hooked).folder_to_id) == {"10": 10, "2": 2, "007": 7}
    with pytest.raises(ValueError, match="class id 1000"):
        map_class_folders(["1000"], hooked)
    plain = map_class_folders(["dog", "cat"])  # no model metadata: torchvision ImageFolder order
    assert dict(plain.folder_to_id) == {"cat": 0, "dog": 1} and plain.source == "sorted folders"
    with pytest.raises(ValueError, match="WordNet ids but the model has no class metadata"):
        map_class_folders(["n01443537", "n01530575"])
    with pytest.raises(ValueError, match="mix integer names"):
        map_class_folders(["3", "dog"])


def test_labels_files(tmp_path, imagenet_model):
    hooked, _, _ = imagenet_model
    (tmp_path / "map.json").write_text(json.dumps({"fish": 1, "bird": 10}))
    (tmp_path / "map.csv").write_text("folder,class\nfish,1\nbird,10\n")
    for name in ("map.json", "map.csv"):
        mapped = map_class_folders(["bird", "fish"], hooked, tmp_path / name)
        assert dict(mapped.folder_to_id) == {"bird": 10, "fish": 1} and mapped.source == "labels file"
    with pytest.raises(ValueError, match="'cat' are not in labels file"):
        map_class_folders(["cat", "fish"], hooked, tmp_path / "map.json")
    (tmp_path / "bad.csv").write_text("fish,1.5\n")
    with pytest.raises(ValueError, match="not 'folder, non-negative class id'"):
        map_class_folders(["fish"], hooked, tmp_path / "bad.csv")
    (tmp_path / "big.json").write_text(json.dumps({"fish": 5000}))
    with pytest.raises(ValueError, match="outside the model's 1000 classes"):
        map_class_folders(["fish"], hooked, tmp_path / "big.json")
    ds = ImageFolderDataset(make_folders(tmp_path / "data", ["fish", "bird"]), labels=tmp_path / "map.csv")
    assert sorted((s[1] for s in ds.samples)) == [1, 10]


def test_flat_folder_is_unlabeled(tmp_path, imagenet_model):
    hooked, _, _ = imagenet_model
    for k in range(3):
        Image.new("RGB", (20, 20), (k * 40, 0, 0)).save(tmp_path / f"{k}.jpg")
    ds = ImageFolderDataset(tmp_path, transform_for(hooked))
    batch = next(iter(make_loader(ds, batch_size=3)))
    assert batch["label"].tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="3 of 3 images have no label.*predicted"):
        resolve_targets(TargetSpec.parse("label"), batch["label"])
    logits = hooked(batch["image"])
    predicted = resolve_targets(TargetSpec.parse("predicted"), batch["label"], logits)
    assert torch.equal(predicted, logits.argmax(-1))
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="beside class folders"):
        ImageFolderDataset(tmp_path)


def test_target_spec(imagenet_model):
    hooked, _, _ = imagenet_model
    labels, logits = torch.tensor([3, 5]), torch.randn(2, 1000)
    assert TargetSpec.parse("goldfish", hooked) == TargetSpec("class", 1)
    assert TargetSpec.parse("n01530575", hooked) == TargetSpec("class", 10)
    fixed = TargetSpec.parse("7", hooked)
    assert resolve_targets(fixed, labels, logits).tolist() == [7, 7] and not fixed.needs_logits
    assert TargetSpec.parse("predicted").needs_logits and str(fixed) == "7"
    with pytest.raises(ValueError, match="'goldfsh' is not 'label', 'predicted'"):
        TargetSpec.parse("goldfsh", hooked)
    with pytest.raises(ValueError, match="class id 1000"):
        TargetSpec.parse("1000", hooked)
    with pytest.raises(ValueError, match="outside the model's 10 classes"):
        resolve_targets(TargetSpec.parse("12"), labels, torch.randn(2, 10))
    with pytest.raises(ValueError, match="needs the model's logits"):
        resolve_targets(TargetSpec.parse("predicted"), labels)
