"""Class folders -> the model's class ids: the one mapping step every ``circuits`` loader uses.

A class folder's label must be the index of that class in the *model's* output, not the
folder's rank among its siblings (torchvision ``ImageFolder``'s rule): folders ``n01443537``
and ``n01530575`` are ImageNet-1k classes 1 and 10, not 0 and 1. Rules, per folder, in order:

1. a labels file (``labels_file``: JSON ``{"folder": id}`` or CSV rows ``folder,id``) decides;
2. an integer name (``"7"``, ``"007"``) is that class id;
3. a machine label of the model (a WordNet id such as ``n01443537``: ``label_names``) maps to
   its index;
4. a class description of the model (``class_names``; ImageNet's "goldfish, Carassius
   auratus" gives the names "goldfish" and "Carassius auratus") maps by exact match after
   lower-casing and reading ``_`` as a space; a name shared by two classes (ImageNet's two
   "crane"s) is ambiguous.

Anything unmatched or ambiguous is refused, naming the folders and the fix (a labels file).
A model without class metadata keeps the ``ImageFolder`` convention (sorted folder order)
for non-integer names, except WordNet-id folders, which are refused: their order says
nothing about the model's classes. Class metadata comes from timm (``ImageNetInfo``:
https://huggingface.co/docs/timm/reference/data) or the embedded models' json.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

from hooked_vit.loading import timm_class_metadata
from hooked_vit.errors import UserError

WNID = re.compile(r"n\d{8}")
FIX = "pass a labels file (JSON {\"folder\": class_id} or CSV rows folder,class_id)"


@dataclass(frozen=True)
class ModelClasses:
    """What a model's output indices mean: ``n_classes`` and optional per-index names.

    ``label_names``: machine ids (ImageNet WordNet ids, the embedded shape names);
    ``class_names``: human descriptions (``"goldfish, Carassius auratus"``). Either may be None.
    """

    n_classes: int | None = None
    label_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None

    @classmethod
    def of(cls, model: Any) -> "ModelClasses":
        """From a ``HookedViT`` / ``HookedViTConfig`` (its ``label_names`` / ``class_names``), a timm
        model (timm's metadata, see ``timm_class_metadata``), a ``ModelClasses`` or ``None``."""
        if model is None or isinstance(model, ModelClasses):
            return model or cls()
        cfg = getattr(model, "cfg", model)
        if hasattr(cfg, "n_classes"):
            return cls(cfg.n_classes, getattr(cfg, "label_names", None), getattr(cfg, "class_names", None))
        if hasattr(model, "pretrained_cfg"):
            return cls(getattr(model, "num_classes", None), **timm_class_metadata(model))
        raise TypeError(f"cannot read class metadata from {type(model).__name__}; pass a HookedViT, "
                        "a timm model or circuits.data.ModelClasses")

    def id_of(self, name: str) -> int | None:
        """Class id for a folder / target name by rules 2-4 of the module doc; None if unmatched.
        Raises ``ValueError`` if ``name`` is ambiguous or an out-of-range integer."""
        if re.fullmatch(r"\d+", name):
            return self._check_id(int(name), name)
        if name in self._label_index:
            return self._label_index[name]
        hits = self._name_index.get(_normalise(name), set())
        if len(hits) > 1:
            raise UserError(f"class name {name!r} matches classes {sorted(hits)} "
                             f"({', '.join(self.class_names[i] for i in sorted(hits))}); {FIX}")
        return next(iter(hits)) if hits else None

    def _check_id(self, value: int, source: str) -> int:
        if self.n_classes is not None and not 0 <= value < self.n_classes:
            raise UserError(f"class id {value} (from {source!r}) is outside the model's "
                             f"{self.n_classes} classes 0..{self.n_classes - 1}")
        return value

    @cached_property  # built once: a 21k-class model has ~50k names to index
    def _label_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names or ())}

    @cached_property
    def _name_index(self) -> dict[str, set[int]]:
        """normalised name -> class ids, over every comma-separated name of every description."""
        index: dict[str, set[int]] = {}
        for i, desc in enumerate(self.class_names or ()):
            for name in {desc, *desc.split(",")}:
                if name.strip():
                    index.setdefault(_normalise(name), set()).add(i)
        for i, label in enumerate(self.label_names or ()):  # shape names double as descriptions
            index.setdefault(_normalise(label), set()).add(i)
        return index


def _normalise(name: str) -> str:
    """Case- and underscore-insensitive form (exact otherwise: no fuzzy matching)."""
    return " ".join(name.replace("_", " ").lower().split())


def class_name(model: Any, class_id: int) -> str:
    """Short human name of class ``class_id`` (first name of its description: "goldfish"), else its
    machine label, else the id as text. ``model``: as for ``ModelClasses.of``."""
    classes = ModelClasses.of(model)
    class_id = int(class_id)
    for names in (classes.class_names, classes.label_names):
        if names is not None and 0 <= class_id < len(names):
            return names[class_id].split(",")[0].strip()
    return str(class_id)


@dataclass(frozen=True)
class ClassMap:
    """Folder name -> class id, and how it was decided (``"labels file"``, ``"model classes"``,
    ``"integer names"`` or ``"sorted folders"``), for logs and run metadata."""

    folder_to_id: Mapping[str, int]
    source: str

    def __getitem__(self, folder: str) -> int:
        return self.folder_to_id[folder]


def map_class_folders(folder_names: Sequence[str], model_classes: Any = None,
                      labels_file: str | os.PathLike | Mapping[str, int] | None = None) -> ClassMap:
    """Map class folder names to the model's class ids (rules in the module doc).

    ``model_classes``: anything ``ModelClasses.of`` reads (a HookedViT, timm model, None).
    ``labels_file``: a JSON / CSV path (``read_labels_file``) or a ready ``{folder: id}`` mapping.
    Raises ``ValueError`` naming the unmatched / ambiguous folders and the fix.
    """
    classes = ModelClasses.of(model_classes)
    folders = sorted(folder_names)
    if labels_file is not None:
        table = read_labels_file(labels_file) if isinstance(labels_file, (str, os.PathLike)) \
            else {str(k): _as_id((k, v), "the labels mapping") for k, v in labels_file.items()}
        missing = [f for f in folders if f not in table]
        if missing:
            raise UserError(f"class folder(s) {_show(missing)} are not in labels file {labels_file}; "
                             "add a row per folder")
        return ClassMap({f: classes._check_id(table[f], str(labels_file)) for f in folders}, "labels file")
    if all(re.fullmatch(r"\d+", f) for f in folders):
        return ClassMap({f: classes._check_id(int(f), f) for f in folders}, "integer names")
    if classes.label_names is None and classes.class_names is None:
        return _sorted_map(folders)
    found = {f: classes.id_of(f) for f in folders}
    unmatched = [f for f, i in found.items() if i is None]
    if unmatched:
        raise UserError(f"class folder(s) {_show(unmatched)} match no class of the model "
                         f"({_describe(classes)}); rename them to its class ids / names or {FIX}")
    return ClassMap(found, "model classes")


def _sorted_map(folders: list[str]) -> ClassMap:
    """No class metadata: torchvision ImageFolder's sorted order, but never for WordNet ids."""
    wnids = [f for f in folders if WNID.fullmatch(f)]
    numbers = [f for f in folders if re.fullmatch(r"\d+", f)]
    if numbers:  # sorted order would give "7" the rank of "7" among names, not class 7
        raise UserError(f"class folders mix integer names ({_show(numbers)}) with other names; "
                         "name them all by class id or " + FIX)
    if wnids:
        raise UserError(f"class folder(s) {_show(wnids)} are WordNet ids but the model has no class "
                         "metadata to place them; load it with its timm name or " + FIX)
    return ClassMap({f: i for i, f in enumerate(folders)}, "sorted folders")


def _describe(classes: ModelClasses) -> str:
    sample = (classes.label_names or classes.class_names)[:3]
    return f"{classes.n_classes} classes such as {', '.join(map(repr, sample))}"


def _show(names: Sequence[str], k: int = 5) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(map(repr, names[:k])) + more


def read_labels_file(path: str | os.PathLike) -> dict[str, int]:
    """A folder -> class id table: ``.json`` (an object) or ``.csv`` (rows ``folder,id``; a first row
    whose id field does not start like a number is taken as a header). Parsed as data, never executed."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"labels file {path} is not valid JSON ({err}); it must hold an object "
                            "{\"folder\": class_id, ...}") from None
        if not isinstance(table, dict):
            raise UserError(f"labels file {path} must hold a JSON object {{\"folder\": class_id}}")
        rows = list(table.items())
    elif path.suffix.lower() == ".csv":
        try:
            rows = [r for r in csv.reader(path.read_text().splitlines()) if r]
        except csv.Error as err:
            raise UserError(f"labels file {path} is not valid CSV ({err}); it must hold rows folder,class_id") from None
        if rows and not re.match(r"\s*[-+.]?\d", rows[0][-1]):
            rows = rows[1:]  # a header ("folder,class"); a malformed number is an error below
    else:
        raise UserError(f"labels file {path} must be .json or .csv")
    return {str(r[0]).strip(): _as_id(r, path) for r in rows}


def _as_id(row: Sequence[Any], path: Path | str) -> int:
    if len(row) != 2 or not re.fullmatch(r"\s*\d+\s*", str(row[1])):
        raise UserError(f"labels file {path}: row {list(row)} is not 'folder, non-negative class id'")
    return int(row[1])
