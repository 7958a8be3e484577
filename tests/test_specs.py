"""One model-spec grammar, resolved in the model layer (hooked_vit/specs.py): the command line's
`--model` and `HookedViT.from_pretrained` read the same strings the same way (issue 23 items 12,
13; issue 24 item 6); specs naming a missing path are refused at once."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from circuits.cli import main
from circuits.runs.sources import load_model
from circuits.runs.specs import parse_model_spec as parse_cli_spec
from helpers import images, randomize_
from hooked_vit import HookedViT
from hooked_vit.errors import UserError
from hooked_vit.specs import parse_model_spec

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                             "head_width": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A registered tiny open_clip architecture and a random checkpoint of it on disk."""
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("open_clip")
    (root / "TinyViT-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(root / "TinyViT-test.json")
    clip = randomize_(open_clip.create_model("TinyViT-test").eval(), std=0.2)
    (root / "models").mkdir()
    torch.save(clip.state_dict(), root / "models" / "x.pt")
    return clip, root / "models" / "x.pt"


def test_open_clip_file_tag_is_the_same_model_on_the_cli_and_in_python(tiny_open_clip, monkeypatch):
    clip, path = tiny_open_clip
    monkeypatch.chdir(path.parent.parent)
    text = "open_clip:TinyViT-test:models/x.pt"
    cli_spec = parse_cli_spec(text)
    assert (cli_spec.kind, cli_spec.name) == ("open_clip", "TinyViT-test:models/x.pt")
    assert cli_spec == parse_model_spec(text)
    x = images(32)
    with torch.no_grad():
        ref = clip.encode_image(x)
        for model in (HookedViT.from_pretrained(text), load_model(text)):
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text, message", [
    ("hf:./models/does_not_exist", "no such folder"),
    ("hf:/nowhere/at/all", "no such folder"),
    ("open_clip:ViT-B-32:models/missing.pt", "does not exist"),
    ("models/missing.safetensors", "does not exist"),
    ("runs/models/missing", "looks like a path"),
])
def test_a_missing_path_is_refused_at_once_in_python(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    attempts = no_network(monkeypatch)
    with pytest.raises(UserError, match=message):
        HookedViT.from_pretrained(text, arch="vit_tiny_patch16_224") if text.endswith(".safetensors") \
            else HookedViT.from_pretrained(text)
    assert attempts == []


def no_network(monkeypatch) -> list:
    """Record (and refuse) every attempt to open a network connection."""
    attempts = []

    def connect(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in this test")

    def create_connection(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return attempts


def test_cli_refuses_a_missing_hf_folder_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    """Not a folder here and not in the local cache: refused without asking the network (it
    waited 37 s and printed ~22 warning lines twice)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    attempts = no_network(monkeypatch)
    code = main(["identify", "--model", "hf:models/does_not_exist", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and attempts == [], (attempts, err)
    assert "models/does_not_exist" in err[0] and "save_pretrained" in err[0]


def test_arch_is_refused_where_the_spec_is_not_a_checkpoint():
    with pytest.raises(UserError, match="checkpoint file"):
        parse_cli_spec("vit_tiny_patch16_224", "vit_small_patch16_224")


def test_random_weights_are_seeded_without_touching_the_global_generator():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = HookedViT.from_pretrained("timm:vit_tiny_patch16_224", random_weights=True, seed=3, depth=1, img_size=32)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = HookedViT.from_pretrained("vit_tiny_patch16_224", random_weights=True, seed=3, depth=1, img_size=32)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_cli_texts_refuse_an_uncached_hub_id_without_the_network(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    attempts = no_network(monkeypatch)
    code = main(["identify", "--model", "hf:someone/clip", "--texts", "a cat,a dog", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and attempts == [] and "local Hugging Face cache" in err[0], (attempts, err)
