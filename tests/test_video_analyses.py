"""Analyses over space and time on video models: per-time aggregates, space-time logit lens
and identifiability, and attention perturbations that fit time (no cross-frame attention),
on small random models (exact properties) and on the embedded video models (docs/video.md)."""

from __future__ import annotations

import pytest
import torch

from circuits.interventions import no_cross_frame, perturbation_hooks
from circuits.video import per_time, space_time_identifiability
from helpers import randomize_
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.tokens import frame_token_mask


def small_video(attention_type: str = "joint", seed: int = 0) -> HookedViT:
    pos = "space_time" if attention_type == "divided_space_time" else "learned"
    cfg = HookedViTConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=5, img_size=16, patch_size=8,
                          num_frames=4, attention_type=attention_type, pos_embed_type=pos)
    return randomize_(HookedViT(cfg), seed=seed, std=0.3).eval()


def clips(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_per_time_means_each_time_positions_patch_tokens():
    model = small_video()
    values = torch.arange(model.cfg.n_ctx, dtype=torch.float32)[None]  # cls, then 4 frames of 2 x 2 patches
    assert per_time(values, model).tolist() == [[2.5, 6.5, 10.5, 14.5]]
    with pytest.raises(ValueError, match="tokens"):
        per_time(values[:, 1:], model)


@pytest.mark.parametrize("attention_type", ["joint", "divided_space_time"])
def test_no_cross_frame_cuts_every_path_between_frames_in_a_block(attention_type):
    """With the perturbation on block 0, a change confined to the last frame leaves the other
    frames' patch tokens after block 0 exactly as they were; without it they move."""
    model = small_video(attention_type)
    x, y = clips(seed=1), clips(seed=2)
    y[:, :3] = x[:, :3]  # same first three frames
    hooks = perturbation_hooks(model, "no_cross_frame", layers=[0])
    site = "attn_time" if attention_type == "divided_space_time" else "attn"
    assert [name for name, _ in hooks] == [f"blocks.0.{site}.hook_attn_scores"]
    first_frames = torch.tensor(frame_token_mask(model, [0, 1, 2]))
    outputs = {}
    for name, fwd_hooks in (("clean", []), ("cut", hooks)):
        with torch.no_grad():
            a = model.run_with_hooks(x, fwd_hooks=fwd_hooks, stop_at_layer=1)
            b = model.run_with_hooks(y, fwd_hooks=fwd_hooks, stop_at_layer=1)
        outputs[name] = (a - b)[:, first_frames].abs().max()
    assert outputs["cut"] == 0 and outputs["clean"] > 1e-3


def test_no_cross_frame_keeps_same_frame_and_prefix_scores():
    model = small_video()  # 4 frames of 2 x 2 patches after the class token
    hook = no_cross_frame(model)
    scores = torch.randn(1, 4, model.cfg.n_ctx, model.cfg.n_ctx)
    out = hook(scores)
    time = torch.tensor([-1] + [t for t in range(4) for _ in range(4)])
    same = (time[:, None] == time[None, :]) | (time[None, :] < 0)
    assert torch.equal(out[0][:, 1:][:, same[1:]], scores[0][:, 1:][:, same[1:]])  # patch rows: kept edges
    assert bool((out[0][:, 1:][:, ~same[1:]] == float("-inf")).all())  # patch rows: other frames cut
    assert torch.equal(out[0, :, 0], scores[0, :, 0])  # the class token's row untouched
    with pytest.raises(ValueError, match="video model"):
        no_cross_frame(HookedViTConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_classes=2))


def test_space_time_identifiability_reads_the_models_logits():
    model = small_video()
    x = clips()
    res = space_time_identifiability(model, x)
    cfg = model.cfg
    assert res["tokens"].shape == (2, cfg.n_layers, cfg.n_ctx) and res["per_time"].shape == (2, cfg.n_layers, 4)
    assert bool((res["cls"][:, -1] == 1).all())  # the class token at the last block is the prediction
    with torch.no_grad():
        assert torch.allclose(res["logits"], model(x))


def test_embedded_video_training_saves_and_loads_exactly(tmp_path):
    """The training script of the embedded video models (docs/video.md):
    a few steps run, and a saved model loads back to the same function."""
    from circuits.embedded.synthetic_video import MovingShapes
    from circuits.embedded.video_models import load_embedded_video, save_video_model, train_video

    model, metrics = train_video("motion", n_train=64, n_val=16, steps=2, batch_size=32)
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and model.cfg.num_frames == 4
    save_video_model(model, metrics, "video_motion", tmp_path)
    loaded = load_embedded_video("video_motion", tmp_path)
    x = torch.stack([MovingShapes(2, num_frames=4)[i]["image"] for i in range(2)])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.cfg.class_names == ("right", "left", "down", "up")
    with pytest.raises(ValueError, match="unknown embedded video model"):
        load_embedded_video("video_colour", tmp_path)


def test_identify_run_on_a_video_model(tmp_path):
    """The dataset-level identify run takes clips: ranks per space-time token, the manifest's
    token names in time, object tokens from the clip's masks, thumbnails as frame strips."""
    import json

    import pyarrow.parquet as pq

    from circuits.embedded.synthetic_video import MovingShapes
    from circuits.runs.identify import identify, object_tokens
    from circuits.runs.thumbnails import read_thumbnails
    from hooked_vit.tokens import token_labels

    cfg = HookedViTConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=4, img_size=32, patch_size=8,
                          num_frames=4, tubelet_size=2)
    model = randomize_(HookedViT(cfg), std=0.2).eval()
    data = MovingShapes(6, num_frames=4)
    identify(model, data, tmp_path, batch_size=3)
    assert json.loads((tmp_path / "labels.json").read_text())["tokens"] == token_labels(model)
    ranks = pq.read_table(sorted((tmp_path / "tokens").glob("*.parquet"))[0]).column("rank").to_pylist()
    assert len(ranks[0]) == cfg.n_ctx == 1 + 2 * 16
    thumbs = read_thumbnails(tmp_path)
    assert next(iter(thumbs.values())).shape == (32, 4 * 32, 3)
    item = data[0]
    flags = object_tokens({"mask": item["mask"][None]}, model)[0]  # [P]
    in_frame = [bool(item["mask"][f, 8 * r + 4, 8 * c + 4]) for f in range(4) for r in range(4) for c in range(4)]
    expected = [any(in_frame[(2 * t + k) * 16 + s] for k in range(2)) for t in range(2) for s in range(16)]
    assert flags.tolist() == [False] + expected  # a tubelet's token: the object in any of its frames
