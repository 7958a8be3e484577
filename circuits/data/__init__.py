"""Dataset layer of ``circuits``: item conventions, timm-exact eval transforms that also move
object masks, ImageNet-S (images + masks), image folders, in-memory arrays, and the loader.

Items are dicts ``{"image": float32 [3, H, W], "label": int, "index": int, "path": str,
"mask": bool [H, W] (masked datasets only)}``; unreadable files give ``None``, which
``collate_samples`` drops and reports under ``"skipped"`` (see ``circuits.data.samples``).
"""
from .folder import ArrayDataset, ImageFolderDataset
from .imagenet_s import ImageNetS, load_synset_mapping
from .samples import collate_samples, make_loader
from .transforms import JointTransform, denormalize, mask_to_token_grid, transform_for

__all__ = [
    "ImageNetS", "ImageFolderDataset", "ArrayDataset", "transform_for", "JointTransform",
    "mask_to_token_grid", "denormalize", "collate_samples", "make_loader", "load_synset_mapping",
]
