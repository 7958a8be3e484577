"""Train, evaluate, save and load the embedded default ViTs on :mod:`circuits.embedded.synthetic`.

Two variants share one architecture (a plain pre-norm class-token timm ``VisionTransformer``
on 32x32 inputs with 4x4 patches, see ``MODEL_KWARGS``):

* ``default``  -- trained on independent shape / background data (``spurious_corr=None``,
  ``difficulty="normal"``); evaluated on ``split="test"``.
* ``spurious`` -- trained on ``spurious_corr=0.97`` with ``difficulty="hard"`` (small,
  low-contrast objects) so that the background (which predicts ``label % 2``) is a much
  easier cue than the shape; evaluated on ``spurious_corr=None`` hard test data, where its
  worst-group accuracy falls clearly below its average-group accuracy.

Inputs are normalised with ``MEAN = STD = 0.5`` (recorded in ``model.pretrained_cfg``).
Run ``python -m circuits.embedded.train --help``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from circuits.decomposition.spurious import group_accuracy
from circuits.identifiability import identifiability as class_identifiability

from .synthetic import CLASS_NAMES, MEAN, N_CLASSES, STD, SyntheticShapes, materialize
from hooked_vit.errors import UserError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
IDENT_NOTE = ("logit lens per block: head(norm(block output)) on every image token (500 test images); "
              "score = circuits.identifiability.identifiability = 1 - rank0(true class) / n_classes, "
              "1 = top-1, 0.5 + 1 / (2 n_classes) = chance")

MODEL_KWARGS: dict = {
    "img_size": 32, "patch_size": 4, "num_classes": N_CLASSES, "embed_dim": 64, "depth": 6,
    "num_heads": 4, "mlp_ratio": 2.0, "global_pool": "token", "class_token": True,
}

CONFIGS: dict[str, dict] = {
    "default": {"spurious_corr": None, "difficulty": "normal", "n_train": 60_000, "epochs": 4,
                "seed": 0, "lr": 2e-3, "weight_decay": 0.05, "batch_size": 64, "n_test": 2000},
    # Fine-tuned from the default weights, so the model knows the shapes but, on the harder
    # images, learns to lean on the correlated background.
    "spurious": {"spurious_corr": 0.97, "difficulty": "hard", "n_train": 20_000, "epochs": 2,
                 "seed": 0, "lr": 5e-4, "weight_decay": 0.05, "batch_size": 64, "n_test": 4000,
                 "init_from": "default"},
}


def _check_which(which: str) -> str:
    """Validate a variant name."""
    if which not in CONFIGS:
        raise UserError(f"unknown embedded model {which!r}; valid names: {sorted(CONFIGS)}")
    return which


def build_model(model_kwargs: dict | None = None, class_names=CLASS_NAMES) -> VisionTransformer:
    """Build an (untrained) timm ViT whose ``pretrained_cfg`` describes the synthetic data
    (``label_names``: the shape names, which HookedViT reads as its class names)."""
    kwargs = dict(MODEL_KWARGS if model_kwargs is None else model_kwargs)
    model = VisionTransformer(**kwargs)
    size = kwargs.get("img_size", 32)
    model.pretrained_cfg = {
        "input_size": (3, size, size), "mean": MEAN, "std": STD, "interpolation": "bilinear",
        "crop_pct": 1.0, "crop_mode": "center", "num_classes": kwargs.get("num_classes", N_CLASSES),
        "architecture": "vit_embedded_synthetic", "first_conv": "patch_embed.proj", "classifier": "head",
        "label_names": tuple(class_names), "label_descriptions": tuple(class_names),
    }
    return model


def _normalize_u8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> normalised float [B, 3, H, W]."""
    mean = torch.tensor(MEAN)[:, None, None]  # [3, 1, 1]
    std = torch.tensor(STD)[:, None, None]  # [3, 1, 1]
    return (images.float() / 255.0 - mean) / std


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def predict(model: torch.nn.Module, images_u8: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels [N] for uint8 images [N, 3, H, W]."""
    model.eval()
    preds = [model(_normalize_u8(images_u8[i:i + batch_size])).argmax(-1) for i in range(0, len(images_u8), batch_size)]
    return torch.cat(preds)


def block_outputs(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream after every block, each [B, 1 + n_patches, D], for normalised x [B, 3, H, W]."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))  # [B, T, D]
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(h)
    return outs


@torch.no_grad()
def identifiability(model: VisionTransformer, images_u8: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Logit-lens class identifiability of image tokens per block.

    For each block output, ``model.head(model.norm(.))`` is applied to every image token;
    the score is `circuits.identifiability.identifiability` (``1 - rank / n_classes`` with
    ``rank`` the 0-based rank of the true class; 1 = true class on top), averaged over image
    tokens and images.
    """
    model.eval()
    x = _normalize_u8(images_u8)  # [B, 3, H, W]
    n_prefix = model.num_prefix_tokens
    scores = []
    for h in block_outputs(model, x):
        logits = model.head(model.norm(h[:, n_prefix:]))  # [B, P, C]
        true = logits.gather(-1, labels[:, None, None].expand(-1, logits.shape[1], 1))  # [B, P, 1]
        rank = (logits > true).sum(-1).float()  # [B, P]
        scores.append(class_identifiability(rank, logits.shape[-1]).mean().item())
    return scores


def _train_loop(model: torch.nn.Module, data: dict, cfg: dict, epochs: int, seed: int) -> list[dict]:
    """AdamW + warm-up/cosine training on materialised data; returns per-epoch logs."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n, bs = len(data["labels"]), cfg["batch_size"]
    steps_per_epoch = n // bs
    total, warmup = epochs * steps_per_epoch, max(1, steps_per_epoch // 2)
    logs, step = [], 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        t0, loss_sum, correct = time.time(), 0.0, 0
        for b in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False):
            idx = perm[b * bs:(b + 1) * bs]
            x, y = _normalize_u8(data["images"][idx]), data["labels"][idx]  # [B, 3, H, W], [B]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg["lr"], warmup)
            logits = model(x)  # [B, C]
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
        seen = steps_per_epoch * bs
        logs.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen, "time_s": time.time() - t0})
        print(f"epoch {epoch + 1}/{epochs}: loss {logs[-1]['loss']:.4f}  train acc {logs[-1]['train_acc']:.4f}  "
              f"({logs[-1]['time_s']:.0f} s)", flush=True)
    return logs


def _evaluate(model: VisionTransformer, cfg: dict, seed: int) -> dict:
    """Held-out metrics: test accuracy / group accuracies on independent test data, identifiability."""
    test = SyntheticShapes(cfg["n_test"], seed=seed, split="test", spurious_corr=None, difficulty=cfg["difficulty"])
    data = materialize(test)
    metrics = group_accuracy(predict(model, data["images"]), data["labels"], data["groups"])
    metrics["identifiability"] = identifiability(model, data["images"][:500], data["labels"][:500])
    metrics["test_dataset"] = test.params() | {"n": cfg["n_test"]}
    return metrics


def train_embedded(which: str = "default", out_dir: str | Path = WEIGHTS_DIR, epochs: int | None = None,
                   seed: int | None = None, threads: int = 2, **overrides) -> Path:
    """Train variant ``which``; write ``<which>.safetensors`` + ``<which>.json`` to ``out_dir``; return the weights path."""
    cfg = dict(CONFIGS[_check_which(which)]) | {k: v for k, v in overrides.items() if v is not None}
    epochs = cfg["epochs"] if epochs is None else int(epochs)
    seed = cfg["seed"] if seed is None else int(seed)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals slow CPU training down a lot late in training
    torch.manual_seed(seed)
    train_ds = SyntheticShapes(cfg["n_train"], seed=seed, split="train", spurious_corr=cfg["spurious_corr"],
                               difficulty=cfg["difficulty"])
    t0 = time.time()
    data = materialize(train_ds)
    print(f"rendered {len(train_ds)} training images in {time.time() - t0:.1f} s", flush=True)
    model = build_model(MODEL_KWARGS)
    if cfg.get("init_from"):
        model.load_state_dict(load_file(str(Path(WEIGHTS_DIR) / f"{cfg['init_from']}.safetensors")))
    logs = _train_loop(model, data, cfg, epochs, seed)
    train_time = time.time() - t0
    metrics = _evaluate(model, cfg, seed)
    print(f"test acc {metrics['accuracy']:.4f}  avg-group {metrics['avg_group']:.4f}  worst-group "
          f"{metrics['worst_group']:.4f}\nidentifiability per block {[round(s, 3) for s in metrics['identifiability']]}")
    info = {"which": which, "model_kwargs": MODEL_KWARGS, "class_names": list(CLASS_NAMES), "seed": seed, "epochs": epochs,
            "train_config": cfg | {"epochs": epochs, "seed": seed}, "train_dataset": train_ds.params() | {"n": len(train_ds)},
            "mean": list(MEAN), "std": list(STD), "train_time_s": round(train_time, 1), "threads": threads,
            "test_accuracy": metrics["accuracy"], "avg_group_accuracy": metrics["avg_group"],
            "worst_group_accuracy": metrics["worst_group"], "group_accuracy": metrics["per_group"],
            "identifiability": metrics["identifiability"], "identifiability_metric": IDENT_NOTE,
            "test_dataset": metrics["test_dataset"], "log": logs,
            "timm_version": __import__("timm").__version__, "torch_version": torch.__version__}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out / f"{which}.safetensors"))
    (out / f"{which}.json").write_text(json.dumps(info, indent=2) + "\n")
    return out / f"{which}.safetensors"


def embedded_info(which: str = "default", weights_dir: str | Path = WEIGHTS_DIR) -> dict:
    """The json metadata shipped with variant ``which`` (model kwargs, training metadata, metrics)."""
    return json.loads((Path(weights_dir) / f"{_check_which(which)}.json").read_text())


def load_embedded_timm(which: str = "default", weights_dir: str | Path = WEIGHTS_DIR) -> VisionTransformer:
    """Build the timm ViT of variant ``which`` from its json and load its safetensors (strict, no pickle); eval mode."""
    info = embedded_info(which, weights_dir)
    model = build_model(info["model_kwargs"], info.get("class_names", CLASS_NAMES))
    model.load_state_dict(load_file(str(Path(weights_dir) / f"{which}.safetensors")), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description="Train an embedded synthetic-shapes ViT.")
    p.add_argument("--which", choices=sorted(CONFIGS), default="default")
    p.add_argument("--out", default=str(WEIGHTS_DIR), help="output directory (default: the shipped weights dir)")
    p.add_argument("--epochs", type=int, default=None, help="default: per-variant config")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--spurious-corr", type=float, default=None, help="only meaningful for --which spurious")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    path = train_embedded(a.which, a.out, a.epochs, a.seed, threads=a.threads, n_train=a.n_train, lr=a.lr,
                          batch_size=a.batch_size, spurious_corr=a.spurious_corr)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
