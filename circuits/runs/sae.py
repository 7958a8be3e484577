"""Whole runs (what the CLI and the notebook call): train, evaluate, study, each into a run
directory with a manifest naming its analysis, so `hooked-vit report` renders it."""

from __future__ import annotations

import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

from circuits.runs.activation_store import ActivationStore, build_activation_store, shard_shape
from circuits.runs.distributed import init_distributed
from circuits.runs.context import start_run
from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
from circuits.sae.evaluate import evaluate_dictionary
from circuits.sae.features import study_features, summary_for_report
from circuits.sae.formats import load_dictionary
from circuits.sae.train import TrainConfig, default_lr, train_dictionary
from hooked_vit.errors import UserError


def train_run(model, dataset, out: str | Path, *, hook: str, hook_out: Optional[str] = None, architecture: str = "topk",
              d_sae: int = 512, k: int = 16, tokens: str = "all", steps: int = 1500, train_batch: int = 1024,
              lr: Optional[float] = None, sparsity_coeff: Optional[float] = None, checkpoint_every: int = 0, seed: int = 0,
              batch_size: int = 64, limit: Optional[int] = None, num_workers: int = 0, overwrite: bool = False,
              device: str = "cpu", progress: bool = True, activations: Optional[str | Path] = None,
              **train_options) -> Path:
    """Activations of `hook` (and `hook_out`) into out/activations (or an existing store,
    `activations`), then a dictionary in out/.

    Under torchrun every rank writes its share of the store's shards, then trains on its slice of
    each global batch of `train_batch` rows (data-parallel; the same result as one process).
    `train_options`: further `TrainConfig` fields (grad_clip, sparsity_warmup_steps,
    jumprelu_sparsity, aux_coeff, ...); unknown names are refused.
    """
    d = init_distributed()
    if train_batch % d.world:
        raise UserError(f"--train-batch {train_batch} must divide by the number of processes ({d.world})")
    known = {f.name for f in fields(TrainConfig)} - {"steps", "lr", "sparsity_coeff", "checkpoint_every", "seed",
                                                      "device"}
    unknown = sorted(set(train_options) - known)
    if unknown:
        raise UserError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    out = Path(out)
    hooks = [hook] + ([hook_out] if hook_out else [])
    t0 = time.perf_counter()
    if activations is None:
        store = build_activation_store(model, dataset, out / "activations", hooks, tokens=tokens,
                                       batch_size=batch_size, limit=limit, seed=seed, num_workers=num_workers,
                                       overwrite=overwrite, progress=progress)
    else:
        store = _existing_store(activations, hooks, tokens)
    store_s = time.perf_counter() - t0
    d_in = _width(store, hook)
    d_out = _width(store, hook_out) if hook_out else None
    cfg = DictionaryConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, hook_name=hook, hook_out=hook_out,
                           d_out=d_out, tokens=tokens, model_name=model.cfg.model_name)
    train_cfg = TrainConfig(steps=steps, lr=default_lr(architecture) if lr is None else lr, sparsity_coeff=sparsity_coeff, checkpoint_every=checkpoint_every,
                            seed=seed, device=device, **{"warmup_steps": min(100, steps // 10), **train_options})
    run = start_run("sae_train", model, dataset, out, limit=limit, overwrite=overwrite, settings=cfg.to_dict(),
                    train_batch=train_batch, store=str(activations or ""),
                    **{k_: v for k_, v in asdict(train_cfg).items() if k_ not in ("checkpoint_every", "device")})
    sae = SparseDictionary(cfg, seed=seed)
    t0 = time.perf_counter()
    log = train_dictionary(sae, lambda epoch: store.batches(train_batch, seed=seed + epoch), train_cfg,
                           out=out, progress=progress, dist=d)
    run.store.write_json("train_summary.json", {"store_rows": len(store), "store_seconds": store_s,
                                                "train_seconds": time.perf_counter() - t0, "processes": d.world,
                                                "final": log[-1], "log": log[::max(1, len(log) // 200)]})
    return out


def _existing_store(path: str | Path, hooks: list[str], tokens: str) -> ActivationStore:
    store = ActivationStore(path)
    missing = [h for h in hooks if h not in store.hooks]
    if missing:
        raise UserError(f"the activation store {path} holds {store.hooks}, not {missing}")
    if store.settings.get("tokens") != tokens:
        raise UserError(f"the activation store {path} holds tokens={store.settings.get('tokens')!r}, "
                         f"not {tokens!r}; pass --tokens {store.settings.get('tokens')}")
    if not store.shards:
        raise UserError(f"the activation store {path} holds no finished shard; build it first")
    return store


def _width(store, hook: str) -> int:
    return shard_shape(store.shards[0], hook)[1]


def eval_run(model, sae_dir: str | Path, dataset, out: str | Path, *, batch_size: int = 64,
             limit: Optional[int] = None, num_workers: int = 0, overwrite: bool = False) -> dict:
    sae = load_dictionary(sae_dir)
    run = start_run("sae_eval", model, dataset, out, limit=limit, overwrite=overwrite, sae=str(sae_dir))
    metrics = evaluate_dictionary(model, sae, dataset, batch_size=batch_size, limit=limit, num_workers=num_workers)
    run.store.write_json("eval.json", metrics)
    return metrics


def features_run(model, sae_dir: str | Path, dataset, out: str | Path, *, batch_size: int = 64,
                 limit: Optional[int] = None, top_k: int = 8, num_workers: int = 0,
                 overwrite: bool = False) -> dict:
    sae = load_dictionary(sae_dir)
    run = start_run("sae_features", model, dataset, out, limit=limit, overwrite=overwrite, sae=str(sae_dir),
                    top_k=top_k)
    result = study_features(model, sae, dataset, batch_size=batch_size, limit=limit, top_k=top_k,
                            num_workers=num_workers)
    summary = summary_for_report(model, dataset, result, class_names=model.cfg.class_names)
    run.store.write_json("features.json", summary)
    return summary
