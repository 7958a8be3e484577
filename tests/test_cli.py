"""The command line: help texts, identify on a local checkpoint and folder, the report."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import timm
from PIL import Image
from safetensors.torch import save_file

from circuits.cli import main
from helpers import randomize_

COMMANDS = ["identify", "perturb", "memories", "probe", "explain", "decompose", "textspan", "report", "demo",
            "train-embedded"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    assert exit_.value.code == 0
    assert "usage: hooked-vit" in capsys.readouterr().out


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "circuits.cli", "--help"], capture_output=True, text=True, check=True)
    assert all(cmd in out.stdout for cmd in COMMANDS)


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = randomize_(timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=48, num_heads=4,
                                         num_classes=2, img_size=32).eval(), std=0.2)
    save_file(model.state_dict(), root / "tiny.safetensors")
    for label in ("cat", "dog"):
        (root / "data" / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i + 10 * len(label)).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / label / f"{i}.jpg")
    return root


def test_identify_and_report_from_the_command_line(checkpoint_and_data, capsys):
    root = checkpoint_and_data
    args = ["identify", "--model", str(root / "tiny.safetensors"), "--data", str(root / "data"),
            "--out", str(root / "run"), "--batch-size", "4"]
    assert main(args + ["--arch", "vit_tiny_patch16_224"]) == 2  # wrong size: a clear error
    assert "shape mismatch at blocks.0.attn.qkv.weight" in capsys.readouterr().err
    code = main(args + ["--arch", "vit_tiny_patch16_224:depth=2,embed_dim=48,num_heads=4,img_size=32"])
    assert code == 0, capsys.readouterr().err
    images = pd.read_parquet(root / "run" / "images")
    assert len(images) == 6 and set(images["label"]) == {0, 1}
    assert main(["report", str(root / "run"), "--out", str(root / "report.html")]) == 0
    html = (root / "report.html").read_text()
    assert "plotly" in html.lower() and "Class identifiability" in html and "<script" in html


def test_bad_data_path_is_a_clear_error(capsys):
    assert main(["identify", "--model", "embedded", "--data", "/no/such/dir", "--out", "/tmp/x"]) == 2
    assert "does not exist" in capsys.readouterr().err
