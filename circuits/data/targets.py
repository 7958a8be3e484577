"""Which class an analysis measures per image: ``--target label|predicted|<class>``.

Rank, identifiability and perturbation curves are all "how well does the model's internal
state point at class t" (e.g. Vilas et al., "Analyzing Vision Transformers for Image
Classification in Class Embedding Space", NeurIPS 2023, measure the true class). ``t`` is:

* ``label``: the dataset's label (refused for images without one, label -1);
* ``predicted``: the model's own top-1 class, what unlabeled images (label -1) need;
* a class id (``"1"``) or a class name / machine label the model knows (``"goldfish"``,
  ``"n01443537"``): the same class for every image.

Parse once with ``TargetSpec.parse`` (before any forward pass, so a bad value fails fast),
then call ``resolve_targets`` per batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .classes import FIX, ModelClasses
from hooked_vit.errors import UserError

NO_LABEL = -1  # label of an image whose class is unknown (e.g. a flat folder of images)


@dataclass(frozen=True)
class TargetSpec:
    """``kind``: "label", "predicted" or "class" (then ``class_id`` is the fixed class)."""

    kind: Literal["label", "predicted", "class"] = "label"
    class_id: int | None = None

    @classmethod
    def parse(cls, text: str, model: Any = None) -> "TargetSpec":
        """``"label"``, ``"predicted"``, a class id, or a class name the model's metadata knows
        (``model``: as for ``ModelClasses.of``; ids are range-checked against it)."""
        text = str(text).strip()
        if text in ("label", "predicted"):
            return cls(text)
        class_id = ModelClasses.of(model).id_of(text)
        if class_id is None:
            raise UserError(f"target {text!r} is not 'label', 'predicted', a class id or a class "
                             "name of the model")
        return cls("class", class_id)

    @classmethod
    def of(cls, target: "TargetSpec | str", model: Any = None) -> "TargetSpec":
        """``target`` itself if already a spec, else ``parse(target, model)``."""
        return target if isinstance(target, cls) else cls.parse(str(target), model)

    @property
    def needs_logits(self) -> bool:
        """Whether ``resolve_targets`` needs the model's logits for this spec."""
        return self.kind == "predicted"

    def __str__(self) -> str:
        return str(self.class_id) if self.kind == "class" else self.kind


def resolve_targets(spec: TargetSpec, labels: Int[Tensor, "batch"],
                    logits: Float[Tensor, "batch n_classes"] | None = None) -> Int[Tensor, "batch"]:
    """Target class per image (long [batch], on ``labels``' device) under ``spec``.

    Raises ``ValueError`` for ``label`` when some image has no label (-1), for ``predicted``
    without logits, and for a fixed class outside the logits' range.
    """
    labels = torch.as_tensor(labels).long()
    if spec.kind == "label":
        missing = int((labels < 0).sum())
        if missing:
            raise UserError(f"{missing} of {labels.numel()} images have no label (-1, e.g. a flat "
                             "folder); use target 'predicted' or a class id, or sort them into "
                             f"class folders ({FIX} if the names do not match)")
        return labels
    if spec.kind == "predicted":
        if logits is None:
            raise UserError("target 'predicted' needs the model's logits for the batch")
        return logits.argmax(-1).to(labels.device)
    if logits is not None and not 0 <= spec.class_id < logits.shape[-1]:
        raise UserError(f"target class {spec.class_id} is outside the model's {logits.shape[-1]} classes")
    return torch.full_like(labels, spec.class_id)
