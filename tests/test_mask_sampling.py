"""Token masks: center / corner / majority sampling of each patch's pixels, and the option
reaching the runs from the CLI (recorded in the run settings, so resume keys on it)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from circuits.cli import main
from circuits.data.transforms import MaskSampling, mask_to_token_grid


def _by_loops(mask: np.ndarray, ph: int, pw: int, kind: str, threshold: float = 0.5) -> list[bool]:
    """Independent reference: walk the patches one by one, row-major."""
    out = []
    for i in range(mask.shape[0] // ph):
        for j in range(mask.shape[1] // pw):
            patch = mask[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
            if kind == "center":
                out.append(bool(patch[ph // 2, pw // 2]))
            elif kind == "corner":
                out.append(bool(patch[0, 0]))
            else:
                out.append(sum(bool(v) for v in patch.ravel()) / (ph * pw) >= threshold)
    return out


def _disagreeing_mask() -> torch.Tensor:
    """4x4 patches in a 4x16 mask (plus 2 leftover rows / 3 columns, dropped), one patch each where
    only corner, only center, only majority, or all three say "object"."""
    m = torch.zeros(6, 19, dtype=torch.bool)
    m[0, 0] = True                       # patch 0: its top-left pixel only
    m[2, 4 + 2] = True                   # patch 1: its centre pixel (2, 2) only
    m[1:4, 8 + 1:8 + 4] = True           # patch 2: a 3x3 block, 9 of 16 pixels, ...
    m[2, 8 + 2] = False                  #   less its centre: 8 of 16, neither corner nor centre
    m[:, 12:16] = True                   # patch 3: all of it
    m[4:, :] = True                      # leftover rows and columns: never read
    m[:, 16:] = True
    return m


def test_three_modes_disagree_on_a_hand_made_mask():
    m = _disagreeing_mask()
    assert mask_to_token_grid(m, 4, "corner").tolist() == [[True, False, False, True]]
    assert mask_to_token_grid(m, 4, "center").tolist() == [[False, True, False, True]]
    assert mask_to_token_grid(m, 4, "majority").tolist() == [[False, False, True, True]]  # 8/16 >= 0.5
    assert mask_to_token_grid(m, 4, "majority:0.6").tolist() == [[False, False, False, True]]
    assert mask_to_token_grid(m, 4).tolist() == mask_to_token_grid(m, 4, "center").tolist()  # the default


@pytest.mark.parametrize("spec,kind,threshold", [("center", "center", 0.5), ("corner", "corner", 0.5),
                                                 ("majority", "majority", 0.5), ("majority:0.3", "majority", 0.3)])
def test_each_mode_matches_loops_on_random_masks_with_non_square_patches(spec, kind, threshold):
    rng = np.random.default_rng(0)
    mask = rng.random((3, 11, 17)) < 0.4  # patch (2, 5): 5 x 3 grid, 1 row and 2 columns left over
    got = mask_to_token_grid(torch.from_numpy(mask), (2, 5), spec)
    assert got.shape == (3, 15)
    assert got.tolist() == [_by_loops(m, 2, 5, kind, threshold) for m in mask]


def test_majority_threshold_is_exact_at_the_boundary():
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[0, :3] = True  # 3 of 10 pixels: 0.3 >= 0.3 although 0.3 * 10 > 3 in floating point
    assert mask_to_token_grid(m, (2, 5), "majority:0.3").tolist() == [[True]]
    assert mask_to_token_grid(m, (2, 5), "majority:0.31").tolist() == [[False]]


def test_parse_round_trips_and_refuses_bad_specs():
    for text in ("center", "corner", "majority:0.5", "majority:0.25"):
        assert str(MaskSampling.parse(text)) == text
    assert MaskSampling.parse("majority") == MaskSampling("majority", 0.5)
    assert MaskSampling.parse(None) == MaskSampling("center")
    spec = MaskSampling("majority", 0.75)
    assert MaskSampling.parse(spec) is spec
    for bad, words in [("centre", "must be one of"), ("corner:0.3", "only majority"), ("majority:0", "(0, 1]"),
                       ("majority:1.5", "(0, 1]"), ("majority:half", "number"), ("majority:nan", "(0, 1]")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
            MaskSampling.parse(bad)
    with pytest.raises(ValueError, match="only applies to majority"):
        MaskSampling("center", 0.3)
    with pytest.raises(ValueError, match="share of object pixels"):
        MaskSampling("majority", True)
    with pytest.raises(TypeError, match="MaskSampling or text"):
        MaskSampling.parse(0.5)


def _settings(run_dir) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["settings"]


def test_cli_identify_records_mask_sampling_and_resume_keys_on_it(tmp_path, capsys):
    from circuits.embedded import SyntheticShapes

    out = tmp_path / "run"
    argv = ["identify", "--data", "synthetic:test:6", "--out", str(out), "--sites", "block", "--batch-size", "6"]
    assert main([*argv, "--mask-sampling", "corner"]) == 0
    assert _settings(out)["mask_sampling"] == "corner"
    images = pd.read_parquet(out / "images").sort_values("index")
    masks = torch.stack([torch.as_tensor(SyntheticShapes(6, split="test")[i]["mask"]) for i in range(6)])
    stored = np.stack(images["object_tokens"].to_numpy())[:, 1:]  # after the class token
    assert stored.tolist() == [_by_loops(m.numpy(), 4, 4, "corner") for m in masks]
    assert stored.tolist() != mask_to_token_grid(masks, 4, "center").tolist()  # the option changed the tokens
    capsys.readouterr()
    assert main([*argv, "--mask-sampling", "majority:0.5"]) == 2  # other settings: refuses to mix results
    assert "mask_sampling" in capsys.readouterr().err


def test_cli_refuses_an_unknown_mask_sampling_in_one_line(tmp_path, capsys):
    code = main(["perturb", "--data", "synthetic:test:4", "--out", str(tmp_path / "p"), "--mask-sampling", "centre"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "center, corner, majority" in err
    assert not (tmp_path / "p").exists()


def test_token_removal_counts_the_sampled_object_tokens(tmp_path):
    from circuits.embedded import SyntheticShapes
    from circuits.runs.perturb import token_removal_experiment
    from circuits.runs.sources import load_model

    model, data = load_model("embedded"), SyntheticShapes(4, split="test")
    store = token_removal_experiment(model, data, tmp_path / "tr", ["context"], batch_size=4, progress=False,
                                     mask_sampling="majority:0.25")
    assert _settings(tmp_path / "tr")["mask_sampling"] == "majority:0.25"
    kept = store.read("removal").sort_values("index")["n_kept"].tolist()
    assert kept == [sum(_by_loops(np.asarray(data[i]["mask"]), 4, 4, "majority", 0.25)) for i in range(4)]
