"""ImageNet-S (ImageNet images with pixel-level object masks; Gao et al., "Large-scale
Unsupervised Semantic Segmentation") as a dataset of ``circuits`` items with masks.

Expected layout (one ImageNet-S subset, e.g. the ``ImageNetS50`` folder of the download)::

    root/LOC_synset_mapping.txt                 "<wnid> <names>" per row, ImageNet-1k order
    root/validation/<wnid>/<stem>.JPEG          images (any jpg/jpeg/png/bmp/webp)
    root/validation-segmentation/<wnid>/<stem>.png   masks
    root/ImageNetS_categories_im{50,300,919}.txt     optional, see "segmentation ids"

Labels: the wnid folders are mapped by ``circuits.data.classes.map_class_folders`` through the
model's own label metadata when ``classes`` (a HookedViT / timm model) has WordNet ids, so a
21k or 12k model gets its own indices; otherwise through ``LOC_synset_mapping.txt`` (the row of
the wnid: the ImageNet-1k index a 1k-class model predicts). Images are decoded without EXIF
orientation so they stay on the pixel grid the masks were annotated on.

Segmentation ids: a mask PNG stores a class id per pixel as ``R + 256 * G``; ``0`` is
"other category / background" and ``1000`` is "ignored". The item's ``mask`` is
``id == seg_id(wnid)`` (so 0, 1000 and pixels of other classes are all False). The id of a
class depends on ``seg_ids``:

* ``"subset"`` (default, the official ImageNet-S convention): ids number the subset's classes
  from 1 in sorted-wnid order (= ImageNet-1k order restricted to the subset), so for
  ImageNet-S50 goldfish (1k index 1) is id 1, not 2. The subset's class list is read from
  ``categories`` (a path or list of wnids, e.g. the repository's
  ``ImageNetS_categories_im50.txt``; auto-detected in ``root``), else taken to be the wnid
  folders found in ``root/<split>`` (right only if every class folder of the subset is there).
* ``"imagenet"``: id = ImageNet-1k index + 1 (``label + 1``), for masks written with 1k ids.
  Equals ``"subset"`` only for the full 1000 classes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .classes import ModelClasses, map_class_folders
from .folder import is_image_file
from .images import load_image
from .samples import SkippingDataset, apply_transform

logger = logging.getLogger("circuits.data")

LAYOUT = ("root/LOC_synset_mapping.txt, root/{split}/<wnid>/<stem>.JPEG and "
          "root/{split}-segmentation/<wnid>/<stem>.png")
REAL_SUBSET_SIZES = (50, 300, 919)


def load_synset_mapping(path: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """Read ``LOC_synset_mapping.txt``: rows ``<wnid> <names>``. Returns ``({wnid: row}, [names])``."""
    wnid_to_idx, names = {}, []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        wnid_to_idx[wnid] = len(names)
        names.append(name.strip())
    return wnid_to_idx, names


def _read_categories(categories: str | os.PathLike | Sequence[str]) -> list[str]:
    """Subset wnids from a file (first token per line) or a list, sorted: the official id order."""
    if isinstance(categories, (str, os.PathLike)):
        lines = Path(categories).read_text().splitlines()
        categories = [ln.split()[0] for ln in lines if ln.strip()]
    return sorted(categories)


def _load_unoriented(path: str) -> Image.Image:
    return load_image(path, exif_orientation=False)


def load_mask_ids(path: str | os.PathLike) -> np.ndarray:
    """ImageNet-S mask PNG -> int32 [H, W] class ids ``R + 256 * G``."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1]


class ImageNetS(SkippingDataset):
    """ImageNet-S split as ``circuits`` items (see module doc for layout and id conventions).

    Items: ``{"image": float32 [3, H, W], "label": int (ImageNet-1k index), "index": int,
    "path": str, "mask": bool [H, W] (pixels of the image's own class), "has_mask": bool}``, and
    ``"patch_mask"`` (float64 [3, gh, gw], the source mask sampled under every patch:
    ``JointTransform.patch_mask``) when the transform knows the model's patch size.
    ``require_masks=True`` lists only images that have a mask file (logging how many were left
    out); ``False`` lists all and gives images without a mask an all-False mask and
    ``has_mask=False``. Pass a ``JointTransform`` (``transform_for``) so masks follow the image.
    Unreadable files give ``None`` (see ``circuits.data.samples``). ``synset_mapping``: path of
    ``LOC_synset_mapping.txt`` if it is not in ``root`` (not needed when ``classes`` has wnids).
    ``classes``: the model (or ``ModelClasses``) whose class ids the labels must be. Attributes: ``samples`` (image path,
    mask path or "", label, seg id), ``seg_id`` {wnid: id}, ``class_names`` (1k order), ``skipped``.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 split: str = "validation", require_masks: bool = True, seg_ids: str = "subset",
                 categories: str | os.PathLike | Sequence[str] | None = None,
                 synset_mapping: str | os.PathLike | None = None, classes=None):
        super().__init__()
        if seg_ids not in ("subset", "imagenet"):
            raise ValueError(f"seg_ids must be 'subset' or 'imagenet', got {seg_ids!r}")
        self.root, self.split, self.transform = Path(root), split, transform
        self.require_masks = require_masks
        self.image_dir, self.mask_dir = self.root / split, self.root / f"{split}-segmentation"
        # ImageNet-S does not ship it: copy ImageNet's LOC_synset_mapping.txt into root or pass its path
        self.synset_mapping = Path(synset_mapping or self.root / "LOC_synset_mapping.txt")
        model_classes = ModelClasses.of(classes)
        self._check_layout(need_mapping=model_classes.label_names is None)
        if model_classes.label_names is None:  # the 1k order of LOC_synset_mapping.txt
            wnid_to_idx, names = load_synset_mapping(self.synset_mapping)
            model_classes = ModelClasses(len(names), tuple(wnid_to_idx), tuple(names))
        self.class_names = list(model_classes.class_names or model_classes.label_names)
        wnids = self._wnids()
        self.wnid_to_idx = dict(map_class_folders(wnids, model_classes).folder_to_id)
        self.seg_id = self._seg_ids(wnids, seg_ids, categories)  # wnid -> id in the mask PNGs
        # (image path, mask path or "", label, segmentation id)
        self.samples: list[tuple[str, str, int, int]] = self._list(wnids)

    def _check_layout(self, need_mapping: bool) -> None:
        layout = LAYOUT.format(split=self.split)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageNet-S root {self.root} does not exist; expected {layout}")
        for need in (self.synset_mapping, self.image_dir)[0 if need_mapping else 1:]:
            if not need.exists():
                raise FileNotFoundError(f"missing {need}; ImageNet-S expects {layout}")
        if self.require_masks and not self.mask_dir.is_dir():
            raise FileNotFoundError(f"missing mask folder {self.mask_dir} (require_masks=True); "
                                    f"ImageNet-S expects {layout}")

    def _wnids(self) -> list[str]:
        wnids = sorted(d.name for d in self.image_dir.iterdir() if d.is_dir())
        if not wnids:
            raise FileNotFoundError(f"no class folders in {self.image_dir}; expected "
                                    f"{LAYOUT.format(split=self.split)}")
        return wnids

    def _seg_ids(self, wnids: list[str], mode: str, categories) -> dict[str, int]:
        if mode == "imagenet":
            from timm.data import ImageNetInfo  # ids are 1k indices + 1 whatever the model's label set

            order = {w: i + 1 for i, w in enumerate(ImageNetInfo("imagenet-1k").label_names())}
            return {w: order[w] if w in order else self.wnid_to_idx[w] + 1 for w in wnids}
        if categories is None:
            found = sorted(self.root.glob("ImageNetS_categories_im*.txt"))
            categories = found[0] if len(found) == 1 else None
        if categories is None:
            if len(wnids) not in REAL_SUBSET_SIZES:
                # ids are ranks among the subset, so a missing class folder shifts all later ids
                logger.warning("ImageNet-S: no categories file; numbering mask ids by the %d wnid "
                               "folders in %s (right only if no class folder of the subset is "
                               "missing; pass categories=...)", len(wnids), self.image_dir)
            categories = wnids
        order = {w: i + 1 for i, w in enumerate(_read_categories(categories))}
        missing = [w for w in wnids if w not in order]
        if missing:
            raise ValueError(f"class folder(s) {missing[:5]} are not in the ImageNet-S categories list")
        return {w: order[w] for w in wnids}

    def _list(self, wnids: list[str]) -> list[tuple[str, str, int, int]]:
        samples, no_mask, self.ignored = [], 0, []
        for wnid in wnids:
            for name in sorted(os.listdir(self.image_dir / wnid)):
                if not is_image_file(name):
                    self.ignored.append((str(self.image_dir / wnid / name), "not a file type Pillow opens"))
                    continue
                mask = self.mask_dir / wnid / (Path(name).stem + ".png")
                has = mask.is_file()
                no_mask += not has
                if has or not self.require_masks:
                    samples.append((str(self.image_dir / wnid / name), str(mask) if has else "",
                                    self.wnid_to_idx[wnid], self.seg_id[wnid]))
        if self.ignored:
            logger.warning("ImageNet-S %s: ignored %d non-image file(s), e.g. %s (see dataset.ignored)",
                           self.split, len(self.ignored), self.ignored[0][0])
        if no_mask:
            action = "left out" if self.require_masks else "given all-False masks"
            logger.warning("ImageNet-S %s: %d image(s) without a mask file %s", self.split, no_mask, action)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        index = range(len(self))[index]  # IndexError out of range, negative indices allowed
        path, mask_path, label, seg_id = self.samples[index]
        image = self._read(index, path, _load_unoriented)  # None if unreadable (already logged)
        if image is None:
            return None
        if mask_path:
            ids = self._read(index, mask_path, load_mask_ids)
        else:
            ids = np.zeros(image.size[::-1], np.int32)  # no annotation: nothing is "object"
        if ids is None:
            return None
        obj = ids == seg_id  # [h, w]; 0 (other), 1000 (ignore) and other classes are False
        if obj.shape != image.size[::-1]:  # keep alignment if a mask was saved at another size
            obj = np.asarray(Image.fromarray(obj.astype(np.uint8)).resize(image.size, Image.NEAREST)) != 0
        img_t, mask_t = apply_transform(self.transform, image, obj)
        item = {"image": img_t, "label": label, "index": index, "path": path, "mask": mask_t,
                "has_mask": bool(mask_path)}
        if getattr(self.transform, "patch_size", None) is not None:  # token flags from the source mask
            item["patch_mask"] = self.transform.patch_mask(obj)
        return item
