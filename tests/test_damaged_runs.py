"""Runs that failed early or were damaged on disk (issue 23, items 7 and 8): an empty run locks
no settings; parts are verified against the manifest on resume (missing or damaged ones are
recomputed) and on read (named, with the fix); a damaged manifest names itself and --overwrite."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from circuits.cli import main
from circuits.embedded import SyntheticShapes
from circuits.runs.identify import identify
from circuits.runs.results import RunStore, read_table
from circuits.runs.sources import load_model
from hooked_vit import UserError


@pytest.fixture(scope="module")
def model():
    return load_model("embedded")


@pytest.fixture(scope="module")
def data():
    return SyntheticShapes(8, split="test")


def test_a_run_that_did_no_work_locks_no_settings(tmp_path):
    RunStore(tmp_path, {"analysis": "x", "k": 1})  # opened, then the run failed before any batch
    store = RunStore(tmp_path, {"analysis": "x", "k": 2})  # the corrected rerun is accepted
    assert json.loads((tmp_path / "manifest.json").read_text())["settings"]["k"] == 2
    store.write_batch(0, {}, [0])
    with pytest.raises(UserError, match="other settings"):
        RunStore(tmp_path, {"analysis": "x", "k": 3})  # with work done, the settings hold


def test_report_skips_a_run_without_results(model, data, tmp_path, capsys):
    identify(model, data, tmp_path / "runs" / "ok", limit=4, batch_size=4, progress=False)
    RunStore(tmp_path / "runs" / "empty", {"analysis": "identify"})
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r.html")]) == 0
    assert "Runs without results yet (not shown): empty" in (tmp_path / "r.html").read_text()


def test_a_deleted_part_is_recomputed_on_resume_and_named_on_read(model, data, tmp_path):
    run = tmp_path / "run"
    identify(model, data, run, batch_size=2, progress=False)
    full = read_table(run, "tokens")
    (run / "tokens" / "part-000000002.parquet").unlink()
    with pytest.raises(UserError, match=r"part-000000002.parquet is missing.*--overwrite"):
        read_table(run, "images")  # not only the damaged table: the run is incomplete
    store = RunStore(run, json.loads((run / "manifest.json").read_text())["settings"])
    assert store.done == {0, 1, 4, 5, 6, 7}  # the two items of the lost part are redone
    assert not (run / "images" / "part-000000002.parquet").exists()  # its sibling part too
    identify(model, data, run, batch_size=2, progress=False)
    pd.testing.assert_frame_equal(read_table(run, "tokens"), full)


def test_a_truncated_part_is_named_then_recomputed(model, data, tmp_path):
    run = tmp_path / "run"
    identify(model, data, run, batch_size=4, progress=False)
    full = read_table(run, "images")
    part = run / "images" / "part-000000004.parquet"
    part.write_bytes(part.read_bytes()[:50])
    with pytest.raises(UserError, match="part-000000004.parquet is damaged"):
        read_table(run, "images")
    identify(model, data, run, batch_size=4, progress=False)
    pd.testing.assert_frame_equal(read_table(run, "images"), full)


@pytest.mark.parametrize("content", ["", "{", "[]"])
def test_a_damaged_manifest_names_itself_and_the_fix(content, model, data, tmp_path, capsys):
    run = tmp_path / "run"
    identify(model, data, run, limit=2, batch_size=2, progress=False)
    (run / "manifest.json").write_text(content)
    assert main(["identify", "--out", str(run), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{run / 'manifest.json'} is damaged" in err and "--overwrite" in err
    assert main(["identify", "--out", str(run), "--limit", "2", "--overwrite"]) == 0


def test_a_finished_run_without_batches_still_holds_its_settings(tmp_path):
    """circuit runs write a summary and no batches: their settings stay locked."""
    RunStore(tmp_path, {"analysis": "circuit", "budget": 1})
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="other settings"):
        RunStore(tmp_path, {"analysis": "circuit", "budget": 2})


def test_limit_samples_files_across_classes_seeded_and_recorded(tmp_path, model):
    """Class folders listed in order: --limit 4 over 3 classes of 5 images takes every class
    (not the first four files of the first class), the same files every time, and says so."""
    import numpy as np
    from PIL import Image

    from circuits.data.samples import stratified_order
    from circuits.runs.sources import load_dataset

    root = tmp_path / "images"
    for name in ("disc", "square", "triangle"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((32, 32, 3), 10 * i, dtype=np.uint8)).save(root / name / f"{i}.png")
    dataset = load_dataset(str(root), model)
    identify(model, dataset, tmp_path / "run", limit=4, batch_size=4, progress=False)
    images = read_table(tmp_path / "run", "images")
    assert len(images) == 4 and images["label"].nunique() == 3
    settings = json.loads((tmp_path / "run" / "manifest.json").read_text())["settings"]
    assert settings["limit_sample"] == "stratified by class, seed 0"
    identify(model, dataset, tmp_path / "run", limit=7, batch_size=4, progress=False)  # a larger limit extends
    assert set(images["index"]) <= set(read_table(tmp_path / "run", "images")["index"])
    order = stratified_order([0, 0, 0, 1, 1, 2], seed=0)
    assert sorted(order) == list(range(6)) and {0, 1, 2} <= {[0, 0, 0, 1, 1, 2][i] for i in order[:3]}
    assert order == stratified_order([0, 0, 0, 1, 1, 2], seed=0)
