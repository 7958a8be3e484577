"""Evaluation and feature studies of a dictionary on edge cases: unlabeled images, the model's
own normalisation in thumbnails, models with no logit lens."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from circuits.data import ArrayDataset
from circuits.plot import display_rgb
from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
from circuits.sae.evaluate import evaluate_dictionary
from circuits.sae.features import feature_logit_lens, feature_thumbnails, study_features
from hooked_vit import HookedViT
from helpers import randomize_

HOOK = "blocks.1.hook_resid_post"


def _model(num_classes: int = 5):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                            embed_dim=32, num_heads=2, num_classes=num_classes)
    return HookedViT.from_timm(randomize_(vit.eval(), seed=5))


def _sae():
    sae = SparseDictionary(DictionaryConfig(32, 64, "topk", k=4, hook_name=HOOK), seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


def _data(labels):
    x = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return ArrayDataset(x.numpy(), labels)


def test_unlabeled_images_are_scored_against_the_clean_prediction():
    model, sae = _model(), _sae()
    labelled = _data([0, 1, 2, 3])
    preds = model(torch.stack([labelled[i]["image"] for i in range(4)])).argmax(-1).tolist()
    mixed = evaluate_dictionary(model, sae, _data([-1, 1, -1, 3]), batch_size=2)
    same = evaluate_dictionary(model, sae, _data([preds[0], 1, preds[2], 3]), batch_size=2)
    assert mixed["unlabeled_images"] == 2 and same["unlabeled_images"] == 0
    for key in ("accuracy_clean", "ce_clean", "accuracy_spliced", "ce_spliced", "ce_spliced_with_error"):
        assert mixed[key] == pytest.approx(same[key], rel=1e-6)
    assert mixed["max_logit_change_with_error"] < 1e-4  # the error term restores the clean model


def test_thumbnails_undo_the_models_normalisation():
    model, sae = _model(), _sae()
    model.cfg.data_config = {"mean": (0.2, 0.4, 0.6), "std": (0.1, 0.2, 0.3)}
    data = _data([0, 1, 2])
    result = study_features(model, sae, data, batch_size=3, top_k=2)
    feature = int(np.argmax(result["top_values"][:, 0]))
    thumbs = feature_thumbnails(model, data, result, [feature], max_px=16)
    first = thumbs[feature][0]
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["png"]))))
    np.testing.assert_array_equal(png, display_rgb(model, data[first["image"]]["image"][None])[0])


def test_logit_lens_only_where_one_residual_vector_has_logits():
    sae = _sae()
    lens = feature_logit_lens(_model(), sae)
    assert lens["classes"].shape == (64, 5)
    assert feature_logit_lens(_model(num_classes=0), sae) is None
    avg = _model()
    avg.cfg.global_pool = "token_avg"  # DINOv2 classifier pooling: W_U is refused, the lens is skipped
    assert feature_logit_lens(avg, sae) is None
