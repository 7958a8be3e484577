"""The run machinery: specs parsed once, sources built from them, the shared run context."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from circuits.options import parse_named_options
from circuits.runs.context import run_size, start_run
from circuits.runs.sources import load_dataset, load_model, synthetic_for
from circuits.runs.specs import parse_data_spec, parse_model_spec
from circuits.runs.streaming import describe_dataset, model_fingerprint


def test_model_specs_are_parsed_once_into_objects(tmp_path):
    spec = parse_model_spec("embedded:spurious", random_weights=True)
    assert (spec.kind, spec.name, spec.label) == ("embedded", "spurious", "embedded:spurious (random weights)")
    assert parse_model_spec("embedded").name == "default"
    (tmp_path / "m.safetensors").write_bytes(b"")
    ckpt = parse_model_spec(str(tmp_path / "m.safetensors"), "vit_tiny_patch16_224:depth=2,img_size=32,qkv_bias=false")
    assert (ckpt.kind, ckpt.name, ckpt.path) == ("checkpoint", "vit_tiny_patch16_224", tmp_path / "m.safetensors")
    assert ckpt.arch_kwargs == {"depth": 2, "img_size": 32, "qkv_bias": False}
    assert parse_model_spec("vit_base_patch16_224").kind == "timm"


def test_bad_specs_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="--arch"):
        parse_model_spec("m.pth")
    with pytest.raises(ValueError, match="key=value"):
        parse_model_spec("m.pth", "vit_tiny_patch16_224:depth")
    with pytest.raises(ValueError, match="integer n"):
        parse_data_spec("synthetic:test:many")
    with pytest.raises(FileNotFoundError, match="synthetic"):
        parse_data_spec(str(tmp_path / "missing"))


def test_data_specs():
    assert (parse_data_spec("synthetic").split, parse_data_spec("synthetic").n) == ("test", 512)
    spec = parse_data_spec("synthetic:val:7")
    assert spec.is_synthetic and (spec.split, spec.n) == ("val", 7)
    assert parse_named_options("gae:start_layer=1,x=0.5") == ("gae", {"start_layer": 1, "x": 0.5})


def test_synthetic_data_for_an_embedded_model_uses_its_difficulty():
    spec = parse_model_spec("embedded:spurious")
    model = load_model(spec)
    data = load_dataset("synthetic:test:4", model, spec)
    assert data.difficulty == "hard" and len(data) == 4
    assert load_dataset("synthetic:test:4", model).difficulty == "normal"  # no spec: the plain variant
    assert describe_dataset(data) == describe_dataset(synthetic_for("spurious", "test", 4))


def test_run_context_records_settings_and_resumes(tmp_path):
    model = load_model("embedded")
    data = synthetic_for("default", "test", 6)
    run = start_run("probe_demo", model, data, tmp_path / "run", limit=5, k=3, settings={"note": "x"})
    assert run.n == 5 == run_size(data, 5) and run_size(data, None) == 6
    assert run.store.settings == {"analysis": "probe_demo", "model": "embedded", "weights": model_fingerprint(model),
                        "dataset": describe_dataset(data), "n": 5, "k": 3, "note": "x"}
    seen = []
    for batch in run.batches(batch_size=2):
        images = run.images(batch)
        assert images.dtype == model.embed.proj.weight.dtype and images.device == model.embed.proj.weight.device
        seen += batch.indices
        batch.save({})
    assert seen == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["settings"] == run.store.settings
    run.finish({"done": len(seen)})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"done": 5}
    again = start_run("probe_demo", model, data, tmp_path / "run", limit=5, k=3, settings={"note": "x"})
    assert list(again.batches(batch_size=2)) == []  # all done
    with pytest.raises(ValueError):
        start_run("probe_demo", model, data, tmp_path / "run", limit=5, k=4, settings={"note": "x"})


def test_progress_bar_counts_every_batch(tmp_path, capsys):
    """The bar reaches its total (it used to stop one batch short on screen)."""
    model = load_model("embedded")
    run = start_run("bar_demo", model, synthetic_for("default", "test", 5), tmp_path / "run")
    for batch in run.batches(batch_size=2, desc="bar"):
        batch.save({})
    err = capsys.readouterr().err
    assert "3/3" in err.replace("\r", "\n").strip().splitlines()[-1]


def test_overwrite_clears_everything_the_run_wrote_but_nested_runs(tmp_path):
    """--overwrite: no stale run-level file (a sanity table, a fitted reference) survives to be
    read back as if new; a run nested inside (sae train's activations) is its own and stays."""
    model = load_model("embedded")
    data = synthetic_for("default", "test", 4)
    run = start_run("demo", model, data, tmp_path / "run", k=1)
    for batch in run.batches(batch_size=2):
        batch.save({"rows": pa.table({"index": batch.data["index"].numpy()})})
    run.finish({"k": 1})
    (tmp_path / "run" / "sanity.json").write_text("{}")
    start_run("nested", model, data, tmp_path / "run" / "activations")
    again = start_run("demo", model, data, tmp_path / "run", k=2, overwrite=True)
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == ["activations", "labels.json", "manifest.json"] and again.store.done == set()
    assert (tmp_path / "run" / "activations" / "manifest.json").exists()
    # a folder that is not a run directory is never cleared
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    start_run("demo", model, data, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
