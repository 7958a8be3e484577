"""The command line on a researcher's own data: offline random weights, class targets, resume."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from circuits.cli import main


def _image_folder(root, classes, per_class=2, size=(60, 50)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.random.default_rng(i + 7 * len(c)).integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.jpg")
    return root


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_random_weights_timm_name_runs_offline_with_imagenet_targets(tmp_path, no_network, capsys):
    data = _image_folder(tmp_path / "data", ["n01443537", "n01530575"])  # goldfish, brambling
    code = main(["identify", "--model", "vit_tiny_patch16_224", "--random-weights", "--data", str(data),
                 "--out", str(tmp_path / "run"), "--sites", "block", "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    images = pd.read_parquet(tmp_path / "run" / "images")
    assert images["target"].tolist() == [1, 1, 10, 10]  # ImageNet ids, not the folders' order
    assert images["target_name"].tolist() == ["goldfish", "goldfish", "brambling", "brambling"]
    settings = json.loads((tmp_path / "run" / "manifest.json").read_text())["settings"]
    assert settings["target"] == "label"


def test_pretrained_weights_not_cached_fail_at_once(tmp_path, no_network, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    code = main(["identify", "--model", "timm:vit_tiny_patch16_224", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "not in the local cache" in err and "--arch" in err


def test_target_predicted_and_fixed_class_are_recorded(tmp_path, capsys):
    data = _image_folder(tmp_path / "flat_parent" / "x", ["a"])  # a folder of images, no labels
    flat = data / "a"
    base = ["identify", "--model", "embedded", "--data", str(flat), "--sites", "block"]
    assert main(base + ["--out", str(tmp_path / "r1")]) == 2  # no labels: 'label' refused
    assert "predicted" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "r2"), "--target", "predicted"]) == 0
    images = pd.read_parquet(tmp_path / "r2" / "images")
    assert (images["target"] == images["pred"]).all()
    assert main(base + ["--out", str(tmp_path / "r3"), "--target", "2"]) == 0
    assert set(pd.read_parquet(tmp_path / "r3" / "images")["target"]) == {2}
    assert json.loads((tmp_path / "r3" / "manifest.json").read_text())["settings"]["target"] == "2"


def test_labels_file_maps_folders(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", ["fish", "bird"])
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"fish": 1, "bird": 10}))
    args = ["identify", "--model", "vit_tiny_patch16_224", "--random-weights", "--data", str(data),
            "--sites", "block", "--out", str(tmp_path / "run")]
    assert main(args) == 2  # folder names the model does not know: refused, naming the fix
    assert "labels" in capsys.readouterr().err
    assert main(args + ["--labels", str(labels)]) == 0
    assert sorted(set(pd.read_parquet(tmp_path / "run" / "images")["target"])) == [1, 10]


def test_resume_is_keyed_on_content_not_paths_or_limit(tmp_path, monkeypatch, capsys):
    import timm
    from safetensors.torch import save_file

    from helpers import randomize_

    model = randomize_(timm.create_model("vit_tiny_patch16_224", depth=1, embed_dim=48, num_heads=4,
                                         num_classes=3, img_size=32).eval(), std=0.2)
    save_file(model.state_dict(), tmp_path / "tiny.safetensors")
    _image_folder(tmp_path / "data", ["0", "1", "2"], per_class=2)
    monkeypatch.chdir(tmp_path)
    arch = ["--arch", "vit_tiny_patch16_224:depth=1,embed_dim=48,num_heads=4,img_size=32"]
    common = ["identify", *arch, "--sites", "block", "--batch-size", "2", "--out", str(tmp_path / "run")]
    assert main(common + ["--model", "tiny.safetensors", "--data", "data", "--limit", "2"]) == 0
    first = sorted((tmp_path / "run" / "images").glob("part-*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in first]
    assert len(pd.read_parquet(tmp_path / "run" / "images")) == 2
    # absolute paths, a larger limit: the same run, continued
    assert main(common + ["--model", str(tmp_path / "tiny.safetensors"), "--data", str(tmp_path / "data"),
                          "--limit", "4"]) == 0, capsys.readouterr().err
    assert len(pd.read_parquet(tmp_path / "run" / "images")) == 4
    assert [p.stat().st_mtime_ns for p in first] == stamps  # the first batch was not redone
    assert main(common + ["--model", "tiny.safetensors", "--data", "./data"]) == 0
    images = pd.read_parquet(tmp_path / "run" / "images")
    assert sorted(images["index"]) == list(range(6))
    # different content is still refused: another label mapping
    (tmp_path / "labels.json").write_text(json.dumps({"0": 2, "1": 1, "2": 0}))
    capsys.readouterr()
    assert main(common + ["--model", "tiny.safetensors", "--data", "data", "--labels", "labels.json"]) == 2
    assert "other settings" in capsys.readouterr().err
