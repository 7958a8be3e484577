"""Every shared option a command shows reaches the library; skipped files keep their reasons."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from circuits.cli import build_parser, main
from circuits.commands._common import SHARED_RUN_OPTIONS

# The library function each dataset-level command ends in (module, attribute).
ENTRY_POINTS = {
    "identify": [("circuits.runs.identify", "identify")],
    "perturb": [("circuits.runs.perturb", "perturbation_experiment"),
                ("circuits.runs.perturb", "token_removal_experiment")],
    "explain": [("circuits.runs.explain", "benchmark")],
    "memories": [("circuits.runs.memories", "memories")],
    "probe": [("circuits.runs.probe", "run_probes")],
    "decompose": [("circuits.runs.decompose", "decompose_run")],
    "textspan": [("circuits.runs.textspan", "textspan_run")],
    "demo": [("circuits.report.demo", "run_demo")],
    "circuit": [("circuits.runs.circuit", "circuit_run")],
    "sae train": [("circuits.runs.sae", "train_run")],
    "sae eval": [("circuits.runs.sae", "eval_run")],
    "sae features": [("circuits.runs.sae", "features_run")],
}
EXTRA_ARGS = {"sae eval": ["--sae", "dictionary"], "sae features": ["--sae", "dictionary"],
              "textspan": ["--texts", "a,b"]}
# Stand-ins for what a command needs beyond the embedded model (module, attribute, fake).
STUBS = {"textspan": [("circuits.runs.texts", "text_directions", lambda spec, texts, device="cpu": (None, None))]}
CASES = [(command, i) for command, points in sorted(ENTRY_POINTS.items()) for i in range(len(points))]
VALUES = {"--batch-size": ("3", 3), "--limit": ("5", 5), "--workers": ("2", 2), "--overwrite": (None, True),
          "--target": ("predicted", "predicted"), "--mask-sampling": ("majority:0.25", "majority:0.25")}


class Reached(Exception):
    pass


def _subparser(command: str):
    """The parser of "identify" or of a nested command such as "sae train"."""
    parser = build_parser()
    for word in command.split():
        parser = parser._subparsers._group_actions[0].choices[word]
    return parser


def _commands(parser=None, prefix="") -> list[str]:
    """Every leaf command, nested ones as "sae train"."""
    parser = parser or build_parser()
    if parser._subparsers is None:
        return [prefix.strip()]
    return [c for name, sub in parser._subparsers._group_actions[0].choices.items()
            for c in _commands(sub, f"{prefix} {name}")]


def _shown_options(command: str) -> list[str]:
    return [o for a in _subparser(command)._actions for o in a.option_strings if o in SHARED_RUN_OPTIONS]


def test_every_dataset_command_is_covered():
    with_shared = {name for name in _commands() if _shown_options(name)}
    assert "sae train" in _commands() and "identify" in _commands()
    assert with_shared == set(ENTRY_POINTS)


@pytest.mark.parametrize("command,entry", CASES)
def test_shown_shared_options_reach_the_library(command, entry, monkeypatch, tmp_path):
    import importlib

    module, name = ENTRY_POINTS[command][entry]

    def capture(*args, **kwargs):
        raise Reached(kwargs)

    monkeypatch.setattr(importlib.import_module(module), name, capture)
    for stub_module, stub_name, fake in STUBS.get(command, []):  # e.g. a text tower the embedded model lacks
        monkeypatch.setattr(importlib.import_module(stub_module), stub_name, fake)
    argv = [*command.split(), "--out", str(tmp_path / "out"), *EXTRA_ARGS.get(command, [])]
    argv += [] if command == "demo" else ["--data", "synthetic:test:16"]
    if command == "perturb" and entry == 1:
        argv += ["--kinds"]  # no attention half: straight to token removal
    shown = _shown_options(command)
    for option in shown:
        text, _ = VALUES[option]
        argv += [option] if text is None else [option, text]
    args = build_parser().parse_args(argv)
    with pytest.raises(Reached) as hit:
        args.run(args)
    kwargs = hit.value.args[0]
    for option in shown:
        key, expected = SHARED_RUN_OPTIONS[option], VALUES[option][1]
        assert key in kwargs, f"{command} shows {option} but does not pass {key}"
        assert str(kwargs[key]) == str(expected), (command, option, kwargs[key])


class _Flaky:
    """A dataset whose odd items cannot be read (as a corrupt file would), logging like ours."""

    def __init__(self, n=6):
        from circuits.data import ArrayDataset

        rng = np.random.default_rng(0)
        self.inner = ArrayDataset(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), labels=[0] * n)
        self.skipped = []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i % 2:
            logging.getLogger("circuits.data").warning("skipping item %d: cannot read f%d.png (broken)", i, i)
            self.skipped.append((i, f"f{i}.png", "broken"))
            return None
        return self.inner[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_items_keep_path_and_reason_with_workers(workers, tmp_path, caplog):
    from circuits.runs.identify import identify
    from circuits.runs.sources import load_model

    model = load_model("embedded")
    with caplog.at_level(logging.WARNING):
        store = identify(model, _Flaky(), str(tmp_path / "run"), sites=["block"], batch_size=2,
                         num_workers=workers, progress=False)
    skipped = json.loads((tmp_path / "run" / "manifest.json").read_text())["skipped"]
    assert skipped == [{"index": i, "path": f"f{i}.png", "reason": "broken"} for i in (1, 3, 5)]
    assert len(store.read("images")) == 3
    if workers == 0:  # worker processes log on their own handlers; in-process each warning shows once
        assert sum("cannot read" in r.getMessage() for r in caplog.records) == 3
        assert not any("skipped item" in r.getMessage() for r in caplog.records)
