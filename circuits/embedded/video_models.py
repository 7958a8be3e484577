"""Small video HookedViTs trained on the embedded moving-shapes clips (docs/video.md).

Two models of one architecture (ViViT-style: a class token, learned positions, joint
space-time attention; 4 frames of 32x32, one-frame tubelets, so each token sees one frame
and motion can only be read across tokens: 4 time positions of 4x4 patches):

* ``video_motion``: trained on ``MovingShapes(task="motion")``, the direction of motion;
  no single frame tells it, so the model must combine time positions.
* ``video_shape``: the static control, trained on ``MovingShapes(task="shape")``.

They are HookedViTs (no external reference model): a JSON ``HookedViTConfig`` and
safetensors weights under ``circuits/embedded/weights``. Retrain with
``python -m circuits.embedded.video_models`` (a few minutes on two CPU cores).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hooked_vit import HookedViT, HookedViTConfig

from .synthetic import MEAN, STD
from .synthetic_video import TASKS, MovingShapes

WEIGHTS_DIR = Path(__file__).parent / "weights"
VIDEO_NAMES: dict[str, str] = {"video_motion": "motion", "video_shape": "shape"}
NUM_FRAMES = 4
TRAIN = {"n_train": 3000, "n_val": 500, "epochs": 8, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05}


def video_config(task: str) -> HookedViTConfig:
    """The embedded video architecture for `task` ("motion" or "shape")."""
    names = TASKS[task]
    return HookedViTConfig(
        d_model=64, n_layers=3, n_heads=4, d_mlp=128, n_classes=len(names), img_size=32, patch_size=8,
        num_frames=NUM_FRAMES, tubelet_size=1, model_name=f"embedded:video_{task}", label_names=names, class_names=names,
        data_config={"input_size": [3, 32, 32], "mean": list(MEAN), "std": list(STD), "num_frames": NUM_FRAMES},
    )


def _materialize(ds: MovingShapes) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips [N, T, 3, H, W] uint8 and labels [N]."""
    clips = torch.empty(len(ds), ds.num_frames, 3, ds.img_size, ds.img_size, dtype=torch.uint8)
    labels = torch.empty(len(ds), dtype=torch.long)
    for i in tqdm(range(len(ds)), desc=f"render {ds.task}/{ds.split}", leave=False):
        frames, _, labels[i], _ = ds.render(i)
        clips[i] = torch.from_numpy(np.round(frames.transpose(0, 3, 1, 2) * 255.0).astype(np.uint8))
    return clips, labels


def _normalise(clips_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    return (clips_u8.float() / 255.0 - mean) / std


@torch.no_grad()
def accuracy(model: HookedViT, clips_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 250,
             fwd_hooks=()) -> float:
    """Top-1 accuracy on uint8 clips (normalised here), optionally under hooks."""
    correct = 0
    for i in range(0, len(clips_u8), batch_size):
        logits = model.run_with_hooks(_normalise(clips_u8[i:i + batch_size]), fwd_hooks=list(fwd_hooks))
        correct += int((logits.argmax(-1) == labels[i:i + batch_size]).sum())
    return correct / len(clips_u8)


def train_video(task: str, seed: int = 0, **overrides) -> tuple[HookedViT, dict]:
    """Train the embedded video model for `task`; returns the model and its metrics."""
    cfg = {**TRAIN, **overrides}
    torch.manual_seed(seed)
    model = HookedViT(video_config(task))
    with torch.no_grad():  # learned tables start small and random, as timm's trunc_normal(0.02)
        model.embed.pos_embed.normal_(0, 0.02)
        model.embed.cls_token.normal_(0, 0.02)
    train_x, train_y = _materialize(MovingShapes(cfg["n_train"], seed=seed, split="train", task=task, num_frames=NUM_FRAMES))
    val_x, val_y = _materialize(MovingShapes(cfg["n_val"], seed=seed, split="val", task=task, num_frames=NUM_FRAMES))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = cfg["epochs"] * (len(train_x) // cfg["batch_size"])
    warmup = max(1, steps // 10)  # linear warm-up, then cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(step / steps, 1.0))))
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    model.train()
    for _ in tqdm(range(cfg["epochs"]), desc=f"train video_{task}"):
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order) - cfg["batch_size"] + 1, cfg["batch_size"]):
            idx = order[i:i + cfg["batch_size"]]
            loss = F.cross_entropy(model(_normalise(train_x[idx])), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    metrics = {"task": task, "seed": seed, "train": cfg, "train_seconds": round(time.time() - start, 1),
               "val_accuracy": accuracy(model, val_x, val_y)}
    return model, metrics


def save_video_model(model: HookedViT, metrics: dict, name: str, out_dir: Path = WEIGHTS_DIR) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / f"{name}.safetensors"))
    info = {"config": {k: v for k, v in model.cfg.to_dict().items() if k != "device"}, "metrics": metrics}
    (out_dir / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n")


def load_embedded_video(name: str = "video_motion", weights_dir: Path = WEIGHTS_DIR) -> HookedViT:
    """The shipped video model `name` ("video_motion" or "video_shape"), in eval mode."""
    from safetensors.torch import load_file

    if name not in VIDEO_NAMES:
        raise ValueError(f"unknown embedded video model {name!r}; choose one of {sorted(VIDEO_NAMES)}")
    info = json.loads((Path(weights_dir) / f"{name}.json").read_text())
    model = HookedViT(HookedViTConfig.from_dict(info["config"]))
    model.load_state_dict(load_file(str(Path(weights_dir) / f"{name}.safetensors")))
    return model.eval()


def embedded_video_info(name: str = "video_motion", weights_dir: Path = WEIGHTS_DIR) -> dict:
    """The metrics recorded when `name` was trained."""
    return json.loads((Path(weights_dir) / f"{name}.json").read_text())["metrics"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded video models")
    parser.add_argument("--which", choices=sorted(VIDEO_NAMES), nargs="*", default=sorted(VIDEO_NAMES))
    parser.add_argument("--epochs", type=int, default=TRAIN["epochs"])
    parser.add_argument("--n-train", type=int, default=TRAIN["n_train"])
    parser.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    for name in args.which:
        model, metrics = train_video(VIDEO_NAMES[name], epochs=args.epochs, n_train=args.n_train)
        save_video_model(model, metrics, name, args.out_dir)
        print(f"{name}: val accuracy {metrics['val_accuracy']:.3f} ({metrics['train_seconds']} s)")


if __name__ == "__main__":
    main()
