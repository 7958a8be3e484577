"""Video data: the embedded moving-shapes clips (class = direction of motion, so a model must
use time) and the video folder loader (frame folders; mp4 through PyAV when installed)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from circuits.data import collate_samples
from circuits.data.video import VideoFolderDataset, sample_indices
from circuits.embedded.synthetic_video import MOTION_CLASSES, MovingShapes


def test_clips_are_deterministic_and_shaped():
    a, b = MovingShapes(4, seed=3), MovingShapes(4, seed=3)
    item = a[2]
    assert item["image"].shape == (8, 3, 32, 32) and item["mask"].shape == (8, 32, 32)
    assert torch.equal(item["image"], b[2]["image"]) and item["label"] == b[2]["label"]
    assert not torch.equal(MovingShapes(4, seed=4)[2]["image"], item["image"])
    raw = MovingShapes(4, seed=3, transform=None)[2]["image"]
    assert float(raw.min()) >= 0 and float(raw.max()) <= 1


def _shift(label: int, pixels: int) -> tuple[int, int]:
    """np.roll (shift, axis) of a motion class: axis 1 = x (columns), axis 0 = y (rows)."""
    return {0: (pixels, 1), 1: (-pixels, 1), 2: (pixels, 0), 3: (-pixels, 0)}[label]


def test_the_label_is_the_direction_the_shape_moves():
    ds = MovingShapes(24, seed=1)
    for i in range(len(ds)):
        _, masks, label, meta = ds.render(i)
        # one frame of travel (4-6 px): four would be 16-24 px, up to half the 32 px torus, where
        # the forward and the backward shift land on the same place
        step = int(round(float(np.abs(meta["velocity"]).max())))
        shift, axis = _shift(label, step)
        moved = np.roll(masks[0], shift, axis=axis)
        back = np.roll(masks[0], -shift, axis=axis)
        overlap = lambda m: (m & masks[1]).sum() / masks[1].sum()
        assert overlap(moved) > 0.6 > overlap(back), (i, MOTION_CLASSES[label])


def test_no_single_frame_tells_the_direction():
    """On the torus the shape's position in a frame is uniform whatever the class: the mean
    mask of frame 0 of rightward and of leftward clips agree (differ only by sampling noise)."""
    ds = MovingShapes(400, seed=2)
    means = {0: [], 1: []}
    for i in range(len(ds)):
        _, masks, label, _ = ds.render(i)
        if label in means:
            means[label].append(masks[0].mean(0))  # column profile of frame 0
    right, left = (np.mean(means[k], 0) for k in (0, 1))
    assert np.abs(right - left).max() < 0.5 * right.mean()
    assert len(means[0]) > 60 and len(means[1]) > 60


def test_static_control_does_not_move():
    ds = MovingShapes(6, task="shape")
    for i in range(len(ds)):
        _, masks, label, meta = ds.render(i)
        assert meta["shape"] == ds.class_names[label] and meta["velocity"] == [0.0, 0.0]
        assert all(np.array_equal(masks[0], m) for m in masks)
    with pytest.raises(ValueError, match="task"):
        MovingShapes(2, task="colour")


def _write_frames(folder, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):  # frame i is uniformly grey level 10 * i
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(folder / f"{i:03d}.png")


def test_frame_folders_sample_as_transformers_does(tmp_path, caplog):
    _write_frames(tmp_path / "0" / "clip_a", 10)
    _write_frames(tmp_path / "1" / "clip_b", 4)
    _write_frames(tmp_path / "1" / "short", 2)  # fewer frames than the model reads
    broken = tmp_path / "1" / "broken"
    broken.mkdir()
    for i in range(4):
        (broken / f"{i}.png").write_bytes(b"not a png")
    ds = VideoFolderDataset(tmp_path, num_frames=4)
    assert [s[1] for s in ds.samples] == [0, 1, 1, 1] and len(ds) == 4
    item = ds[0]
    assert item["image"].shape == (4, 3, 8, 8)
    assert list(sample_indices(10, 4)) == [0, 2, 5, 7]
    levels = (item["image"][:, 0, 0, 0] * 255).round().long().tolist()
    assert levels == [0, 20, 50, 70]
    with caplog.at_level(logging.WARNING, logger="circuits.data"):
        batch = collate_samples([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (2, 4, 3, 8, 8) and len(batch["skipped"]) == 2
    assert [s[1].rsplit("/", 1)[-1] for s in ds.skipped] == ["broken", "short"]
    assert "fewer than the 4" in ds.skipped[1][2]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)


def test_refuses_an_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="no clips"):
        VideoFolderDataset(tmp_path, num_frames=4)


def test_video_files_through_pyav(tmp_path):
    av = pytest.importorskip("av", reason="PyAV not installed: pip install 'hooked-vit[video]'")
    path = tmp_path / "clips" / "moving.mp4"
    path.parent.mkdir()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    (tmp_path / "clips" / "corrupt.webm").write_bytes(b"\x1a\x45\xdf\xa3 not a video")
    ds = VideoFolderDataset(tmp_path / "clips", num_frames=4)
    assert len(ds) == 2 and ds[0] is None and "corrupt.webm" in ds.skipped[0][1]
    clip = ds[1]["image"]
    assert clip.shape == (4, 3, 16, 16)
    levels = (clip[:, :, 8, 8].mean(1) * 255).tolist()  # frames 0, 3, 6, 9: grey 0, 60, 120, 180
    assert np.allclose(levels, [0, 60, 120, 180], atol=8)
