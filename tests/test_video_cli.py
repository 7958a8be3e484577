"""Video runs from the command line (docs/video.md, "Command line"): the embedded clips and video
folders as --data for identify and perturb, a run killed with kill -9 resumes to the results of an
uninterrupted run, an undecodable video is reported on one line while the run goes on, and the
commands that do not run on video refuse it in one line."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from circuits.cli import main
from circuits.runs.results import read_manifest, read_table
from circuits.runs.specs import parse_data_spec

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ["--model", "embedded:video_motion", "--random-weights"]
TABLES = ("images", "tokens", "stream", "thumbnails", "attention")


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    keys = {"tokens": ["index", "site", "layer"], "stream": ["index", "layer"], "attention": ["index", "layer"]}
    out = {}
    for name in TABLES:
        df = read_table(run, name)
        out[name] = df.sort_values(keys.get(name, ["index"]), kind="stable").reset_index(drop=True).astype(
            {"site": str} if name == "tokens" else {})
    return out


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        left, right = a[col].tolist(), b[col].tolist()
        if a[col].dtype == object and len(left) and hasattr(left[0], "__len__") and not isinstance(left[0], str):
            assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(left, right)), col
        else:
            assert left == right, col


def test_moving_shapes_specs():
    spec = parse_data_spec("moving_shapes_static:val:5")
    assert (spec.kind, spec.task, spec.split, spec.n, spec.is_video) == ("moving_shapes", "shape", "val", 5, True)
    spec = parse_data_spec("moving_shapes")
    assert (spec.task, spec.split, spec.n) == ("motion", "test", 512)
    assert not parse_data_spec("synthetic").is_video


@pytest.mark.slow  # a subprocess (imports ~10 s on two shared cores) and three runs of 12 clips
def test_video_run_killed_with_kill_9_resumes_to_the_uninterrupted_results(tmp_path):
    args = ["identify", *VIDEO, "--data", "moving_shapes:test:12", "--batch-size", "2"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "killed.log", "wb")  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "video_cli_driver.py"), "0.25", *args,
                             "--out", str(killed)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    manifest = killed / "manifest.json"
    while not (manifest.exists() and read_manifest(killed)["done"]):  # the first batch is on disk
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the run wrote no batch in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL
    done_before = read_manifest(killed)["done"]
    assert 0 < len(done_before) < 12  # killed mid-run
    assert main([*args, "--out", str(killed)]) == 0  # the same command resumes
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert read_manifest(killed)["done"] == list(range(12))
    resumed, whole = _tables(killed), _tables(tmp_path / "whole")
    assert len(whole["images"]) == 12 and len(whole["attention"]) > 0
    for name in TABLES:
        _same(resumed[name], whole[name])


def _write_video(path: Path, frames: int = 8, size: int = 32, step: int = 20) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(frames):
            pixels = np.full((size, size, 3), step * i % 256, np.uint8)
            pixels[:, (4 * i) % size:(4 * i) % size + 6] = 255  # a bar moving right
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def video_folder(tmp_path):
    pytest.importorskip("av", reason="PyAV not installed: pip install 'hooked-vit[video]'")
    root = tmp_path / "clips"
    _write_video(root / "right" / "a.mp4")
    _write_video(root / "left" / "b.mp4", step=10)
    (root / "left" / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 not a video at all")
    _write_video(root / "up" / "c.mp4", frames=10)
    return root


def test_undecodable_video_is_reported_on_one_line_and_the_run_goes_on(video_folder, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="circuits.data"):
        assert main(["identify", *VIDEO, "--data", str(video_folder), "--out", str(out), "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 items done, 1 skipped" in printed
    skipped = [line for line in printed.splitlines() if "broken.webm" in line]
    assert len(skipped) == 1 and skipped[0].strip().startswith("skipped")
    warnings = [r.getMessage() for r in caplog.records if "broken.webm" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    images = read_table(out, "images")
    assert sorted(Path(p).name for p in images["path"]) == ["a.mp4", "b.mp4", "c.mp4"]
    # class folders map onto the model's classes by name (right 0, left 1, up 3)
    assert dict(zip((Path(p).name for p in images["path"]), images["label"])) == {"a.mp4": 0, "b.mp4": 1, "c.mp4": 3}
    assert read_table(out, "thumbnails")["width"].tolist() == [4 * 32] * 3  # strips of the 4 frames read

    assert main(["perturb", *VIDEO, "--data", str(video_folder), "--out", str(tmp_path / "pt"),
                 "--kinds", "no_cross_frame"]) == 0
    printed = capsys.readouterr().out
    assert "no_cross_frame" in printed and "token removal: not offered for video models yet" in printed
    assert len(read_table(tmp_path / "pt" / "attention" / "no_cross_frame", "images")) == 3


def test_limit_on_a_video_folder_spreads_over_the_classes(video_folder, tmp_path, capsys):
    from circuits.data.video import VideoFolderDataset

    out = tmp_path / "run"
    assert main(["identify", *VIDEO, "--data", str(video_folder), "--out", str(out), "--limit", "2"]) == 0
    manifest = read_manifest(out)
    labels = [s[1] for s in VideoFolderDataset(video_folder, 4).samples]  # left, left, right, up
    chosen = manifest["done"]
    assert manifest["settings"]["limit_sample"] and len(chosen) == 2 and len({labels[i] for i in chosen}) == 2


def test_perturb_no_cross_frame_changes_the_ranks_of_a_video_run(tmp_path, capsys):
    out = tmp_path / "pt"
    assert main(["perturb", *VIDEO, "--data", "moving_shapes:test:4", "--out", str(out),
                 "--kinds", "self_only", "no_cross_frame"]) == 0
    table = capsys.readouterr().out
    assert all(kind in table for kind in ("none", "self_only", "no_cross_frame"))
    none = np.stack(read_table(out / "attention" / "none", "tokens")["rank"])
    cut = np.stack(read_table(out / "attention" / "no_cross_frame", "tokens")["rank"])
    assert none.shape == cut.shape and (none != cut).any()
    assert read_manifest(out / "attention" / "no_cross_frame")["settings"]["perturbation"] == "no_cross_frame"


@pytest.mark.parametrize("argv, message", [
    (["explain", *VIDEO, "--data", "moving_shapes:test:4"], "`hooked-vit explain` does not run on video yet"),
    (["sae", "features", *VIDEO, "--data", "moving_shapes:test:4", "--sae", "none"],
     "`hooked-vit sae features` does not run on video yet"),
    (["identify", "--data", "moving_shapes:test:4"], "is an image model"),
    (["identify", *VIDEO, "--data", "synthetic:test:4"], "holds images and embedded:video_motion"),
    (["identify", *VIDEO, "--data", "moving_shapes:test:4", "--num-frames", "8"], "reads exactly 4 frames"),
    (["perturb", *VIDEO, "--data", "moving_shapes:test:4", "--removal", "context"],
     "token removal is not offered for video models yet"),
    (["perturb", "--data", "synthetic:test:4", "--kinds", "no_cross_frame"], "no_cross_frame needs a video model"),
    (["circuit", "--data", "synthetic:test:4", "--corruption", "reverse_frames"],
     "corruption 'reverse_frames' acts on the frames of clips [b, t, c, h, w] (video models); embedded is an "
     "image model"),
])
def test_what_does_not_run_on_video_is_refused_in_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_circuit_run_on_the_shipped_motion_model(tmp_path, capsys):
    """`hooked-vit circuit` on a video model: EAP-IG against the clips played backwards, a
    circuit of 20 of the 100 edges grown from the logits recovers most of the logit difference
    (the must-show figure of tests/test_video_embedded.py, through the command line); the node
    scores cover every space-time token; a rerun returns the finished run."""
    argv = ["circuit", "--model", "embedded:video_motion", "--data", "moving_shapes:test:48", "--limit", "48",
            "--batch-size", "24", "--corruption", "reverse_frames", "--method", "eap-ig", "--greedy",
            "--out", str(tmp_path / "circuit")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "circuit" / "summary.json").read_text())
    assert summary["n_edges"] == 100 and summary["n_edges_kept"] == 20 and summary["n_images"] == 48
    assert summary["metric_clean"] > 1 > -1 > summary["metric_corrupted"]  # the reversed clips flip the answer
    assert summary["faithfulness"] > 0.7, summary
    nodes = pd.read_parquet(tmp_path / "circuit" / "node_scores.parquet")
    assert int(nodes["pos"].max()) + 1 == 64  # every space-time token of the clip
    assert main(argv) == 0  # the finished run's summary again
    assert json.loads((tmp_path / "circuit" / "summary.json").read_text()) == summary


def test_sae_train_and_eval_on_video_activations(tmp_path, capsys):
    from circuits.runs.results import read_manifest as manifest_of

    data = ["--data", "moving_shapes:train:8", "--batch-size", "4"]
    assert main(["sae", "train", *VIDEO, *data, "--hook", "blocks.1.hook_resid_post", "--d-sae", "32", "--k", "4",
                 "--steps", "20", "--train-batch", "64", "--out", str(tmp_path / "sae")]) == 0
    store = manifest_of(tmp_path / "sae" / "activations")
    assert store["done"] == list(range(8))  # every clip's 65 space-time tokens stored
    assert main(["sae", "eval", *VIDEO, *data, "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "eval")]) == 0
    assert "explained variance" in capsys.readouterr().out


def test_embedded_video_model_runs_with_its_shipped_weights(tmp_path, capsys, monkeypatch):
    """The shipped weights load by name; an installation without them says what to do in one line."""
    import circuits.embedded.video_models as video_models

    assert main(["identify", "--model", "embedded:video_motion", "--data", "moving_shapes:test:2",
                 "--out", str(tmp_path / "out")]) == 0
    monkeypatch.setattr(video_models, "WEIGHTS_DIR", tmp_path / "no_weights")
    code = main(["identify", "--model", "embedded:video_motion", "--data", "moving_shapes:test:2",
                 "--out", str(tmp_path / "out2")])
    assert code == 2 and "add --random-weights" in capsys.readouterr().err


def test_a_transformers_videomae_folder_runs_identify_and_perturb(tmp_path, capsys):
    """A model without class token (mean pooling): the attention table's query is the centre
    patch of the middle time position, and no_cls (nothing to cut) is left out of the default kinds."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=4)
    transformers.VideoMAEForVideoClassification(cfg).save_pretrained(tmp_path / "videomae")
    model = ["--model", f"hf:{tmp_path / 'videomae'}", "--data", "moving_shapes:test:4"]
    assert main(["identify", *model, "--out", str(tmp_path / "id")]) == 0
    assert read_table(tmp_path / "id", "attention")["query"].unique().tolist() == [(1 * 4 + 2) * 4 + 2]  # t1 (2, 2)
    assert main(["perturb", *model, "--out", str(tmp_path / "pt")]) == 0
    assert "no_cls: " in capsys.readouterr().out and not (tmp_path / "pt" / "attention" / "no_cls").exists()
    assert main(["perturb", *model, "--out", str(tmp_path / "pt2"), "--kinds", "no_cls"]) == 2
    assert "no_cls has no key to cut" in capsys.readouterr().err
