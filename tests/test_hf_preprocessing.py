"""Images reach a Hugging Face model as its own saved processor prepares them (issue 23 item 4):
`HookedViT.from_hf(folder)` reads preprocessor_config.json and `circuits.data.transform_for`
follows it step by step. Checked against transformers' processors on an odd-sized image
(128 x 96): its PIL backend (`...ImageProcessorPil`) op for op, max diff <= 1e-5; its default
torchvision backend resizes tensors, within a few grey levels of PIL for bicubic."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
import transformers as T

from circuits.data.transforms import transform_for
from helpers import randomize_
from hooked_vit import HookedViT
from hooked_vit.errors import UnsupportedModelError

SMALL = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96, image_size=32,
             patch_size=8)

# processor class, its options (all at the model's 32 x 32 input)
PROCESSORS = {
    "vit_squash": ("ViTImageProcessor", dict(size={"height": 32, "width": 32}, resample=3)),
    "clip_short_side_crop": ("CLIPImageProcessor", dict(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32})),
    "deit_resize_crop": ("DeiTImageProcessor", dict(size={"height": 37, "width": 37},
                                                    crop_size={"height": 32, "width": 32})),
    "bit_odd_crop_offset": ("BitImageProcessor", dict(size={"shortest_edge": 35}, resample=2,
                                                      crop_size={"height": 32, "width": 32})),
    "no_rescale_own_stats": ("ViTImageProcessor", dict(size={"height": 32, "width": 32}, do_rescale=False,
                                                       image_mean=[100, 110, 120], image_std=[50, 60, 70],
                                                       resample=0)),
    "no_normalize_lanczos": ("ViTImageProcessor", dict(size={"height": 32, "width": 32}, do_normalize=False,
                                                       resample=1)),
}


def odd_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8))


def folder_with(tmp_path, processor=None):
    randomize_(T.ViTForImageClassification(T.ViTConfig(**SMALL, num_labels=3)).eval(), std=0.2).save_pretrained(tmp_path)
    if processor is not None:
        processor.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("case", list(PROCESSORS))
def test_images_are_prepared_as_the_saved_processor_prepares_them(case, tmp_path):
    name, options = PROCESSORS[case]
    model = HookedViT.from_hf(folder_with(tmp_path, getattr(T, name + "Pil")(**options)))
    ours = transform_for(model).image(odd_image())
    for backend, tol in (("Pil", 1e-5), ("", 0.05)):  # the torchvision backend resizes tensors
        ref = getattr(T, name + backend)(**options)(odd_image(), return_tensors="pt")["pixel_values"][0]
        assert ours.shape == ref.shape == (3, 32, 32)
        scale = float(ref.abs().max()) if case.startswith("no_") else 1.0  # un-normalised pixels are 0..255
        assert float((ours - ref).abs().max()) / scale <= tol, (case, backend)


def test_a_folder_without_a_processor_gets_the_stated_default_once(tmp_path, caplog):
    folder = folder_with(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hooked_vit"):
        model = HookedViT.from_hf(folder)
        HookedViT.from_hf(folder)
    said = [r.getMessage() for r in caplog.records if "preprocessor_config.json" in r.getMessage()]
    assert len(said) == 1 and "ViTImageProcessor" in said[0] and folder in said[0]
    ref = T.ViTImageProcessorPil(size={"height": 32, "width": 32})(odd_image(), return_tensors="pt")["pixel_values"][0]
    assert float((transform_for(model).image(odd_image()) - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("options, message", [(dict(do_pad=True), "do_pad"),
                                              (dict(size={"longest_edge": 32}), "size=")])
def test_processor_steps_not_followed_are_refused(options, message, tmp_path):
    processor = T.ViTImageProcessorPil(**{"size": {"height": 32, "width": 32}, **options})
    with pytest.raises(UnsupportedModelError, match=message):
        HookedViT.from_hf(folder_with(tmp_path, processor))
