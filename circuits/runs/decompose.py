"""Decomposition over a dataset: fit on a reference set, evaluate on a data set, resumable.

`decompose_run(model, dataset, reference, out_dir)` writes a run directory (see
`circuits.runs.results`):

- `reference.json`: component names, core and spurious scores, the ablation order, the
  chosen k and the reference-set curve (fitted once; reused on resume);
- `reference.npz`: component means over the reference set and the feature bases;
- table `images` (one parquet part per batch): index, label, group (when the items have
  one), attribute (the spurious key's value), `pred_k`
  [max_k + 1] (prediction after ablating the top k components, k = 0 .. max_k),
  `label_logit_terms` [C + 1] (each component's contribution to the label's logit, the
  head bias last);
- `heatmaps.json`: token heatmaps of the top spurious and core heads for a few images;
- `summary.json`: group accuracies on the data set before and after removal, per k.

With `texts` (CLIP towers, whose image projection maps every component exactly into the
text space: `image_projection_maps`), each text's top components are scored on the
reference set (`text_components`, kept in `reference.json`), every image of the data set
gets its similarity to each text through those components (`text_similarity` [T] in
`images`, `text_retrieval`), and `summary.json` lists each text's best images.

Without a spurious attribute in the items, only the core (class) scores are computed.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from circuits.decomposition.decompose import (
    Component, DecomposedSet, decompose, decompose_dataset, readout_logits,
)
from circuits.decomposition.align import image_projection_maps
from circuits.decomposition.scoring import (
    FeatureScorer, TextFeatures, patch_grid, project, text_components, text_retrieval, token_heatmaps,
)
from circuits.decomposition.spurious import (
    SpuriousRemoval, feature_basis, fit_removal, group_accuracy, logits_of, mean_ablate,
)
from circuits.data import collate_samples
from circuits.runs.streaming import describe_dataset
from circuits.arrays import to_numpy
from circuits.runs.context import run_size, start_run
from circuits.runs.distributed import require_single_process
from circuits.runs.results import RunStore, atomic_write_bytes, fixed_size_list, read_table
from hooked_vit.errors import UserError

log = logging.getLogger("circuits.decomposition")
def decompose_run(
    model,
    dataset,
    reference,
    out_dir: str | Path,
    *,
    core_key: str = "label",
    spurious_key: str = "background",
    max_k: int = 10,
    mode: str = "correlation",
    start_layer: int = 0,
    batch_size: int = 64,
    limit: Optional[int] = None,
    reference_limit: Optional[int] = None,
    n_heatmaps: int = 4,
    texts: Sequence[str] = (),
    text_directions: Optional[torch.Tensor] = None,
    text_k: int = 5,
    text_top: int = 10,
    fwd_hooks: Sequence = (),
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    settings: Optional[dict[str, Any]] = None,
) -> RunStore:
    """Fit removal on `reference`, then stream `dataset` into a run directory (resumable).

    `texts` with their unit embeddings `text_directions` [T, d_image_embed]
    (`clip_text_directions` of the CLIP model the tower came from): text retrieval through
    each text's `text_k` top components; `text_top` best images per text in the summary.
    `fwd_hooks` are active in every pass (an intervention, e.g. a planted shortcut); they
    are recorded in the settings by name only, so describe them in `settings`.
    """
    require_single_process("decompose")
    texts = list(texts)
    _check_texts(model, texts, text_directions)
    run = start_run("decompose", model, dataset, out_dir, limit=limit, overwrite=overwrite, num_workers=num_workers,
                    progress=progress, settings=settings, reference=describe_dataset(reference),
                    reference_n=run_size(reference, reference_limit), core_key=core_key,
                    spurious_key=spurious_key, max_k=max_k, mode=mode, start_layer=start_layer,
                    fwd_hooks=[name for name, _ in fwd_hooks], **({"texts": texts, "text_k": text_k} if texts else {}))
    store = run.store
    fitted = _load_or_fit(model, reference, store, core_key, spurious_key, max_k, mode, start_layer,
                          batch_size, reference_limit, fwd_hooks, progress,
                          TextRequest(texts, text_directions, text_k) if texts else None)
    for batch in run.batches(batch_size):
        images = run.images(batch)
        dec = decompose(model, images, start_layer=start_layer, fwd_hooks=fwd_hooks)
        rows = _image_rows(model, dec.terms, batch.data, fitted, spurious_key, max_k)
        if fitted.text is not None:
            mapped = _mapped(model, dec.terms)
            _, similarity = text_retrieval(mapped, _on(fitted.text, mapped))
            rows = rows.append_column("text_similarity", fixed_size_list(similarity.T.float().cpu().numpy()))
        batch.save({"images": rows})
    if n_heatmaps and not (store.root / "heatmaps.json").exists():
        store.write_json("heatmaps.json",
                         heatmaps(model, dataset, fitted, n_heatmaps, start_layer, fwd_hooks=fwd_hooks))
    return run.finish(summarize(store.root, text_top))


# ----------------------------------------------------------------------------- texts
@dataclass
class TextRequest:
    """The texts asked for, their unit directions and how many top components each keeps."""

    texts: list[str]
    directions: torch.Tensor  # [T, d_image_embed]
    k: int


def _check_texts(model, texts: list[str], directions: Optional[torch.Tensor]) -> None:
    """Refuse bad text options before any image is read."""
    if not texts and directions is None:
        return
    if directions is None or directions.ndim != 2 or directions.shape[0] != len(texts):
        raise UserError(f"texts ({len(texts)}) need text_directions [T, d] with one row each "
                         f"(got {None if directions is None else tuple(directions.shape)}): "
                         "circuits.decomposition.align.clip_text_directions(clip, tokenizer, texts)")
    if len(set(texts)) != len(texts):
        raise UserError(f"texts must be distinct, got {texts}")
    image_projection_maps(model, 1)  # refuses a model without CLIP's image projection
    if directions.shape[1] != model.cfg.d_image_embed:
        raise UserError(f"text directions have width {directions.shape[1]}, the image embedding "
                         f"{model.cfg.d_image_embed}: use the text tower of the same CLIP model")


def _mapped(model, terms: torch.Tensor) -> torch.Tensor:
    """Components [n, C, r, d] mapped exactly into the text space [n, C, d_image_embed]."""
    flat = terms.flatten(2)
    return image_projection_maps(model, flat.shape[1])(flat.to(model.image_proj.weight))


def _on(features: TextFeatures, like: torch.Tensor) -> TextFeatures:
    """The features with their directions on the batch's device and dtype."""
    return TextFeatures(features.texts, features.directions.to(like.device, like.dtype), features.scores,
                        features.components)


def _fit_texts(model, request: TextRequest, ref: DecomposedSet, mode: str) -> TextFeatures:
    biases = [i for i, c in enumerate(ref.components) if c.is_bias]
    mapped = _mapped(model, ref.terms)
    return text_components(mapped, request.texts, request.directions.to(mapped), request.k, mode=mode, exclude=biases)


def _load_texts(info: dict, arrays, request: Optional[TextRequest]) -> Optional[TextFeatures]:
    """The text features fitted when the run started; a resume with other directions is refused."""
    if request is None:
        return None
    stored = torch.from_numpy(arrays["text_directions"])
    given = torch.nn.functional.normalize(request.directions.detach().float().cpu(), dim=-1)
    if stored.shape != given.shape or not torch.allclose(stored, given, atol=1e-4):
        raise UserError("the text directions differ from those this run was started with (another text tower?); "
                         "pass the same CLIP model, or overwrite=True / --overwrite to start again")
    rows = info["texts"]
    return TextFeatures([r["text"] for r in rows], stored, torch.tensor([r["scores"] for r in rows]),
                        [r["components"] for r in rows])


def _text_info(features: TextFeatures, components: list[Component]) -> list[dict]:
    return [{"text": t, "components": comps, "names": [components[i].name for i in comps],
             "scores": features.scores[j].tolist()}
            for j, (t, comps) in enumerate(zip(features.texts, features.components))]


# ----------------------------------------------------------------------------- reference
@dataclass
class Fitted:
    """What the data pass needs from the reference set (loaded or freshly fitted)."""

    components: list[Component]
    order: list[int]  # ablation order (empty without a spurious attribute)
    k: int  # chosen number of ablated components
    means: torch.Tensor  # [C, r, d] reference means
    core_basis: torch.Tensor
    spurious_basis: Optional[torch.Tensor]
    info: dict  # what reference.json holds
    text: Optional[TextFeatures] = None  # with texts: each text's scores and top components


def _load_or_fit(model, reference, store: RunStore, core_key, spurious_key, max_k, mode, start_layer,
                 batch_size, reference_limit, fwd_hooks, progress, text: Optional[TextRequest] = None) -> Fitted:
    info_path, arrays_path = store.root / "reference.json", store.root / "reference.npz"
    if info_path.exists() and arrays_path.exists():
        info = json.loads(info_path.read_text())
        arrays = np.load(arrays_path)
        spur = torch.from_numpy(arrays["spurious_basis"]) if "spurious_basis" in arrays else None
        comps = [Component(c["kind"], c["layer"], c["head"]) for c in info["components"]]
        return Fitted(comps, info["order"], info["k"], torch.from_numpy(arrays["means"]),
                      torch.from_numpy(arrays["core_basis"]), spur, info, _load_texts(info, arrays, text))
    ref = decompose_dataset(model, reference, batch_size=batch_size, limit=reference_limit,
                            start_layer=start_layer, fwd_hooks=fwd_hooks, progress=progress)
    if spurious_key in ref.meta:
        removal = fit_removal(model, ref, core_key=core_key, spurious_key=spurious_key, max_k=max_k, mode=mode,
                              group_key=_group_key(ref, spurious_key))
        fitted = _from_removal(removal, ref)
    else:
        log.warning("reference items have no %r attribute: scoring the core feature only", spurious_key)
        fitted = _core_only(ref, core_key, mode)
    sink = io.BytesIO()
    arrays = {"means": to_numpy(fitted.means), "core_basis": to_numpy(fitted.core_basis)}
    if fitted.spurious_basis is not None:
        arrays["spurious_basis"] = to_numpy(fitted.spurious_basis)
    if text is not None:
        fitted.text = _fit_texts(model, text, ref, mode)
        fitted.info["texts"] = _text_info(fitted.text, fitted.components)
        arrays["text_directions"] = fitted.text.directions.float().cpu().numpy()
    np.savez(sink, **arrays)
    atomic_write_bytes(arrays_path, sink.getvalue())
    store.write_json("reference.json", fitted.info)
    return fitted


def _group_key(data: DecomposedSet, spurious_key: str) -> str:
    """Use the items' "group" when present, else class x attribute cells."""
    if "group" not in data.meta:
        n_attr = int(data.meta[spurious_key].max()) + 1
        data.meta["group"] = data.meta["label"] * n_attr + data.meta[spurious_key]
    return "group"


def _from_removal(removal: SpuriousRemoval, ref: DecomposedSet) -> Fitted:
    info = {
        "components": [{"kind": c.kind, "layer": c.layer, "head": c.head, "name": c.name} for c in removal.components],
        "core_scores": removal.core_scores.tolist(), "spurious_scores": removal.spurious_scores.tolist(),
        "order": removal.order, "k": removal.k, "mode": removal.mode, "reference_curve": removal.reference_curve,
        "reference_n": len(ref), "core_dims": removal.core_basis.shape[0],
        "spurious_dims": removal.spurious_basis.shape[0],
    }
    return Fitted(removal.components, removal.order, removal.k, removal.means.cpu(), removal.core_basis.cpu(),
                  removal.spurious_basis.cpu(), info)


def _core_only(ref: DecomposedSet, core_key: str, mode: str) -> Fitted:
    flat = ref.flat()
    basis = feature_basis(flat.sum(1), ref.meta[core_key])
    scores = FeatureScorer().update(project(flat, basis)).scores(mode).float()
    info = {
        "components": [{"kind": c.kind, "layer": c.layer, "head": c.head, "name": c.name} for c in ref.components],
        "core_scores": scores.tolist(), "spurious_scores": None, "order": [], "k": 0, "mode": mode,
        "reference_curve": [], "reference_n": len(ref), "core_dims": basis.shape[0], "spurious_dims": 0,
    }
    return Fitted(ref.components, [], 0, ref.terms.mean(0), basis, None, info)


# ----------------------------------------------------------------------------- data pass
@torch.no_grad()
def _image_rows(model, terms: torch.Tensor, batch: dict, fitted: Fitted, spurious_key: str, max_k: int) -> pa.Table:
    labels = torch.as_tensor(batch["label"])
    means = fitted.means.to(terms.device, terms.dtype)
    preds = []
    for k in range(min(max_k, len(fitted.order)) + 1):  # k = 0: the model as it is
        preds.append(logits_of(model, mean_ablate(terms, fitted.order[:k], means)).argmax(-1).cpu())
    preds = torch.stack(preds, 1)
    if preds.shape[1] < max_k + 1:  # fewer candidates than max_k: repeat the last prediction
        preds = torch.cat([preds, preds[:, -1:].expand(-1, max_k + 1 - preds.shape[1])], 1)
    rows = {"index": np.asarray(batch["index"], dtype=np.int64), "label": labels.numpy().astype(np.int64)}
    for key in ("group", spurious_key):
        if key in batch and torch.is_tensor(batch[key]):
            rows["attribute" if key == spurious_key else key] = batch[key].cpu().numpy().astype(np.int64)
    table = pa.table(rows)
    table = table.append_column("pred_k", fixed_size_list(preds.numpy().astype(np.int32)))
    if model.has_unembed:
        target = labels.to(terms.device)
        per_class = readout_logits(model, terms)  # [b, C, classes]
        label_terms = per_class.gather(-1, target[:, None, None].expand(-1, terms.shape[1], 1))[..., 0]
        label_terms = torch.cat([label_terms, model.b_U[target][:, None]], 1)
        table = table.append_column("label_logit_terms", fixed_size_list(label_terms.float().cpu().numpy()))
    return table


def summarize(root: str | Path, text_top: int = 10) -> dict:
    """Group accuracies per k on the data set, and before / after at the chosen k; with
    texts, each text's `text_top` most similar images."""
    root = Path(root)
    images = read_table(root, "images")
    info = json.loads((root / "reference.json").read_text())
    preds = torch.from_numpy(np.stack(images["pred_k"].to_numpy()))
    labels = torch.from_numpy(images["label"].to_numpy(copy=True))
    if "group" in images:
        groups = torch.from_numpy(images["group"].to_numpy(copy=True))
    elif "attribute" in images:  # class x attribute cells
        attribute = torch.from_numpy(images["attribute"].to_numpy(copy=True))
        groups = labels * (int(attribute.max()) + 1) + attribute
    else:
        groups = torch.zeros_like(labels)
    curve = []
    for k in range(preds.shape[1]):
        acc = group_accuracy(preds[:, k], labels, groups)
        curve.append({"k": k, **{key: acc[key] for key in ("accuracy", "avg_group", "worst_group")}})
    k = min(info["k"], len(curve) - 1)
    names = [c["name"] for c in info["components"]]
    out = {"n_images": int(len(labels)), "k": k, "ablated": [names[i] for i in info["order"][:k]],
           "before": curve[0], "after": curve[k], "curve": curve}
    if "text_similarity" in images:
        out["texts"] = _best_images(images, info["texts"], text_top)
    return out


def _best_images(images, texts: list[dict], top: int) -> list[dict]:
    """Per text: its components and the `top` images of the data set most similar to it."""
    sim = np.stack(images["text_similarity"].to_numpy())  # [n, T]
    index = images["index"].to_numpy()
    out = []
    for j, row in enumerate(texts):
        best = np.argsort(-sim[:, j], kind="stable")[:top]
        out.append({"text": row["text"], "components": row["names"],
                    "images": [{"index": int(index[i]), "similarity": float(sim[i, j])} for i in best]})
    return out


@torch.no_grad()
def heatmaps(model, dataset, fitted: Fitted, n: int, start_layer: int = 0, top: int = 3,
             fwd_hooks: Sequence = ()) -> dict:
    """Token heatmaps for the first n images: the top spurious heads projected on the
    spurious direction, the top core heads on the image's class direction."""
    batch = collate_samples([dataset[i] for i in range(min(n, len(dataset)))])
    images = model.to_input(batch["image"])
    dec = decompose(model, images, start_layer=start_layer, fwd_hooks=fwd_hooks)
    flat_total = dec.flat().sum(1)
    heads = [i for i, c in enumerate(fitted.components) if c.kind == "head"]
    core_scores = torch.tensor(fitted.info["core_scores"])
    out = {"index": batch["index"].tolist(), "label": batch["label"].tolist(), "maps": []}
    if model.cfg.data_config.get("mean") and model.cfg.data_config.get("std"):  # only when the inputs are known
        from circuits.plot import display_rgb

        out["images"] = display_rgb(model, batch["image"]).tolist()  # clamped, so no byte wraps around
    sets = []
    if fitted.spurious_basis is not None and not len(fitted.spurious_basis):
        # A reference holding one value of the spurious key spans no spurious direction.
        out["notes"] = ["no spurious heatmaps: the reference set holds a single value of the spurious key"]
    elif fitted.spurious_basis is not None:
        spur_heads = [i for i in fitted.order if i in heads][:top]
        direction = fitted.spurious_basis[0].to(images.device, images.dtype)
        # Orient the spurious direction so positive means "more like this image's own value".
        sign = torch.sign(flat_total @ direction)
        sets.append(("spurious", spur_heads, direction[None].expand(len(images), -1) * sign[:, None]))
    core_heads = sorted(heads, key=lambda i: -float(core_scores[i]))[:top]
    class_dirs = _class_directions(fitted, flat_total)
    sets.append(("core", core_heads, class_dirs))
    for feature, comps, directions in sets:
        layers = sorted({fitted.components[i].layer for i in comps})
        heat = token_heatmaps(model, images, dec, directions, layers=layers, fwd_hooks=fwd_hooks)  # [b, L, H, k]
        for i in comps:
            c = fitted.components[i]
            grid = patch_grid(heat[:, layers.index(c.layer), c.head], model)
            out["maps"].append({"feature": feature, "component": c.name, "maps": grid.cpu().tolist()})
    return out


def _class_directions(fitted: Fitted, totals: torch.Tensor) -> torch.Tensor:
    """Per image: the total's component inside the core subspace, normalised: the direction
    of "this image's class" as the model represents it."""
    basis = fitted.core_basis.to(totals.device, totals.dtype)
    inside = (totals @ basis.T) @ basis
    return inside / inside.norm(dim=-1, keepdim=True).clamp(min=1e-12)

