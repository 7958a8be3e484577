"""Pictures over a clip's frames (docs/video.md, "Pictures"): circuits.plot's frame strips,
attention across frames and per-frame curves, and the report's sections for video runs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from circuits import plot
from hooked_vit.errors import UserError


def _strip(frames: int = 4, size: int = 8) -> np.ndarray:
    """A strip of `frames` frames, frame f filled with grey level 40 * f: [size, frames * size, 3]."""
    return np.concatenate([np.full((size, size, 3), 40 * f, np.uint8) for f in range(frames)], axis=1)


def _grey(src: str) -> int:
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    return int(np.asarray(img)[0, 0, 0])


def test_split_frames_takes_the_first_frame_of_each_tubelet():
    frames = plot.split_frames(_strip(4), 2)  # 4 frames, 2 time positions (tubelet 2)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 80]
    assert [int(f[0, 0, 0]) for f in plot.split_frames(_strip(4), 4)] == [0, 40, 80, 120]
    wide = np.concatenate([np.full((8, 16, 3), 40 * f, np.uint8) for f in range(4)], axis=1)  # 16 x 8 frames
    assert [int(f[0, 0, 0]) for f in plot.split_frames(wide, 4, num_frames=4)] == [0, 40, 80, 120]
    with pytest.raises(UserError, match="multiple of the 3 time positions"):
        plot.split_frames(_strip(4), 3)


def test_frame_strip_is_one_row_of_panels_over_the_frames():
    values = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)  # [T=2, rows=3, cols=2]
    fig = plot.frame_strip(values, _strip(4), title="strip", zmin=0, zmax=11, num_frames=4)
    images = [d for d in fig.data if d.type == "image"]
    heats = [d for d in fig.data if d.type == "heatmap"]
    assert [a.text for a in fig.layout.annotations] == ["t0", "t1"]
    assert [np.asarray(h.z).tolist() for h in heats] == [values[0].tolist(), values[1].tolist()]
    assert [_grey(i.source) for i in images] == [0, 80]  # each panel over its tubelet's first frame
    assert sum(h.showscale for h in heats) == 1  # one shared colour bar
    # several clips: one row each
    fig = plot.frame_strip(np.stack([values, values]), [_strip(4), _strip(4)], title="two", clip_names=["a", "b"],
                           num_frames=4)
    assert [a.text for a in fig.layout.annotations] == ["a · t0", "a · t1", "b · t0", "b · t1"]
    with pytest.raises(UserError, match="2 clips need 2 frame sets"):
        plot.frame_strip(np.stack([values, values]), [_strip(4)], title="x")


def test_attention_across_frames_shares_per_time_position():
    rng = np.random.default_rng(0)
    size = 1 + 2 * 4  # class token + 2 time positions of 2 x 2
    pattern = rng.random((3, size, size))
    pattern /= pattern.sum(-1, keepdims=True)
    fig = plot.attention_across_frames(pattern, 0, n_prefix=1, n_time=2, grid=(2, 2), head=1)
    row = pattern[1, 0]
    assert [a.text for a in fig.layout.annotations] == [f"t0: {row[1:5].sum():.2f}", f"t1: {row[5:].sum():.2f}"]
    assert f"0 {row[0]:.2f}" in fig.layout.title.text  # the share on the class token
    heats = [np.asarray(d.z) for d in fig.data if d.type == "heatmap"]
    assert np.allclose(heats[1], np.round(row[5:].reshape(2, 2), 3))
    one_row = plot.attention_across_frames(row, 0, n_prefix=1, n_time=2, grid=(2, 2))
    assert [a.text for a in one_row.layout.annotations] == [a.text for a in fig.layout.annotations]
    with pytest.raises(UserError, match="grouped by frame"):  # a divided model's spatial pattern [T, h, q, k]
        plot.attention_across_frames(rng.random((2, 3, 5, 5)), 0, n_prefix=1, n_time=2, grid=(2, 2))


def test_per_time_curves_one_line_per_time_position():
    values = np.array([[0.5, 0.6, 0.7], [0.55, 0.8, 0.9]])  # [layers=2, time=3]
    fig = plot.per_time_curves(values, title="per frame", chance=0.6)
    lines = [d for d in fig.data if d.type == "scatter"]
    assert [d.name for d in lines] == ["t0", "t1", "t2"]
    assert np.allclose([list(d.y) for d in lines], values.T)
    assert len({d.line.color for d in lines}) == 3
    with pytest.raises(UserError, match=r"\[layers, time\]"):
        plot.per_time_curves(values[0], title="x")


def test_report_draws_video_runs_over_their_frames(tmp_path):
    from circuits.embedded.synthetic_video import MovingShapes
    from circuits.report import build_report
    from circuits.report.assets import read_labels
    from circuits.report.video import per_frame_identifiability
    from circuits.runs.identify import identify, load_results
    from circuits.runs.perturb import perturbation_experiment
    from circuits.runs.sources import load_model

    torch.manual_seed(0)
    model = load_model("embedded:video_motion", random_weights=True)
    data = MovingShapes(6, split="test", num_frames=4)
    identify(model, data, tmp_path / "id", batch_size=3, progress=False, thumbnails=4)
    perturbation_experiment(model, data, tmp_path / "pt", ["none", "no_cross_frame"], batch_size=6, progress=False)
    labels = read_labels(tmp_path / "id")
    cfg = model.cfg  # no class token: every token is a patch token (video_models.video_config)
    assert labels.is_video and (labels.num_frames, labels.n_time, labels.grid) == (4, 4, cfg.grid_size)
    res = load_results(tmp_path / "id")
    per_frame = per_frame_identifiability(res, 4)
    rows, cols = cfg.grid_size
    rank = res.rank[:, res.site("block"), :, cfg.n_prefix_tokens:].reshape(6, 3, 4, rows * cols)  # [clips, layers, time, patches]
    assert np.allclose(per_frame, (1 - rank / 4).mean((0, 3)))
    page = build_report([tmp_path], tmp_path / "report.html", images=2, progress=False).read_text()
    for text in ("identifiability per time position", "last-block identifiability over the frames",
                 "across the frames, clip #", "identifiable patch tokens at the last block per time position",
                 "no_cross_frame"):
        assert text in page, text
    assert "2 of 6 clips, one row each" in page


def test_report_of_a_divided_space_time_run_says_it_has_no_attention_table(tmp_path):
    from circuits.embedded.synthetic_video import MovingShapes
    from circuits.report import build_report
    from circuits.runs.identify import identify
    from helpers import randomize_
    from hooked_vit import HookedViT, HookedViTConfig

    cfg = HookedViTConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=4, img_size=32, patch_size=8,
                          num_frames=4, tubelet_size=2, attention_type="divided_space_time",
                          pos_embed_type="space_time")
    model = randomize_(HookedViT(cfg), std=0.2).eval()
    identify(model, MovingShapes(4, num_frames=4), tmp_path / "id", progress=False)
    assert not (tmp_path / "id" / "attention").exists()
    page = build_report([tmp_path], tmp_path / "report.html", progress=False).read_text()
    assert "No attention across frames" in page and "identifiability per time position" in page
