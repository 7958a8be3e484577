"""Attention perturbations and token removal over a dataset (Vilas et al. 2023, "Analyzing
Vision Transformers for Image Classification in Class Embedding Space"; docs/interventions.md).

`perturbation_experiment` runs `circuits.runs.identify.identify` once per perturbation
kind (hooks from `circuits.interventions`); `token_removal_experiment` streams a dataset
with object masks through `circuits.token_removal.removal_batch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor

from circuits.data.transforms import MaskSampling, batch_object_tokens
from circuits.identifiability import (Convention, check_convention, per_image_identifiable_rate,
                                      removal_rates_original)
from circuits.interventions import KINDS, perturbation_hooks
from circuits.runs.context import start_run
from circuits.data.targets import TargetSpec, resolve_targets
from circuits.runs.identify import identify, load_results
from circuits.runs.results import RunStore, fixed_size_list, stack_column
from circuits.token_removal import (REMOVALS, Removal, kept_tokens_mask, removal_batch, removal_rates,
                                    removal_summary)
from hooked_vit import HookedViT
from hooked_vit.layers import layer_indices
from hooked_vit.errors import UserError


def perturbation_experiment(model: HookedViT, dataset, out_dir, kinds: Sequence[str] = KINDS,
                            layers: Optional[Sequence[int]] = None, *, sites: Sequence[str] = ("block",),
                            k: int = 1, batch_size: int = 32, limit: Optional[int] = None,
                            overwrite: bool = False, progress: bool = True, num_workers: int = 0,
                            target: TargetSpec | str = "label", mask_sampling: MaskSampling | str | None = None,
                            **options) -> dict:
    """Run `circuits.runs.identify.identify` once per perturbation kind; one run dir per kind.

    Writes `out_dir/<kind>/` (analysis "attention_perturbation"; settings record the kind,
    layers and options). Resumable like `identify`. Returns {kind: run directory}.
    target: the class measured (`circuits.data.targets`); "predicted" is each run's own top-1.
    mask_sampling: the object_tokens flags of each run (`MaskSampling`), as in `identify`.
    """
    runs = {}
    hooks_of = {kind: perturbation_hooks(model, kind, layers, **options) for kind in kinds}  # all refused before any runs
    for kind in kinds:
        settings = {"analysis": "attention_perturbation", "perturbation": kind,
                    "layers": None if layers is None else layer_indices(layers, model.cfg.n_layers, "layers"),
                    "options": dict(sorted(options.items()))}
        hooks = hooks_of[kind]
        run = Path(out_dir) / kind
        identify(model, dataset, str(run), sites=sites, k=k, batch_size=batch_size, limit=limit,
                 overwrite=overwrite, progress=progress, num_workers=num_workers, fwd_hooks=hooks,
                 target=target, settings=settings, mask_sampling=mask_sampling)
        runs[kind] = run
    return runs


def perturbation_rates(runs: dict, convention: Convention = "ours") -> pd.DataFrame:
    """Per image and kind, the last-block identifiable-token rate of image (patch) tokens.

    runs: {kind: run dir} from `perturbation_experiment` (or `find_runs`). Returns a long
    DataFrame: index, label, kind, identifiable_token_rate (share of patch tokens with rank
    0 at the last block output), any_identifiable, correct. Compare kinds with
    `df.pivot(index="index", columns="kind", values="identifiable_token_rate")`.
    convention="original": the reference code's tokens (`circuits.identifiability.measured_tokens`):
    every token, class token included, in the perturbed kinds; ``[:, 1:]`` in "none".
    """
    frames = []
    for kind, run in runs.items():
        res = load_results(run)
        rate = per_image_identifiable_rate(res.rank[:, res.site("block"), -1], res.n_prefix, convention,
                                           perturbed=kind != "none")
        frames.append(pd.DataFrame({
            "index": res.images["index"].to_numpy(), "label": res.images["label"].to_numpy(), "kind": kind,
            "identifiable_token_rate": rate, "any_identifiable": rate > 0,
            "correct": res.images["correct"].to_numpy(),
        }))
    return pd.concat(frames, ignore_index=True)



def token_removal_experiment(model: HookedViT, dataset, out_dir, removals: Sequence[Removal] = REMOVALS, *,
                             batch_size: int = 32, limit: Optional[int] = None, overwrite: bool = False,
                             progress: bool = True, num_workers: int = 0, target: TargetSpec | str = "label",
                             settings: Optional[dict] = None,
                             mask_sampling: MaskSampling | str | None = None) -> RunStore:
    """Token removal over a dataset with object masks; resumable (`RunStore`).

    Writes the table "removal": one row per (index, removal) with label, target, the
    number of kept patch tokens, valid, rate_removed (share of kept patch tokens with rank
    0 at the last block), rate_unperturbed (the same tokens without removal), pred_removed,
    pred_unperturbed and the per-token ranks (rank_removed, -1 on removed tokens;
    rank_unperturbed). Load with `pandas.read_parquet(out_dir / "removal")`.
    target: the class measured (`circuits.data.targets`; "predicted": the unperturbed top-1).
    mask_sampling: which patch tokens count as object tokens (`circuits.data.transforms.MaskSampling`:
        center (default), corner (the reference code's), majority[:threshold]).
    """
    target = TargetSpec.of(target, model)
    sampling = MaskSampling.parse(mask_sampling)
    run = start_run("token_removal", model, dataset, out_dir, limit=limit, overwrite=overwrite, progress=progress,
                    num_workers=num_workers, settings=settings, removals=list(removals),
                    n_prefix_tokens=model.cfg.n_prefix_tokens, n_classes=model.cfg.n_classes, target=str(target),
                    mask_sampling=str(sampling))
    for pending in run.batches(batch_size, desc="token removal"):
        batch = pending.data
        if "mask" not in batch:
            raise UserError("token removal needs object masks: use a dataset with masks (synthetic, ImageNet-S)")
        images = run.images(pending)
        labels = torch.as_tensor(batch["label"])
        with torch.no_grad():
            logits = model(images) if target.needs_logits else None
        targets = resolve_targets(target, labels, logits).to(model.device)
        obj = batch_object_tokens(batch, model.cfg.patch_size, sampling)
        table = _batch_table(batch, removal_batch(model, images, obj, targets, removals), obj, targets,
                             model.cfg.n_prefix_tokens)
        pending.save({"removal": table})
    return run.store


def removal_rates_by_convention(df: pd.DataFrame, n_prefix: int, convention: Convention = "ours") -> pd.DataFrame:
    """Mean rates per removal of a "removal" table over its valid images: ours
    (`circuits.token_removal.removal_summary`), or the reference code's
    (`circuits.identifiability.removal_rates_original`: class token counted after removal,
    unperturbed tokens pooled). Columns removal, images, rate_removed, rate_unperturbed (+ ours' extras)."""
    if check_convention(convention) == "ours":
        return removal_summary(df)
    rows = []
    for removal, part in df[df["valid"]].groupby("removal", sort=False):
        rates = removal_rates_original(stack_column(part, "rank_removed"), stack_column(part, "rank_unperturbed"),
                                       n_prefix)
        rows.append({"removal": removal, "images": len(part), **rates})
    return pd.DataFrame(rows, columns=["removal", "images", "rate_removed", "rate_unperturbed"])


def _batch_table(batch: dict, out: dict, obj: Tensor, targets: Tensor, n_prefix: int) -> pa.Table:
    rank_none, pred_none = out["none"]
    cols: dict[str, list] = {k: [] for k in ("index", "label", "target", "removal", "n_kept", "valid",
                                             "rate_removed", "rate_unperturbed", "pred_removed",
                                             "pred_unperturbed", "rank_removed", "rank_unperturbed")}
    for removal, (rank, pred, valid) in ((k, v) for k, v in out.items() if k != "none"):
        kept = kept_tokens_mask(obj, removal).to(rank.device)
        rate, rate_none = removal_rates(rank, rank_none, kept, n_prefix)
        nan = torch.full_like(rate, float("nan"))
        cols["index"].append(torch.as_tensor(batch["index"]))
        cols["label"].append(torch.as_tensor(batch["label"]))
        cols["target"].append(targets)
        cols["removal"] += [removal] * len(rate)
        cols["n_kept"].append(kept.sum(1))
        cols["valid"].append(valid)
        cols["rate_removed"].append(torch.where(valid, rate, nan))
        cols["rate_unperturbed"].append(torch.where(valid, rate_none, nan))
        cols["pred_removed"].append(pred)
        cols["pred_unperturbed"].append(pred_none)
        cols["rank_removed"].append(rank)
        cols["rank_unperturbed"].append(rank_none)
    table = {}
    for key, parts in cols.items():
        if key == "removal":
            table[key] = parts
        elif key.startswith("rank_"):
            table[key] = fixed_size_list(torch.cat(parts).cpu().numpy().astype(np.int32))
        else:
            table[key] = torch.cat([p.reshape(-1).cpu() for p in parts]).numpy()
    return pa.table(table)


