"""Thumbnails kept by identify / explain runs come from several classes (issue 23 item 17)."""

from __future__ import annotations

import numpy as np
import torch

from circuits.data import ArrayDataset
from circuits.runs.identify import identify
from circuits.runs.thumbnails import read_thumbnails, thumbnail_indices
from helpers import images, make_timm
from hooked_vit import HookedViT


def test_thumbnail_indices_round_robin_over_classes():
    labels = np.repeat([0, 1, 2], 5)  # sorted by class, like an ImageFolder
    data = ArrayDataset(np.zeros((15, 3, 4, 4), np.float32), labels)
    assert thumbnail_indices(data, 15, 4) == {0, 5, 10, 1}
    assert thumbnail_indices(data, [5, 6, 7, 12], 3) == {5, 12, 6}  # only the run's items
    assert thumbnail_indices(data, 15, 0) == 0


def test_thumbnail_indices_first_n_when_labels_need_decoding():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            raise AssertionError("labels must not be read by decoding images")

    assert thumbnail_indices(Plain(), 6, 2) == 2


def test_identify_keeps_thumbnails_of_several_classes(tmp_path):
    timm_model, size = make_timm("vit_tiny_patch16_224", seed=2)
    model = HookedViT.from_timm(timm_model)
    labels = np.repeat([0, 1, 2], 4)
    identify(model, ArrayDataset(images(size, batch=12).numpy(), labels), str(tmp_path), batch_size=6,
             thumbnails=3, progress=False)
    kept = sorted(read_thumbnails(tmp_path))
    assert sorted(labels[kept]) == [0, 1, 2] and kept == [0, 4, 8]
