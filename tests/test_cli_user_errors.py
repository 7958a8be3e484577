"""User errors vs internal errors on the command line (issue 23, items 9, 10, 11, 14).

A user error (hooked_vit.errors.UserError, or an OS error about a path) is one line
`hooked-vit CMD: error: ...`, exit 2; any other exception is a bug: its traceback and a
"please report" line, exit 1, with or without -v."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from circuits.cli import main


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1 and lines[0].startswith(f"hooked-vit {command}: error: "), err
    return lines[0]


@pytest.fixture
def class_folders(tmp_path):
    root = tmp_path / "images"
    for name in ("disc", "square"):  # classes of the embedded model
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 60 * i + 20, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=3)
    path = tmp_path / "x.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_bad_arch_override_value_names_the_option(checkpoint, tmp_path, capsys):
    assert main(["identify", "--model", str(checkpoint), "--arch", "vit_tiny_patch16_224:depth=two",
                 "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys, "identify")
    assert "vit_tiny_patch16_224" in line and "depth='two'" in line


@pytest.mark.parametrize("content,suffix", [("{bad", ".json"), ('"a list"', ".json"), ("", ".json")])
def test_bad_labels_file_names_the_file(content, suffix, class_folders, tmp_path, capsys):
    labels = tmp_path / f"bad{suffix}"
    labels.write_text(content)
    assert main(["identify", "--data", str(class_folders), "--labels", str(labels), "--out", str(tmp_path / "run")]) == 2
    assert str(labels) in _error_line(capsys, "identify")


def test_missing_labels_file_is_one_line_naming_it(class_folders, tmp_path, capsys):
    missing = tmp_path / "nowhere.json"
    assert main(["identify", "--data", str(class_folders), "--labels", str(missing), "--out", str(tmp_path / "run")]) == 2
    assert str(missing) in _error_line(capsys, "identify")


@pytest.mark.parametrize("option,value", [("--workers", "-2"), ("--limit", "-1"), ("--limit", "0"),
                                          ("--batch-size", "0"), ("--limit", "two")])
def test_counts_are_checked_by_the_option(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["identify", "--out", str(tmp_path / "run"), option, value])
    assert exit_.value.code == 2
    line = _error_line(capsys, "identify")
    assert f"argument {option}" in line and value in line
    assert not (tmp_path / "run").exists()


def test_library_refuses_a_negative_limit_and_workers(tmp_path):
    from circuits.embedded import SyntheticShapes
    from circuits.runs.identify import identify
    from circuits.runs.sources import load_model
    from hooked_vit import UserError

    model, data = load_model("embedded"), SyntheticShapes(4, split="test")
    with pytest.raises(UserError, match="limit=-1"):
        identify(model, data, tmp_path / "a", limit=-1, progress=False)
    with pytest.raises(UserError, match="num_workers=-2"):
        identify(model, data, tmp_path / "b", num_workers=-2, progress=False)


def _raise(err):
    def run(*args, **kwargs):
        raise err
    return run


@pytest.mark.parametrize("verbose", [[], ["-v"]])
@pytest.mark.parametrize("err", [RuntimeError("boom"), ValueError("an internal value"), KeyError("k"),
                                 TypeError("an internal type")])
def test_internal_errors_show_a_traceback_and_ask_for_a_report(err, verbose, tmp_path, capsys, monkeypatch):
    import circuits.runs.identify as identify

    monkeypatch.setattr(identify, "identify", _raise(err))
    assert main([*verbose, "identify", "--out", str(tmp_path / "run"), "--limit", "2"]) == 1
    out = capsys.readouterr().err
    assert "Traceback" in out and type(err).__name__ in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("hooked-vit identify: internal error") and "please report" in last


def test_user_errors_get_their_traceback_with_verbose(tmp_path, capsys):
    assert main(["-v", "identify", "--out", str(tmp_path / "run"), "--model", "nosuchsource:thing"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("hooked-vit identify: error: ")


def test_unknown_hook_is_a_user_error_and_a_key_error():
    from hooked_vit import UserError
    from circuits.runs.sources import load_model

    model = load_model("embedded")
    with pytest.raises(UserError) as info:
        model.check_hook_name("blocks.0.hook_nothing")
    assert isinstance(info.value, KeyError) and str(info.value).startswith("unknown hook point")


def test_decompose_names_the_default_reference_not_the_data(tmp_path, capsys, monkeypatch):
    """A 48-pixel model with images of its own and a default --reference that cannot be read
    (the synthetic set now renders at any square size, so a broken default stands in): the
    message names the option instead of blaming --data."""
    import timm

    import circuits.commands.decompose as decompose_command

    monkeypatch.setattr(decompose_command, "DEFAULT_REFERENCE", "synthetic:val:many")
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=48, num_classes=2)
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    root = tmp_path / "mine"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((48, 48, 3), 90, dtype=np.uint8)).save(root / name / "0.png")
    (tmp_path / "labels.json").write_text(json.dumps({"a": 0, "b": 1}))
    assert main(["decompose", "--model", str(tmp_path / "m.safetensors"), "--arch", "vit_tiny_patch16_224:depth=1,img_size=48",
                 "--data", str(root), "--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys, "decompose")
    assert "--reference synthetic:val:many (the default" in line and "pass --reference" in line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "identify"
    assert main(["identify", "--data", "synthetic:test:4", "--limit", "2", "--out", str(out)]) == 0
    return out


def test_report_out_under_a_file_or_a_folder_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    import circuits.report as report

    capsys.readouterr()
    monkeypatch.setattr(report, "SECTIONS", [])  # refused before any section renders
    (tmp_path / "a_file").write_text("x")
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "a_file" / "report.html")]) == 2
    assert "a_file is a file, not a folder" in _error_line(capsys, "report")
    (tmp_path / "folder").mkdir()
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "folder")]) == 2
    assert "is a folder; give the report's file name" in _error_line(capsys, "report")
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "new" / "r.html")]) == 0
    assert (tmp_path / "new" / "r.html").is_file()
