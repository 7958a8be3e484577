"""The shipped embedded video models (circuits/embedded/video_models.py, docs/video.md), the
must-show figures of issue 26 on them (held-out clips of the test split), and circuit
discovery on video models:

- they load strictly (safetensors + JSON config) and reach their recorded accuracy;
- identifiability (circuits.video.space_time_identifiability) rises over the blocks;
- no cross-frame attention drops the motion model to chance and leaves the static control;
- an EAP-IG circuit with a fifth of the edges recovers most of the motion logit difference
  (clean clips against the same clips played backwards, which reverses every direction),
  through one head per block;
- the training augmentations relabel motion consistently (checked on the shapes' masks);
- EAP's graph on a joint-attention video model is the image graph over the space-time tokens;
  divided space-time attention is refused in one line; `blur` corrupts clips frame by frame.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from circuits.circuit_discovery import ViTGraph, corrupt, edge_attribution, faithfulness, prune
from circuits.embedded.synthetic_video import MOTION_CLASSES, SHAPE_CLASSES, MovingShapes
from circuits.embedded.video_models import (NUM_FRAMES, RECIPE, SEEDS, VIDEO_NAMES, WEIGHTS_DIR, _materialize, _normalise, accuracy,
                                            augment, embedded_video_info, load_embedded_video, new_video_model,
                                            video_config)
from circuits.interventions import perturbation_hooks
from circuits.video import space_time_identifiability
from helpers import randomize_
from hooked_vit import HookedViT, HookedViTConfig

N_CLIPS = 64
OPPOSITE = torch.tensor([1, 0, 3, 2])  # each motion class's reverse: right <-> left, down <-> up


@pytest.fixture(scope="module")
def models():
    return {name: load_embedded_video(name) for name in VIDEO_NAMES}


@pytest.fixture(scope="module")
def data():
    """Held-out (test split) uint8 clips and labels per task."""
    return {task: _materialize(MovingShapes(N_CLIPS, split="test", task=task, num_frames=NUM_FRAMES))
            for task in ("motion", "shape")}


def test_shipped_weights_are_small_and_load_strictly(models):
    for name, model in models.items():
        assert (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size < 1_000_000
        info = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        assert info["config"]["model_name"] == f"embedded:{name}" and model.cfg.num_frames == NUM_FRAMES
        architecture = dataclasses.replace(video_config(VIDEO_NAMES[name]), device=model.cfg.device)
        assert model.cfg == architecture  # the architecture the recipe trains
        recipe = {**RECIPE, "seed": SEEDS[VIDEO_NAMES[name]]}  # what `python -m circuits.embedded.video_models` trains
        assert info["metrics"]["recipe"] == recipe and info["metrics"]["val_accuracy"] >= 0.9
    assert models["video_motion"].cfg.class_names == MOTION_CLASSES
    assert models["video_shape"].cfg.class_names == SHAPE_CLASSES


def test_shipped_models_reach_their_accuracy_on_held_out_clips(models, data):
    for name, task in VIDEO_NAMES.items():
        x, y = data[task]
        acc = accuracy(models[name], x, y)
        assert acc >= 0.9, (name, acc)
        assert abs(acc - embedded_video_info(name)["val_accuracy"]) < 0.08  # the recorded figure holds up


def test_identifiability_rises_over_layers(models, data):
    """Must show (a): the mean identifiability of the true direction in the patch tokens rises
    block by block, from near chance (0.625) after block 0 to high after the last."""
    x, y = data["motion"]
    ident = space_time_identifiability(models["video_motion"], _normalise(x), y)
    per_block = ident["tokens"].mean((0, 2))  # [L]
    assert ident["per_time"].shape == (N_CLIPS, 3, NUM_FRAMES)
    assert torch.all(per_block[1:] > per_block[:-1] + 0.03), per_block
    assert per_block[0] < 0.7 and per_block[-1] > 0.82, per_block


def test_no_cross_frame_attention_breaks_motion_not_the_static_control(models, data):
    """Must show (b): with every block's tokens kept to their own frame, the motion model
    falls to chance (1/4) and the static control keeps its accuracy."""
    drops = {}
    for name, task in VIDEO_NAMES.items():
        model = models[name]
        x, y = data[task]
        clean = accuracy(model, x, y)
        cut = accuracy(model, x, y, fwd_hooks=perturbation_hooks(model, "no_cross_frame"))
        drops[task] = clean - cut
    assert drops["motion"] > 0.6, drops
    assert abs(drops["shape"]) < 0.1, drops


def test_eap_ig_circuit_recovers_the_motion_logit_difference_with_few_edges(models, data):
    """Must show (c): EAP-IG on the motion model, clean clips against the same clips played
    backwards (each direction becomes its opposite, every frame's content stays), the logit
    difference between the clean and the reversed direction: a circuit of a fifth of the
    graph's edges, grown greedily from the logits, recovers most of it, through one head per
    block."""
    model = models["video_motion"]
    x, y = data["motion"]
    clean = _normalise(x[:48])
    reversed_ = clean.flip(1)
    t = {"clean_targets": y[:48], "corrupted_targets": OPPOSITE[y[:48]]}
    scores = edge_attribution(model, clean, reversed_, "logit_diff", method="eap-ig", **t)
    total = int(scores.mask.sum())
    circuit = prune(scores, budget=total // 5, greedy=True)
    faith = faithfulness(model, circuit, clean, reversed_, "logit_diff", **t)
    assert faith.clean > 1.0 and faith.corrupted < -1.0  # the reversed clips flip the model's answer
    assert circuit.n_edges == total // 5
    assert faith.recovered > 0.8, faith
    heads = {name.split(".")[0] for edge in circuit.edge_names() for name in edge if name.startswith("L")}
    assert heads == {"L0H0", "L1H0", "L2H0"}, heads  # one head per block carries the motion
    empty = faithfulness(model, prune(scores, budget=0), clean, reversed_, "logit_diff", **t)
    assert abs(empty.recovered) < 1e-4  # no edge: the corrupted run (the measure can fail)


def test_circuit_graph_of_a_video_model_is_over_its_space_time_tokens():
    """Joint attention: the image graph over the space-time tokens (writers [w, b, p, d] with
    p = every token of the clip); patching every edge with the clean values gives the clean
    logits; divided space-time attention is refused in one line."""
    from circuits.circuit_discovery.graph import cache_writers, run_patched

    cfg = HookedViTConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=4, img_size=16, patch_size=8,
                          num_frames=4, class_token=False, global_pool="avg", pos_embed_type="space_time")
    model = randomize_(HookedViT(cfg), std=0.2).eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 3, 16, 16, generator=gen), torch.randn(2, 4, 3, 16, 16, generator=gen)
    logits, writers = cache_writers(model, x)
    assert writers.shape == (len(ViTGraph.of(model).writers), 2, cfg.n_ctx, 32) and cfg.n_ctx == 16
    with torch.no_grad():
        patched = run_patched(model, y, writers, ViTGraph.of(model).edge_mask().float())
    torch.testing.assert_close(patched, logits, atol=1e-4, rtol=1e-4)
    divided = HookedViT(HookedViTConfig(d_model=32, n_layers=1, n_heads=4, d_mlp=64, n_classes=4, img_size=16,
                                        patch_size=8, num_frames=4, attention_type="divided_space_time",
                                        pos_embed_type="space_time"))
    with pytest.raises(ValueError, match="joint-attention video model"):
        ViTGraph.of(divided)
    with pytest.raises(ValueError, match="joint-attention video model"):
        edge_attribution(divided, x, y)


def test_clip_corruptions_act_on_time_and_refuse_images():
    gen = torch.Generator().manual_seed(0)
    clips = torch.randn(2, 4, 3, 16, 16, generator=gen)
    assert torch.equal(corrupt(clips, "reverse_frames")[:, 0], clips[:, 3])
    assert torch.equal(corrupt(clips, "freeze_frames")[:, 3], clips[:, 0])
    shuffled = corrupt(clips, "shuffle_frames")
    assert not torch.equal(shuffled, clips) and torch.equal(shuffled.sort(1).values, clips.sort(1).values)
    for name in ("reverse_frames", "shuffle_frames", "freeze_frames"):
        with pytest.raises(ValueError, match="acts on the frames of clips"):
            corrupt(clips[:, 0], name)


def test_blur_corrupts_clips_frame_by_frame():
    gen = torch.Generator().manual_seed(0)
    clips = torch.randn(2, 3, 3, 16, 16, generator=gen)
    out = corrupt(clips, "blur")
    assert out.shape == clips.shape
    torch.testing.assert_close(out[1, 2], corrupt(clips[1, 2][None], "blur")[0])
    with pytest.raises(ValueError, match="blur needs"):
        corrupt(clips[0, 0, 0], "blur")


def test_augmentations_relabel_motion_consistently():
    """Each training augmentation maps a clip of one direction to a clip of the relabelled
    direction: the shape's masks, augmented alike, move in the new label's direction."""
    ds = MovingShapes(8, task="motion", num_frames=NUM_FRAMES)
    masks = torch.stack([ds[i]["mask"] for i in range(8)])[:, :, None].float()  # [b, t, 1, h, w]
    y = torch.tensor([ds[i]["label"] for i in range(8)])
    seen = set()
    for seed in range(8):
        am, ay = augment(masks, y, "motion", torch.Generator().manual_seed(seed))
        for clip, label in zip(am[:, :, 0], ay):
            best = max(((dy, dx) for dy in range(-7, 8) for dx in range(-7, 8)),
                       key=lambda s: float((torch.roll(clip[0], s, (0, 1)) * clip[1]).sum()))
            dy, dx = best
            direction = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert direction == MOTION_CLASSES[int(label)], (seed, best, MOTION_CLASSES[int(label)])
            seen.add(int(label))
    assert seen == set(range(4))
    same, labels = augment(masks, y, "shape", torch.Generator().manual_seed(0))
    assert torch.equal(labels, y)  # the static control's labels never change


def test_architecture_makes_motion_cross_tokens_in_attention():
    """One frame per token and no class token (the logits are the mean of per-token
    readouts), so information crosses frames only in attention between patch tokens, the
    route `no_cross_frame` cuts; positions only through the 3D rotary embedding."""
    for task, n in (("motion", 4), ("shape", 4)):
        cfg = video_config(task)
        assert cfg.tubelet_size == 1 and cfg.n_time == NUM_FRAMES and not cfg.class_token
        assert cfg.global_pool == "avg" and cfg.rope_type == "3d" and not cfg.pos_embed and cfg.n_classes == n
    a, b = new_video_model("motion", seed=0), new_video_model("motion", seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # seeded
    assert not any("pos_embed" in name or "time_embed" in name for name, _ in a.named_parameters())
    with pytest.raises(ValueError, match="task must be one of"):
        video_config("colour")


def test_eap_on_a_video_model_end_to_end():
    """EAP scores every edge of a video model's graph against time-reversed clips; the whole
    graph recovers all of the logit difference and the empty circuit none of it."""
    cfg = HookedViTConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_classes=4, img_size=16, patch_size=8,
                          num_frames=4, class_token=False, global_pool="avg", pos_embed_type="space_time")
    model = randomize_(HookedViT(cfg), seed=1, std=0.3).eval()
    clean = torch.randn(6, 4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    reversed_ = clean.flip(1)
    t = {"clean_targets": torch.tensor([0, 1, 2, 3, 0, 1]), "corrupted_targets": torch.tensor([1, 0, 3, 2, 1, 0])}
    scores = edge_attribution(model, clean, reversed_, "logit_diff", **t)
    assert scores.scores.shape == scores.mask.shape and torch.isfinite(scores.scores).all()
    assert scores.scores[scores.mask].abs().sum() > 0
    full = faithfulness(model, prune(scores, budget=int(scores.mask.sum())), clean, reversed_, "logit_diff", **t)
    empty = faithfulness(model, prune(scores, budget=0), clean, reversed_, "logit_diff", **t)
    assert abs(full.recovered - 1) < 1e-4 and abs(empty.recovered) < 1e-4
