"""load_image: every Pillow mode to the right 8-bit RGB; 16-bit PNGs predict like their 8-bit copy."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from circuits.data import ImageFolderDataset, load_image, make_loader, transform_for
from circuits.data.images import BACKGROUND, to_rgb
from hooked_vit import HookedViT
from tests.conftest import make_timm

RNG = np.random.default_rng(0)


def grey(values: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> the RGB [H, W, 3] it must become."""
    return np.repeat(values[..., None], 3, axis=-1)


def load(img: Image.Image, path, **save) -> np.ndarray:
    img.save(path, **save)
    out = load_image(path)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = RNG.integers(0, 65536, (9, 7)).astype(np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = load(img, tmp_path / "a.png")
    np.testing.assert_array_equal(out, grey(np.round(values / 65535 * 255).astype(np.uint8)))
    assert 60 < out.mean() < 200  # Image.convert("RGB") would give almost all 255


@pytest.mark.parametrize("values, expected", [
    (np.array([[0, 65535], [257, 32896]]), np.array([[0, 255], [1, 128]])),  # 16-bit data in "I"
    (np.array([[-100, 100], [0, 50]]), np.array([[0, 255], [128, 191]])),  # own range
])
def test_int32_tiff(tmp_path, values, expected):
    img = Image.fromarray(values.astype(np.int32))
    assert img.mode == "I"
    np.testing.assert_array_equal(load(img, tmp_path / "a.tif"), grey(expected.astype(np.uint8)))


@pytest.mark.parametrize("values, expected", [
    (np.array([[0.0, 1.0], [0.5, 0.25]]), np.array([[0, 255], [128, 64]])),  # [0, 1]: as given
    (np.array([[10.0, 30.0], [20.0, 15.0]]), np.array([[0, 255], [128, 64]])),  # own range
])
def test_float_tiff(tmp_path, values, expected):
    img = Image.fromarray(values.astype(np.float32))
    assert img.mode == "F"
    np.testing.assert_array_equal(load(img, tmp_path / "a.tif"), grey(expected.astype(np.uint8)))


def test_float_with_nan_is_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_rgb(Image.fromarray(np.array([[np.nan, 1.0]], np.float32)))


def test_grey_and_bilevel(tmp_path):
    values = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
    np.testing.assert_array_equal(load(Image.fromarray(values), tmp_path / "l.png"), grey(values))
    bits = RNG.random((6, 5)) > 0.5
    out = load(Image.fromarray(bits), tmp_path / "one.png")
    np.testing.assert_array_equal(out, grey(bits.astype(np.uint8) * 255))


def composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The expected result of alpha over the white background."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(rgb * a + np.array(BACKGROUND) * (1 - a))


def test_alpha_is_composited_on_white(tmp_path):
    rgb = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    alpha = np.array([0, 255, 128, 30, 200], np.uint8)[None].repeat(6, 0)
    out = load(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), tmp_path / "rgba.png")
    np.testing.assert_allclose(out, composite(rgb, alpha), atol=1)
    assert (out[:, 0] == 255).all()  # fully transparent -> background, not the hidden colour
    la = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    np.testing.assert_allclose(load(la, tmp_path / "la.png"), composite(grey(rgb[..., 0]), alpha), atol=1)


def test_palette_with_transparency(tmp_path):
    index = np.array([[0, 1], [2, 1]], np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 250] + [0] * (256 * 3 - 9))
    out = load(img, tmp_path / "p.png", transparency=1)  # index 1 is transparent
    np.testing.assert_array_equal(out, [[[10, 20, 30], list(BACKGROUND)], [[0, 0, 250], list(BACKGROUND)]])
    pa = Image.fromarray(np.dstack([index, np.array([[255, 0], [255, 0]], np.uint8)]), "LA")
    pa = Image.merge("PA", (Image.fromarray(index, "P"), pa.getchannel("A")))
    pa.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 250] + [0] * (256 * 3 - 9))
    np.testing.assert_array_equal(np.asarray(to_rgb(pa)), out)
    np.testing.assert_array_equal(load(img, tmp_path / "opaque.png"),
                                  [[[10, 20, 30], [200, 0, 0]], [[0, 0, 250], [200, 0, 0]]])


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)  # white, cyan, black
    out = load(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.tif")
    np.testing.assert_array_equal(out, [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]])


def test_exif_orientation_is_applied(tmp_path):
    pixels = RNG.integers(0, 256, (2, 3, 3), dtype=np.uint8)  # H=2, W=3
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load(Image.fromarray(pixels), tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(out, np.rot90(pixels, k=-1))  # H=3, W=2
    stored = np.asarray(load_image(tmp_path / "o.png", exif_orientation=False))
    np.testing.assert_array_equal(stored, pixels)


@pytest.mark.parametrize("ext", [".gif", ".tif"])
def test_first_frame(tmp_path, ext):
    frames = [Image.new("RGB", (4, 4), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / f"a{ext}", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / f"a{ext}") as check:
        assert check.n_frames == 2
    out = load_image(tmp_path / f"a{ext}")
    assert out.getpixel((1, 1))[0] > 200 and out.getpixel((1, 1))[2] < 50


def test_folder_loads_every_format_and_lists_the_rest(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    for ext in (".tif", ".gif", ".webp", ".bmp", ".ppm"):
        Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / "a" / f"x{ext}")
    (tmp_path / "a" / "readme.txt").write_text("no image")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level(logging.WARNING, logger="circuits.data"):
        ds = ImageFolderDataset(tmp_path)
        items = [ds[i] for i in range(len(ds))]
    assert sorted(p.rsplit(".", 1)[-1] for p, _ in ds.samples) == ["bmp", "gif", "png", "ppm", "tif", "webp"]
    assert [p.rsplit("/", 1)[-1] for p, _ in ds.ignored] == ["readme.txt"] and "Pillow" in ds.ignored[0][1]
    assert sum(item is None for item in items) == 1 and ds.skipped[0][1].endswith("broken.png")
    assert any("readme.txt" in r.getMessage() for r in caplog.records)
    for item in items:
        if item is not None:
            assert item["image"][1].mean() > 0.7 and item["image"][0].mean() < 0.1, item["path"]


def test_sixteen_bit_png_predicts_like_its_eight_bit_copy(tmp_path):
    timm_model, size = make_timm("vit_tiny_patch16_224", seed=3)
    model = HookedViT.from_timm(timm_model).eval()
    yy, xx = np.mgrid[0:size, 0:size]
    rows = []
    for k in range(3):  # smooth images with real structure, so the prediction depends on them
        field = np.sin(xx / (3 + k) + k) * np.cos(yy / (4 + k)) * 0.5 + 0.5
        rows.append(np.round(field * 65535).astype(np.uint16))
    for k, values in enumerate(rows):
        (tmp_path / "sixteen").mkdir(exist_ok=True)
        (tmp_path / "eight").mkdir(exist_ok=True)
        Image.fromarray(values).save(tmp_path / "sixteen" / f"{k}.png")
        Image.fromarray(np.round(values / 257).astype(np.uint8)).save(tmp_path / "eight" / f"{k}.png")
    transform = transform_for(model)
    batches = {name: next(iter(make_loader(ImageFolderDataset(tmp_path / name, transform), 3)))
               for name in ("sixteen", "eight")}
    with torch.no_grad():
        logits = {name: model(b["image"]) for name, b in batches.items()}
        exact = model(torch.stack([transform.image(torch.from_numpy(v / 65535).float().expand(3, -1, -1))
                                   for v in rows]))
    assert torch.equal(logits["sixteen"].argmax(-1), logits["eight"].argmax(-1))
    assert torch.allclose(logits["sixteen"], logits["eight"], atol=1e-5)
    # against the unquantised image: only the 8-bit rounding (<= 0.5 / 255 per pixel) differs
    step = (logits["sixteen"] - exact).abs().max()
    # Pillow's own convert("RGB") clips 16-bit values to white: the error this guards against
    clipped = torch.stack([transform.image(Image.open(p).convert("RGB")) for p in batches["sixteen"]["path"]])
    with torch.no_grad():
        wrong = (model(clipped) - exact).abs().max()
    assert step < 0.05 * wrong, (step, wrong)
