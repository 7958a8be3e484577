"""Dataset layer: ImageNet-S tree + masks, joint transforms (== timm), token grids, skipping."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from circuits.data import (ArrayDataset, ImageFolderDataset, ImageNetS, JointTransform, collate_samples,
                           denormalize, make_loader, mask_to_token_grid, transform_for)
from circuits.data.samples import Skipped

# Mapping has 5 rows; 3 of them have folders. Labels = rows 1, 3, 4. Official ImageNet-S ids
# number the subset's classes in sorted order from 1 -> 1, 2, 3; "imagenet" ids = label + 1.
WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004", "n00000005"]
PRESENT = {"n00000002": (1, 1), "n00000004": (3, 2), "n00000005": (4, 3)}  # wnid: (label, subset id)
H, W = 24, 32


def rgb_ids(ids: np.ndarray) -> Image.Image:
    """Encode int ids [H, W] as an ImageNet-S PNG: R = id % 256, G = id // 256."""
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def id_map(own: int, label: int) -> np.ndarray:
    """Rows 0-5: own id (the object); 6-11: label + 1 (another class under the official ids);
    12-17: own + 256 (same R, other G: catches an R-only decoder); 18-20: 1000 (ignore); rest 0."""
    ids = np.zeros((H, W), np.int64)
    ids[0:6, 4:20] = own
    ids[6:12, 4:20] = label + 1
    ids[12:18, 4:20] = own + 256
    ids[18:21, :] = 1000
    return ids


@pytest.fixture()
def imagenet_s(tmp_path):
    root = tmp_path / "ImageNetS"
    (root / "validation").mkdir(parents=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {i}, alias\n" for i, w in enumerate(WNIDS)))
    rng = np.random.default_rng(0)
    for wnid, (label, own) in PRESENT.items():
        (root / "validation" / wnid).mkdir()
        (root / "validation-segmentation" / wnid).mkdir(parents=True)
        for k in range(2):
            img = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            img.save(root / "validation" / wnid / f"img_{k}.JPEG")
            rgb_ids(id_map(own, label)).save(root / "validation-segmentation" / wnid / f"img_{k}.png")
    Image.new("RGB", (W, H)).save(root / "validation" / "n00000005" / "nomask.JPEG")  # no mask file
    return root


def test_imagenet_s_labels_and_subset_masks(imagenet_s):
    ds = ImageNetS(imagenet_s)
    assert len(ds) == 6  # the image without a mask is left out
    assert [ds[i]["label"] for i in range(6)] == [1, 1, 3, 3, 4, 4]
    assert ds.class_names[3] == "class 3, alias"
    expected = np.zeros((H, W), bool)
    expected[0:6, 4:20] = True  # only the own-id block: not label + 1, not own + 256, not 1000
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i and item["path"].endswith(".JPEG") and item["has_mask"]
        assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
        assert item["mask"].dtype == torch.bool
        np.testing.assert_array_equal(item["mask"].numpy(), expected)


def test_imagenet_s_imagenet_ids_and_unmasked(imagenet_s):
    ds = ImageNetS(imagenet_s, seg_ids="imagenet", require_masks=False)
    assert len(ds) == 7
    expected = np.zeros((H, W), bool)
    expected[6:12, 4:20] = True  # label + 1 block
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), expected)
    nomask = [ds[i] for i in range(7) if ds[i]["path"].endswith("nomask.JPEG")]
    assert len(nomask) == 1 and not nomask[0]["has_mask"] and not nomask[0]["mask"].any()
    assert nomask[0]["mask"].shape == (H, W)


def test_imagenet_s_categories_file(imagenet_s):
    # an (unsorted) categories file listing a class with no folder shifts the official ids
    (imagenet_s / "ImageNetS_categories_im4.txt").write_text("n00000004\nn00000001\nn00000005\nn00000002\n")
    ds = ImageNetS(imagenet_s)
    assert ds.seg_id == {"n00000002": 2, "n00000004": 3, "n00000005": 4}


def test_imagenet_s_errors(tmp_path, imagenet_s):
    with pytest.raises(FileNotFoundError, match="validation-segmentation"):
        ImageNetS(tmp_path / "nowhere")
    (imagenet_s / "LOC_synset_mapping.txt").rename(tmp_path / "mapping.txt")
    with pytest.raises(FileNotFoundError, match="LOC_synset_mapping.txt"):
        ImageNetS(imagenet_s)
    assert len(ImageNetS(imagenet_s, synset_mapping=tmp_path / "mapping.txt")) == 6
    (imagenet_s / "validation" / "n99999999").mkdir()
    with pytest.raises(ValueError, match="n99999999"):
        ImageNetS(imagenet_s, synset_mapping=tmp_path / "mapping.txt")


def test_joint_transform_moves_mask_with_image(imagenet_s):
    # crop_pct 1, 32 -> 16 on a square image: nearest downsampling by 2 keeps the block exactly
    t = transform_for({"input_size": (3, 16, 16), "crop_pct": 1.0, "interpolation": "bilinear"})
    square = np.zeros((32, 32), bool)
    square[0:16, 0:16] = True
    _, m = t(Image.new("RGB", (32, 32)), square)
    expected = np.zeros((16, 16), bool)
    expected[0:8, 0:8] = True
    np.testing.assert_array_equal(m.numpy(), expected)
    # non-square image, shorter-side resize + centre crop: the image of the mask lands on the mask
    t = transform_for({"input_size": (3, 16, 16), "crop_pct": 0.875, "mean": (0, 0, 0), "std": (1, 1, 1)})
    blob = np.zeros((30, 50), bool)
    blob[5:22, 14:33] = True
    img, m = t(Image.fromarray(blob.astype(np.uint8) * 255).convert("RGB"), blob)
    agree = ((img[0] > 0.5) == m).float().mean()
    assert m.any() and not m.all() and agree > 0.95
    ds = ImageNetS(imagenet_s, transform=t)
    assert ds[0]["image"].shape == (3, 16, 16) and ds[0]["mask"].shape == (16, 16)


CONFIGS = [
    {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.875},
    {"input_size": (3, 32, 48), "interpolation": "bilinear", "crop_pct": 0.9,
     "mean": (0.5,) * 3, "std": (0.5,) * 3},
    {"input_size": (3, 32, 32), "crop_pct": 0.95, "crop_mode": "squash"},
    {"input_size": (3, 28, 40), "crop_pct": 0.8, "crop_mode": "border"},
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("size", [(50, 37), (37, 61)])
def test_transform_equals_timm(cfg, size):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    data_config = resolve_data_config(cfg)
    ref = create_transform(**data_config, is_training=False)(img)
    out, mask = transform_for(data_config)(img, np.ones(size[::-1], bool))
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    assert mask.shape == ref.shape[1:]


def test_transform_for_models():
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    t = transform_for(model)
    assert (t.img_size, t.crop_pct, t.mean, t.patch_size) == ((224, 224), 0.9, (0.5, 0.5, 0.5), (16, 16))
    hooked_like = SimpleNamespace(cfg=SimpleNamespace(img_size=(48, 40), data_config={"crop_pct": 1.0}))
    t = transform_for(hooked_like)
    assert (t.img_size, t.scale_size, t.interpolation.value) == ((48, 40), (48, 40), "bicubic")
    assert t.patch_size is None and transform_for({}, patch_size=8).patch_size == (8, 8)


def test_denormalize_round_trip():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    out, _ = JointTransform((16, 16), mean=mean, std=std, crop_pct=1.0)(img)
    raw = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    assert torch.allclose(denormalize(out[None], mean, std)[0], raw, atol=1e-6)


def test_mask_to_token_grid():
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[0, 0] = True  # not a patch centre: token 0 stays background
    m[2, 6] = True  # centre of patch (0, 1) -> token 1
    m[5:8, 1:4] = True  # covers the centre (6, 2) of patch (1, 0) -> token 2
    assert mask_to_token_grid(m, 4).tolist() == [[False, True, True, False]]
    # batch, non-square patches (2 x 4: centres at rows 1, 3 and columns 2, 6), leftover column
    b = torch.zeros(2, 4, 9, dtype=torch.bool)
    b[0, 3, 6] = True
    b[1, 1, 2] = True
    b[1, 1, 8] = True  # in the leftover column: ignored
    assert mask_to_token_grid(b, (2, 4)).tolist() == [[False, False, False, True], [True, False, False, False]]


def test_corrupt_image_is_skipped_and_reported(imagenet_s, caplog):
    bad = imagenet_s / "validation" / "n00000004" / "img_1.JPEG"
    bad.write_bytes(np.random.default_rng(3).integers(0, 256, 300, dtype=np.uint8).tobytes())
    ds = ImageNetS(imagenet_s)
    bad_index = [s[0] for s in ds.samples].index(str(bad))
    with caplog.at_level(logging.WARNING, logger="circuits.data"):
        batches = list(make_loader(ds, batch_size=2))
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    assert [s[:2] for s in ds.skipped] == [(bad_index, str(bad))] and ds.skipped[0][2]
    seen = torch.cat([b["index"] for b in batches if b is not None]).tolist()
    assert seen == [i for i in range(len(ds)) if i != bad_index]
    assert sum((b["skipped"] for b in batches if b is not None), []) == [bad_index]
    # worker processes: the dataset copy is the worker's, the collate still reports the index
    batches = list(make_loader(ds, batch_size=3, num_workers=1))
    assert sum((b["skipped"] for b in batches), []) == [bad_index]
    assert sum(len(b["path"]) for b in batches) == len(ds) - 1


def test_collate_and_loader_range():
    ds = ArrayDataset(np.zeros((6, 4, 4, 3), np.uint8), labels=[0, 1, 2, 3, 4, 5])
    batch = collate_samples([ds[0], None, Skipped(5, "x", "err"), ds[1]])
    assert batch["image"].shape == (2, 3, 4, 4) and batch["label"].tolist() == [0, 1]
    assert batch["skipped"] == [-1, 5] and batch["path"] == ["", ""]
    assert collate_samples([None, Skipped(2, "", "")]) is None
    batches = list(make_loader(ds, batch_size=2, start=1, limit=4))
    assert [b["index"].tolist() for b in batches] == [[1, 2], [3]]


def test_image_folder(tmp_path):
    for cls, names in {"b_dog": ["x.JPG", "y.png"], "a_cat": ["z.Jpeg", "notes.txt"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            path = tmp_path / cls / n
            if n.endswith(".txt"):
                path.write_text("not an image")
            else:
                Image.new("RGB", (10, 12), (255, 0, 0)).save(path, format="PNG" if "png" in n else "JPEG")
    ds = ImageFolderDataset(tmp_path)
    assert [(s[0].rsplit("/", 1)[-1], s[1]) for s in ds.samples] == [("z.Jpeg", 0), ("x.JPG", 1), ("y.png", 1)]
    assert ds[0]["image"].shape == (3, 12, 10) and ds[0]["path"].endswith("z.Jpeg")
    ds = ImageFolderDataset(tmp_path, transform_for({"input_size": (3, 8, 8)}), {"a_cat": 7, "b_dog": 3})
    assert [ds[i]["label"] for i in range(3)] == [7, 3, 3] and ds[2]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="b_dog"):
        ImageFolderDataset(tmp_path, labels={"a_cat": 0})
    assert [p.rsplit("/", 1)[-1] for p, _ in ds.ignored] == ["notes.txt"]  # listed, not dropped


def test_array_dataset():
    rng = np.random.default_rng(4)
    u8 = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    ds = ArrayDataset(u8, np.array([2, 0, 1]))
    assert ds[1]["label"] == 0 and ds[1]["path"] == ""
    assert torch.allclose(ds[2]["image"], torch.from_numpy(u8[2]).permute(2, 0, 1).float() / 255)
    ds = ArrayDataset(u8, transform=transform_for({"input_size": (3, 4, 4), "crop_pct": 1.0}))
    assert ds[0]["image"].shape == (3, 4, 4) and ds[0]["label"] == -1
    floats = rng.random((2, 3, 5, 5)).astype(np.float32)
    assert torch.equal(ArrayDataset(floats, [0, 1])[1]["image"], torch.from_numpy(floats[1]))
    with pytest.raises(ValueError):
        ArrayDataset(floats.transpose(0, 2, 3, 1))


def test_imagenet_s_items_carry_the_source_mask_under_each_patch(imagenet_s):
    """With the patch size, the token flags come from the 24 x 32 source mask, not the resized one."""
    from circuits.data.transforms import MaskSampling, batch_object_tokens

    t = JointTransform((16, 16), crop_mode="squash", crop_pct=1.0, patch_size=4)
    batch = next(iter(make_loader(ImageNetS(imagenet_s, transform=t), batch_size=2)))
    assert batch["patch_mask"].shape == (2, 3, 4, 4) and batch["mask"].shape == (2, 16, 16)
    # corner: source rows 0, 6, 12, 18 and columns 0, 8, 16, 24; the object is rows 0-5, columns 4-19
    corner = np.zeros((4, 4), bool)
    corner[0, 1:3] = True
    assert batch_object_tokens(batch, 4, "corner").tolist() == [corner.ravel().tolist()] * 2
    share = np.zeros((4, 4))
    share[0] = [4 / 8, 1, 4 / 8, 0]  # source patch 6 x 8: columns 4-7, 8-15, 16-19 are object
    np.testing.assert_allclose(batch["patch_mask"][0, 2].numpy(), share)
    assert MaskSampling("majority").select(batch["patch_mask"]).sum() == 2 * 3
    assert "patch_mask" not in ImageNetS(imagenet_s, transform=JointTransform((16, 16)))[0]  # no patch size
