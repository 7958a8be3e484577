"""Token masks: center / corner / majority sampling of each patch's pixels, from the
source-resolution mask through the preprocessing (corner against the reference code's
cv2 token sets, tests/fixtures/vit_cls_emb), and the option reaching the runs from the CLI
(recorded in the run settings, so resume keys on it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode

from circuits.cli import main
from circuits.data.transforms import (JointTransform, MaskSampling, ProcessorTransform, SourceAxis, batch_object_tokens,
                                      mask_to_token_grid, transform_for)


def _by_loops(mask: np.ndarray, ph: int, pw: int, kind: str, threshold: float = 0.5) -> list[bool]:
    """Independent reference: walk the patches one by one, row-major."""
    out = []
    for i in range(mask.shape[0] // ph):
        for j in range(mask.shape[1] // pw):
            patch = mask[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
            if kind == "center":
                out.append(bool(patch[ph // 2, pw // 2]))
            elif kind == "corner":
                out.append(bool(patch[0, 0]))
            else:
                out.append(sum(bool(v) for v in patch.ravel()) / (ph * pw) >= threshold)
    return out


def _disagreeing_mask() -> torch.Tensor:
    """4x4 patches in a 4x16 mask (plus 2 leftover rows / 3 columns, dropped), one patch each where
    only corner, only center, only majority, or all three say "object"."""
    m = torch.zeros(6, 19, dtype=torch.bool)
    m[0, 0] = True                       # patch 0: its top-left pixel only
    m[2, 4 + 2] = True                   # patch 1: its centre pixel (2, 2) only
    m[1:4, 8 + 1:8 + 4] = True           # patch 2: a 3x3 block, 9 of 16 pixels, ...
    m[2, 8 + 2] = False                  #   less its centre: 8 of 16, neither corner nor centre
    m[:, 12:16] = True                   # patch 3: all of it
    m[4:, :] = True                      # leftover rows and columns: never read
    m[:, 16:] = True
    return m


def test_three_modes_disagree_on_a_hand_made_mask():
    m = _disagreeing_mask()
    assert mask_to_token_grid(m, 4, "corner").tolist() == [[True, False, False, True]]
    assert mask_to_token_grid(m, 4, "center").tolist() == [[False, True, False, True]]
    assert mask_to_token_grid(m, 4, "majority").tolist() == [[False, False, True, True]]  # 8/16 >= 0.5
    assert mask_to_token_grid(m, 4, "majority:0.6").tolist() == [[False, False, False, True]]
    assert mask_to_token_grid(m, 4).tolist() == mask_to_token_grid(m, 4, "center").tolist()  # the default


@pytest.mark.parametrize("spec,kind,threshold", [("center", "center", 0.5), ("corner", "corner", 0.5),
                                                 ("majority", "majority", 0.5), ("majority:0.3", "majority", 0.3)])
def test_each_mode_matches_loops_on_random_masks_with_non_square_patches(spec, kind, threshold):
    rng = np.random.default_rng(0)
    mask = rng.random((3, 11, 17)) < 0.4  # patch (2, 5): 5 x 3 grid, 1 row and 2 columns left over
    got = mask_to_token_grid(torch.from_numpy(mask), (2, 5), spec)
    assert got.shape == (3, 15)
    assert got.tolist() == [_by_loops(m, 2, 5, kind, threshold) for m in mask]


def test_majority_threshold_is_exact_at_the_boundary():
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[0, :3] = True  # 3 of 10 pixels: 0.3 >= 0.3 although 0.3 * 10 > 3 in floating point
    assert mask_to_token_grid(m, (2, 5), "majority:0.3").tolist() == [[True]]
    assert mask_to_token_grid(m, (2, 5), "majority:0.31").tolist() == [[False]]


def test_parse_round_trips_and_refuses_bad_specs():
    for text in ("center", "corner", "majority:0.5", "majority:0.25"):
        assert str(MaskSampling.parse(text)) == text
    assert MaskSampling.parse("majority") == MaskSampling("majority", 0.5)
    assert MaskSampling.parse(None) == MaskSampling("center")
    spec = MaskSampling("majority", 0.75)
    assert MaskSampling.parse(spec) is spec
    for bad, words in [("centre", "must be one of"), ("corner:0.3", "only majority"), ("majority:0", "(0, 1]"),
                       ("majority:1.5", "(0, 1]"), ("majority:half", "number"), ("majority:nan", "(0, 1]")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
            MaskSampling.parse(bad)
    with pytest.raises(ValueError, match="only applies to majority"):
        MaskSampling("center", 0.3)
    with pytest.raises(ValueError, match="share of object pixels"):
        MaskSampling("majority", True)
    with pytest.raises(TypeError, match="MaskSampling or text"):
        MaskSampling.parse(0.5)


def _settings(run_dir) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["settings"]


def test_cli_identify_records_mask_sampling_and_resume_keys_on_it(tmp_path, capsys):
    from circuits.embedded import SyntheticShapes

    out = tmp_path / "run"
    argv = ["identify", "--data", "synthetic:test:6", "--out", str(out), "--sites", "block", "--batch-size", "6"]
    assert main([*argv, "--mask-sampling", "corner"]) == 0
    assert _settings(out)["mask_sampling"] == "corner"
    images = pd.read_parquet(out / "images").sort_values("index")
    masks = torch.stack([torch.as_tensor(SyntheticShapes(6, split="test")[i]["mask"]) for i in range(6)])
    stored = np.stack(images["object_tokens"].to_numpy())[:, 1:]  # after the class token
    assert stored.tolist() == [_by_loops(m.numpy(), 4, 4, "corner") for m in masks]
    assert stored.tolist() != mask_to_token_grid(masks, 4, "center").tolist()  # the option changed the tokens
    capsys.readouterr()
    assert main([*argv, "--mask-sampling", "majority:0.5"]) == 2  # other settings: refuses to mix results
    assert "mask_sampling" in capsys.readouterr().err


def test_cli_refuses_an_unknown_mask_sampling_in_one_line(tmp_path, capsys):
    code = main(["perturb", "--data", "synthetic:test:4", "--out", str(tmp_path / "p"), "--mask-sampling", "centre"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "center, corner, majority" in err
    assert not (tmp_path / "p").exists()


def test_token_removal_counts_the_sampled_object_tokens(tmp_path):
    from circuits.embedded import SyntheticShapes
    from circuits.runs.perturb import token_removal_experiment
    from circuits.runs.sources import load_model

    model, data = load_model("embedded"), SyntheticShapes(4, split="test")
    store = token_removal_experiment(model, data, tmp_path / "tr", ["context"], batch_size=4, progress=False,
                                     mask_sampling="majority:0.25")
    assert _settings(tmp_path / "tr")["mask_sampling"] == "majority:0.25"
    kept = store.read("removal").sort_values("index")["n_kept"].tolist()
    assert kept == [sum(_by_loops(np.asarray(data[i]["mask"]), 4, 4, "majority", 0.25)) for i in range(4)]


# ------------------------------------------------------------------ source-resolution masks
FIXTURE = Path(__file__).parent / "fixtures" / "vit_cls_emb" / "masks.safetensors"
SIZES = ((224, 224), (240, 240), (333, 500), (500, 375), (256, 256))


@pytest.fixture(scope="module")
def seed_masks():
    ref = load_file(str(FIXTURE))
    masks = {(h, w): np.unpackbits(ref[f"mask.{h}x{w}"].numpy())[:h * w].reshape(h, w).astype(bool) for h, w in SIZES}
    return ref, masks


def _squash(patch: int, **kw) -> JointTransform:
    """The reference code's preprocessing: resize to 224 x 224 (ViTImageProcessor), no crop."""
    return JointTransform((224, 224), crop_mode=kw.pop("crop_mode", "squash"), crop_pct=1.0, patch_size=patch, **kw)


def test_corner_token_sets_equal_the_reference_codes_cv2_resize(seed_masks):
    ref, masks = seed_masks
    for (h, w), mask in masks.items():
        for grid, patch in ((14, 16), (7, 32)):
            want = ref[f"cv2.{h}x{w}.{grid}"].bool().reshape(1, -1)
            transforms = [_squash(patch), ProcessorTransform((224, 224), resize={"height": 224, "width": 224},
                                                             patch_size=patch)]  # ViTImageProcessor's steps
            transforms += [_squash(patch, crop_mode="center")] if h == w else []
            for t in transforms:
                assert torch.equal(MaskSampling("corner").select(t.patch_mask(mask)), want), (h, w, grid, t)


def test_corner_of_the_model_resolution_mask_is_not_the_reference_codes(seed_masks):
    """What the corner sampling read before: the mask resized to 224 first (the test above can fail)."""
    ref, masks = seed_masks
    differ = {hw: int((mask_to_token_grid(_squash(16).mask(m), 16, "corner") != ref[f"cv2.{hw[0]}x{hw[1]}.14"].bool().reshape(1, -1)).sum())
              for hw, m in masks.items()}
    assert differ[(224, 224)] == 0 and differ[(240, 240)] > 0 and differ[(333, 500)] > 0


def test_corner_after_timm_resize_and_centre_crop_reads_the_cropped_source(seed_masks):
    ref, masks = seed_masks
    t = JointTransform((224, 224), crop_pct=0.875, patch_size=16)  # resize 256, crop 224: rows 16 .. 239
    got = MaskSampling("corner").select(t.patch_mask(masks[(256, 256)]))
    assert torch.equal(got, ref["cv2crop.256x256.14"].bool().reshape(1, -1))


def test_corner_rows_equal_cv2_for_every_source_size_up_to_600(seed_masks):
    ref, _ = seed_masks
    for grid in (14, 7, 16):
        want = ref[f"rows.{grid}"].numpy()
        got = np.stack([SourceAxis(s, grid * 16, 0, grid * 16).patches(16)["corner"] for s in range(1, 601)])
        assert np.array_equal(got, want), grid


def _forward_reference(mask: np.ndarray, t: JointTransform, patch: int):
    """Centre pixel and object share per patch, found the other way round: every source pixel
    centre mapped into the model input by the image's own resize / crop (sizes and offsets
    measured on a PIL image), in floating point."""
    h, w = mask.shape
    probe = t._geometry(Image.new("L", (w, h)), InterpolationMode.NEAREST, 0)
    resized = F.resize(Image.new("L", (w, h)), t._resize_size((h, w)))
    size, res = (t.img_size[0], t.img_size[1]), (resized.height, resized.width)
    assert (probe.height, probe.width) == size
    offsets = [int(round((r - c) / 2.0)) if r >= c else -((c - r) // 2) for r, c in zip(res, size)]
    grid = [c // patch for c in size]
    per_axis = []
    for src, r, o, g in zip(mask.shape, res, offsets, grid):
        model = (np.arange(src) + 0.5) * r / src - o  # each source pixel centre, in model pixels
        patch_of = np.floor(model / patch).astype(int)
        centre = [int(np.searchsorted((np.arange(src + 1)) * r / src - o, (i + 0.5) * patch, side="right") - 1)
                  for i in range(g)]
        per_axis.append((patch_of, centre))
    (pr, cr), (pc, cc) = per_axis
    share = np.full(grid, np.nan)
    for i in range(grid[0]):
        for j in range(grid[1]):
            rows, cols = np.nonzero(pr == i)[0], np.nonzero(pc == j)[0]
            if len(rows) and len(cols):
                share[i, j] = mask[np.ix_(rows, cols)].mean()
    centre = np.array([[0 <= r < h and 0 <= c < w and bool(mask[r, c]) for c in cc] for r in cr])
    return centre, share


@pytest.mark.parametrize("crop_mode,crop_pct", [("center", 0.875), ("squash", 0.9), ("center", 1.0)])
def test_centre_and_majority_sample_the_source_pixels_under_each_patch(seed_masks, crop_mode, crop_pct):
    _, masks = seed_masks
    for (h, w), mask in masks.items():
        t = JointTransform((224, 224), crop_mode=crop_mode, crop_pct=crop_pct, patch_size=16)
        got = t.patch_mask(mask)
        centre, share = _forward_reference(mask, t, 16)
        assert np.array_equal(got[1].numpy() > 0, centre), (h, w)
        assert np.allclose(got[2].numpy(), share, rtol=0, atol=1e-12), (h, w)


def test_border_crop_pads_with_background():
    mask = np.ones((100, 300), dtype=bool)  # wide image, border mode: letterboxed rows above and below
    t = JointTransform((64, 64), crop_mode="border", crop_pct=1.0, patch_size=16)
    pm = t.patch_mask(mask)
    # resized to 21 x 64, padded by 21 rows above: patch row 0 is padding, row 1 starts in it
    assert pm[:2, 0].sum() == 0 and pm[0, 1].sum() == 0 and pm[0, 2].all() and pm[1, 1].all()
    torch.testing.assert_close(pm[2, 1], torch.full((4,), 52 / 76, dtype=torch.double))  # 52 source rows, 24 padding


def test_runs_take_the_source_mask_when_the_dataset_gives_it(seed_masks):
    _, masks = seed_masks
    t = _squash(16)
    mask = masks[(240, 240)]
    batch = {"mask": t.mask(mask)[None], "patch_mask": t.patch_mask(mask)[None]}
    assert torch.equal(batch_object_tokens(batch, 16, "corner"), MaskSampling("corner").select(batch["patch_mask"]))
    assert not torch.equal(batch_object_tokens(batch, 16, "corner"),
                           batch_object_tokens({"mask": batch["mask"]}, 16, "corner"))
    with pytest.raises(ValueError, match="transform_for"):
        batch_object_tokens(batch, 32, "corner")


def test_identify_on_imagenet_s_stores_the_source_mask_token_sets(seed_masks, tmp_path):
    """The run path: ImageNet-S items through transform_for(model) (squashed, as the reference
    code's processor) give identify the corner tokens of the original 333 x 500 / 500 x 375 masks."""
    from circuits.data import ImageNetS
    from circuits.runs.identify import identify
    from circuits.runs.sources import load_model

    _, masks = seed_masks
    model = load_model("embedded")
    root, wnid = tmp_path / "ImageNetS", "n00000001"
    (root / "validation" / wnid).mkdir(parents=True)
    (root / "validation-segmentation" / wnid).mkdir(parents=True)
    (root / "LOC_synset_mapping.txt").write_text(f"{wnid} a class\n")
    sources = [masks[(333, 500)], masks[(500, 375)]]
    for k, m in enumerate(sources):
        Image.new("RGB", m.shape[::-1], (120, 60, 200)).save(root / "validation" / wnid / f"im{k}.JPEG")
        Image.fromarray(np.stack([m.astype(np.uint8), 0 * m, 0 * m], -1).astype(np.uint8)).save(
            root / "validation-segmentation" / wnid / f"im{k}.png")  # id 1 = R
    t = transform_for({**model.cfg.data_config, "crop_mode": "squash", "crop_pct": 1.0}, patch_size=model.cfg.patch_size)
    assert t.img_size == model.cfg.img_size and t.scale_size == t.img_size
    store = identify(model, ImageNetS(root, transform=t), tmp_path / "run", sites=["block"], progress=False,
                     mask_sampling="corner")
    stored = np.stack(pd.read_parquet(store.root / "images").sort_values("index")["object_tokens"].to_numpy())
    want = torch.cat([MaskSampling("corner").select(t.patch_mask(m)) for m in sources]).numpy()
    assert stored[:, model.cfg.n_prefix_tokens:].tolist() == want.tolist()
    old = torch.cat([mask_to_token_grid(t.mask(m), model.cfg.patch_size, "corner") for m in sources]).numpy()
    assert want.tolist() != old.tolist()  # what the resized mask gave
