"""User errors end in one line `hooked-vit CMD: error: ...` and exit 2, never a traceback;
`--help` is fast and shows defaults; `--version` exists."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from circuits.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1 and lines[0].startswith(f"hooked-vit {command}: error: "), err
    return lines[0]


@pytest.fixture
def flat_images(tmp_path):
    folder = tmp_path / "images" / "disc"  # a class of the embedded model
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder.parent


@pytest.mark.parametrize("argv,needle", [
    (["--model", "x.safetensors", "--arch", "vit_no_such_arch"], "does not know the model"),
    (["--model", "x.safetensors", "--arch", "vit_tiny_patch16_224:depth"], "key=value"),
    (["--model", "nosuchsource:thing"], "unknown model source"),
    (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "nodevice"],
     "--device"),
    (["--sites", "attn.hook_pattern"], "cannot be projected"),
    (["--sites", "blocks.0.hook_resid_post"], "without 'blocks.N.'"),
    (["--sites", "hook_nothing"], "hook"),
    (["--target", "12345"], "outside the model's"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"")  # the file exists: the architecture is what is wrong
    assert main(["identify", "--out", str(tmp_path / "run"), "--limit", "2", *argv]) == 2
    assert needle in _error_line(capsys, "identify")
    assert not (tmp_path / "run" / "manifest.json").exists()  # refused before any run started


def test_out_pointing_at_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["identify", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in _error_line(capsys, "identify")


def test_explain_bad_method_spec(tmp_path, capsys):
    assert main(["explain", "--out", str(tmp_path / "run"), "--methods", "tokentm:necc"]) == 2
    assert "key=value" in _error_line(capsys, "explain")


def test_perturb_checks_masks_before_running(flat_images, tmp_path, capsys, monkeypatch):
    import circuits.runs.perturb as perturb

    def must_not_run(*args, **kwargs):
        raise AssertionError("the attention half ran before the masks were checked")

    monkeypatch.setattr(perturb, "perturbation_experiment", must_not_run)
    assert main(["perturb", "--data", str(flat_images), "--out", str(tmp_path / "run")]) == 2
    assert "needs object masks" in _error_line(capsys, "perturb")


def test_ctrl_c_says_the_run_resumes(tmp_path, capsys, monkeypatch):
    import circuits.runs.identify as identify

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(identify, "identify", interrupted)
    assert main(["identify", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "same command" in err and "resume" in err


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "circuits.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("command", ["identify", "perturb", "explain", "memories", "probe", "decompose", "textspan",
                                     "demo", "report"])
def test_help_is_fast_and_shows_defaults(command):
    start = time.perf_counter()
    out = _cli(command, "--help")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert elapsed < 3.0, f"{command} --help took {elapsed:.1f} s (heavy imports at module level?)"
    if command != "report":
        assert "(default:" in out.stdout


def test_help_imports_no_torch():
    code = ("import sys, circuits.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stderr


def test_version():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("hooked-vit ")
