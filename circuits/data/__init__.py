"""Dataset layer of ``circuits``: item conventions, timm-exact eval transforms that also move
object masks, ImageNet-S (images + masks), image folders, in-memory arrays, and the loader.

Labels are the model's class ids (``classes``: one mapping step for every loader), images are
decoded by ``images.load_image`` (every Pillow mode to the right RGB), and ``targets`` picks
the class an analysis measures (label / predicted / fixed). See docs/using_your_own_data.md.

Items are dicts ``{"image": float32 [3, H, W], "label": int, "index": int, "path": str,
"mask": bool [H, W] (masked datasets only)}``, and ``"patch_mask"`` (float64 [3, gh, gw], the
source mask sampled under every patch) where the transform knows the patch size; unreadable files give ``None``, which
``collate_samples`` drops and reports under ``"skipped"`` (see ``circuits.data.samples``).
"""
from .classes import ClassMap, ModelClasses, class_name, map_class_folders, read_labels_file
from .folder import ArrayDataset, ImageFolderDataset
from .images import load_image
from .imagenet_s import ImageNetS, load_synset_mapping
from .samples import collate_samples, make_loader
from .targets import NO_LABEL, TargetSpec, resolve_targets
from .transforms import JointTransform, batch_object_tokens, denormalize, mask_to_token_grid, transform_for

__all__ = [
    "ImageNetS", "ImageFolderDataset", "ArrayDataset", "transform_for", "JointTransform",
    "mask_to_token_grid", "batch_object_tokens", "denormalize", "collate_samples", "make_loader", "load_synset_mapping",
    "load_image", "ModelClasses", "ClassMap", "map_class_folders", "read_labels_file", "class_name",
    "TargetSpec", "resolve_targets", "NO_LABEL",
]
