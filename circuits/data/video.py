"""Video clips from files: a folder of clips per class, each a video file or a folder of frames.

``VideoFolderDataset`` reads ``root/<class>/<clip>`` (or a flat ``root/<clip>``, unlabeled),
where a clip is a video file (``VIDEO_EXTENSIONS``, decoded with PyAV: the optional ``video``
extra, ``pip install 'hooked-vit[video]'``) or a folder of frame images (sorted by name, any
format Pillow opens). ``num_frames`` frames are sampled uniformly as transformers' video
processors do by default (``transformers.video_utils.default_sample_indices_fn``:
``indices = arange(num_frames) * total // num_frames``). Each frame goes through
``transform`` (e.g. ``transform_for(model)``: the model's image preprocessing), and the clip
is returned under ``"image"`` as float32 [T, 3, H, W], the layout HookedViT video models read.

A clip that cannot be decoded (corrupt, unknown codec, no PyAV for a video file) or has
fewer frames than ``num_frames`` is logged on one line, recorded in ``skipped`` and returned as
``None``, which ``collate_samples`` drops: the run goes on (``circuits.data.samples``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image

from .classes import ClassMap, map_class_folders
from .folder import is_image_file
from .samples import SkippingDataset, apply_transform
from .targets import NO_LABEL

VIDEO_EXTENSIONS = (".avi", ".m4v", ".mkv", ".mov", ".mp4", ".webm")


def is_video_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """transformers' default uniform frame sampling: arange(num_frames) * total // num_frames."""
    if total < num_frames:
        raise ValueError(f"the clip has {total} frame(s), fewer than the {num_frames} the model reads")
    return np.arange(num_frames, dtype=np.int64) * total // num_frames


def read_frame_folder(folder: str, num_frames: int) -> list[Image.Image]:
    """``num_frames`` frames of a folder of frame images (sorted by file name), as RGB images."""
    names = sorted(n for n in os.listdir(folder) if is_image_file(n))
    frames = []
    for i in sample_indices(len(names), num_frames):
        with Image.open(os.path.join(folder, names[i])) as image:
            frames.append(image.convert("RGB"))
    return frames


def read_video_file(path: str, num_frames: int) -> list[Image.Image]:
    """``num_frames`` frames of a video file, decoded with PyAV (all frames, then sampled)."""
    try:
        import av
    except ImportError:
        raise ImportError("decoding video files needs PyAV: pip install 'hooked-vit[video]' "
                          "(or give each clip as a folder of frames)") from None
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    return [decoded[i].convert("RGB") for i in sample_indices(len(decoded), num_frames)]


def read_clip(path: str, num_frames: int) -> list[Image.Image]:
    """A clip's sampled frames: a folder of frames or a video file."""
    return read_frame_folder(path, num_frames) if os.path.isdir(path) else read_video_file(path, num_frames)


class VideoFolderDataset(SkippingDataset):
    """``root/<class>/<clip>`` or a flat ``root/<clip>`` (unlabeled, label -1); see the module doc.

    Class folders are mapped to the model's class ids as ``ImageFolderDataset`` maps them
    (``classes``, ``labels``: ``circuits.data.classes.map_class_folders``). A directory is a
    clip when it holds frame images; inside a class folder every video file and frame folder
    is one clip. Items: ``{"image": float32 [T, 3, H, W], "label": int, "index": int, "path": str}``.
    """

    def __init__(self, root: str | os.PathLike, num_frames: int, transform: Callable | None = None,
                 labels: str | os.PathLike | Mapping[str, int] | None = None, classes: Any = None):
        super().__init__()
        self.root, self.num_frames, self.transform = Path(root), int(num_frames), transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder root {self.root} does not exist; expected root/<class>/<clips>")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        loose = _clips_in(self.root)
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not _is_frame_folder(d))
        if loose and self.classes:
            raise ValueError(f"{self.root} holds clips (e.g. {loose[0]}) beside class folders; "
                             "move them into a class folder or another root")
        if self.classes:
            self.class_map = map_class_folders(self.classes, classes, labels)
            self.samples = [(p, self.class_map.folder_to_id[c]) for c in self.classes for p in _clips_in(self.root / c)]
        else:
            self.class_map = ClassMap({}, "unlabeled")
            self.samples = [(p, NO_LABEL) for p in loose]
        self.class_to_idx = dict(self.class_map.folder_to_id)
        if not self.samples:
            raise FileNotFoundError(f"no clips under {self.root}: expected video files ({', '.join(VIDEO_EXTENSIONS)}) "
                                    "or folders of frame images, in class folders or at the root")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        index = range(len(self))[index]
        path, label = self.samples[index]
        frames = self._read(index, path, lambda p: read_clip(p, self.num_frames))
        if frames is None:  # undecodable: logged on one line, recorded in skipped
            return None
        clip = torch.stack([apply_transform(self.transform, frame, None)[0] for frame in frames])
        return {"image": clip, "label": label, "index": index, "path": path}


def _is_frame_folder(path: Path) -> bool:
    return path.is_dir() and any(is_image_file(p.name) for p in path.iterdir() if p.is_file())


def _clips_in(folder: Path) -> list[str]:
    """Video files and frame folders directly in ``folder``, sorted."""
    return [str(p) for p in sorted(folder.iterdir())
            if (p.is_file() and is_video_file(p.name)) or _is_frame_folder(p)]
