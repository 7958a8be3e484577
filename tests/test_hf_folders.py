"""A researcher's own Hugging Face folders (issue 23 items 1, 3): class names from id2label,
class-name / WordNet-id image folders mapped as the timm model with the same labels maps them,
CLIP towers refused in class space without text classes."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

pytest.importorskip("transformers")
import transformers as T

from circuits.cli import main
from circuits.data.classes import ModelClasses, map_class_folders
from circuits.runs.results import read_table
from helpers import randomize_, save_hf_clip_folder
from hooked_vit import HookedViT

SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
             patch_size=8)
FOLDERS = ["Tree_Frog", "goldfish", "great_white_shark", "tench"]


def imagenet_descriptions() -> list[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_descriptions())


def save_hf_vit(folder, id2label=None) -> None:
    kwargs = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {"num_labels": 5}
    hf = T.ViTForImageClassification(T.ViTConfig(**SMALL, **kwargs)).eval()
    randomize_(hf, std=0.2).save_pretrained(folder)


def image_folder(root, names, n=2, size=(40, 30)):
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def imagenet_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "vit_in1k"
    save_hf_vit(folder, dict(enumerate(imagenet_descriptions())))
    return folder


def test_from_hf_reads_id2label_into_class_names(tmp_path):
    save_hf_vit(tmp_path, {0: "cat", 1: "dog", 2: "red car"})
    cfg = HookedViT.from_hf(str(tmp_path)).cfg
    assert cfg.class_names == ("cat", "dog", "red car") and cfg.label_names is None
    assert map_class_folders(["red_car", "Dog", "cat"], cfg).folder_to_id == {"red_car": 2, "Dog": 1, "cat": 0}


def test_placeholder_labels_are_no_names(tmp_path):
    save_hf_vit(tmp_path)  # transformers' LABEL_0 ... LABEL_4
    assert HookedViT.from_hf(str(tmp_path)).cfg.class_names is None


def test_class_and_wnid_folders_map_as_the_timm_model_does(imagenet_hf):
    hooked = HookedViT.from_hf(str(imagenet_hf))
    timm_model = timm.create_model("vit_tiny_patch16_224", num_classes=1000, depth=1, pretrained=False)
    ours, theirs = map_class_folders(FOLDERS, hooked), map_class_folders(FOLDERS, timm_model)
    assert ours.folder_to_id == theirs.folder_to_id == {"Tree_Frog": 31, "goldfish": 1, "great_white_shark": 2,
                                                        "tench": 0}
    wnids = list(ModelClasses.of(timm_model).label_names[:3])
    assert map_class_folders(wnids, hooked).folder_to_id == {w: i for i, w in enumerate(wnids)}


def test_cli_identify_on_an_hf_folder_gives_the_timm_targets(imagenet_hf, tmp_path):
    data = image_folder(tmp_path / "data", FOLDERS)
    assert main(["identify", "--model", f"hf:{imagenet_hf}", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--sites", "block"]) == 0
    images = read_table(tmp_path / "run", "images")
    timm_model = timm.create_model("vit_tiny_patch16_224", num_classes=1000, depth=1, pretrained=False)
    expected = map_class_folders(FOLDERS, timm_model)
    folders = [p.split("/")[-2] for p in images["path"]]
    assert list(images["target"]) == [expected[f] for f in folders]
    assert sorted(set(images["target"])) == [0, 1, 2, 31]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_hf_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.mark.parametrize("command", [["identify"], ["perturb"], ["explain"], ["memories"],
                                     ["circuit", "--budget", "2"]])
def test_clip_tower_without_texts_is_refused_in_class_space(command, clip_folder, tmp_path, capsys):
    data = image_folder(tmp_path / "data", ["a_cat", "a_dog"], n=1)
    code = main([*command, "--model", f"hf:{clip_folder}", "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "without text classes" in err and "--texts" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_clip_tower_with_texts_runs_with_the_prompts_as_classes(clip_folder, tmp_path):
    data = image_folder(tmp_path / "data", ["a_cat", "a_dog"], n=2)
    (tmp_path / "classes.txt").write_text("# prompts\na red car\n")
    assert main(["identify", "--model", f"hf:{clip_folder}", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--texts", "a cat,a dog", "--text-file", str(tmp_path / "classes.txt"), "--sites", "block"]) == 0
    images = read_table(tmp_path / "run", "images")
    assert list(images["target"]) == [0, 0, 1, 1]  # folder names matched to the prompts
    tokens = read_table(tmp_path / "run", "tokens")
    assert int(tokens["topk"].map(max).max()) <= 2  # three classes, not 24 embedding dimensions


def test_python_identify_refuses_a_clip_tower_without_texts(clip_folder):
    from circuits.projection import project_batch
    from hooked_vit.errors import UserError

    model = HookedViT.from_hf(str(clip_folder))
    with pytest.raises(UserError, match="without text classes"):
        project_batch(model, torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
