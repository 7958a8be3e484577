"""Generate notebooks/08_video.ipynb (no outputs stored).

    python notebooks/make_08_video.py
"""

from __future__ import annotations

from pathlib import Path

from nbgen import write_notebook

CELLS = [
    ("md", """# Video transformers: hooks over space and time

A video HookedViT is the same model as an image one with a token layout in time
(docs/video.md): clips `[batch, frames, 3, H, W]`, patch tokens in (time, row, col) order
after any class token. This notebook uses the shipped embedded video model
`embedded:video_motion` (4 frames of 32x32, one-frame tubelets, 4x4 patches of 8 px per
frame, V-JEPA 2's 3D rotary embedding, no class token, 4 motion classes) on the embedded
moving-shapes clips, whose class is the direction of motion, and its static control
`embedded:video_shape` (the class is the shape, the shape does not move). Runs on a CPU in
seconds.

1. **Cache every hook** of a clip and name its tokens in time.
2. **Space-time identifiability**: how identifiable the class is in every token after every
   block (Vilas et al. 2023), per time position.
3. **No cross-frame attention** (`no_cross_frame`): tokens cannot read other frames; the
   motion model, which must compare frames, falls to chance, the static control does not.
4. **Pictures over the frames**: a frame strip of token maps and the attention of a token on
   the shape across the frames (`circuits.plot`).
5. **A motion circuit**: EAP-IG against the same clips played backwards."""),
    ("code", """import time
import warnings

_start = time.time()
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by transformer_lens

import numpy as np
import pandas as pd
import torch

from circuits.embedded.synthetic_video import MovingShapes
from circuits.circuit_discovery import edge_attribution, faithfulness, prune
from circuits.interventions import perturbation_hooks
from circuits.plot import attention_across_frames, display_rgb, frame_strip, per_time_curves
from circuits.runs.sources import load_model
from circuits.video import space_time_identifiability
from hooked_vit.tokens import token_frames, token_labels

torch.set_num_threads(1)
model = load_model("embedded:video_motion")
control = load_model("embedded:video_shape")
cfg = model.cfg
print(cfg.model_name, "|", cfg.num_frames, "frames, tubelet", cfg.tubelet_size, "|", cfg.n_time, "time positions of",
      cfg.grid_size, "patches |", cfg.n_ctx, "tokens | classes", cfg.class_names)"""),
    ("md", """## 1. Cache every hook of a clip

`run_with_cache` on clips works as on images. Token names carry the time position
(`t2 patch (1, 3)`), and `token_frames` says which input frames a time position embeds."""),
    ("code", """motion = MovingShapes(64, split="test", task="motion", num_frames=cfg.num_frames)
static = MovingShapes(64, split="test", task="shape", num_frames=cfg.num_frames)
clips = torch.stack([motion[i]["image"] for i in range(len(motion))])  # [64, T, 3, H, W]
labels = torch.tensor([motion[i]["label"] for i in range(len(motion))])
static_clips = torch.stack([static[i]["image"] for i in range(len(static))])
static_labels = torch.tensor([static[i]["label"] for i in range(len(static))])

logits, cache = model.run_with_cache(clips[:2])
names = token_labels(model)
print(names[:3], "...", names[-1])
print("time position 1 embeds frames", list(token_frames(model, 1)))
for hook in ("hook_embed", "blocks.0.attn.hook_pattern", "blocks.2.hook_resid_post"):
    print(f"{hook:28s}", tuple(cache[hook].shape))
assert cache["blocks.0.attn.hook_pattern"].shape == (2, cfg.n_heads, cfg.n_ctx, cfg.n_ctx)"""),
    ("md", """## 2. Space-time identifiability

`space_time_identifiability` projects every token's residual stream after every block onto
the classes through the model's final norm and head; identifiability is 1 - rank / classes
(chance 0.625 with 4 classes). `per_time` averages each time position's patch tokens."""),
    ("code", """ident = space_time_identifiability(model, clips, labels)
print("tokens", tuple(ident["tokens"].shape), "| per time", tuple(ident["per_time"].shape))
per_frame = ident["per_time"].mean(0).numpy()  # [layers, time]
pd.DataFrame(per_frame, index=[f"block {l}" for l in range(cfg.n_layers)],
             columns=[f"t{t}" for t in range(cfg.n_time)]).round(3)"""),
    ("code", """per_time_curves(per_frame, title="Identifiability of each time position's patch tokens over the blocks",
                chance=0.5 + 1 / (2 * cfg.n_classes), yaxis_range=[0, 1.02])"""),
    ("md", """## 3. No cross-frame attention

`perturbation_hooks(model, "no_cross_frame")` sets the attention scores of queries on tokens
of other time positions to -inf (the softmax renormalises over their own frame). Without a
class token nothing else carries information across frames, so a model that tells the
motion must lose it; the static control, whose every frame holds the answer, must not."""),
    ("code", """def accuracy(net, x, y, fwd_hooks=()):
    with torch.no_grad():
        return float((net.run_with_hooks(x, fwd_hooks=list(fwd_hooks)).argmax(-1) == y).float().mean())

rows = [{"model": name, "accuracy": accuracy(net, x, y),
         "accuracy, no cross-frame attention": accuracy(net, x, y, perturbation_hooks(net, "no_cross_frame"))}
        for name, net, x, y in (("video_motion", model, clips, labels),
                                ("video_shape (static control)", control, static_clips, static_labels))]
cut = space_time_identifiability(model, clips, labels, fwd_hooks=perturbation_hooks(model, "no_cross_frame"))
print("last-block identifiability of patch tokens:", round(float(ident["per_time"][:, -1].mean()), 3),
      "-> without cross-frame attention", round(float(cut["per_time"][:, -1].mean()), 3))
pd.DataFrame(rows).round(3)"""),
    ("md", """## 4. Pictures over the frames

`frame_strip` draws a map per time position over its frame, one row of panels;
`attention_across_frames` the attention of one token (here the frame-0 token most covered
by the shape) over every frame's patches, with the share each frame gets in the panel titles."""),
    ("code", """rows, cols = cfg.grid_size
frames = display_rgb(model, clips[0])  # [T, H, W, 3] uint8, the normalisation undone
last = ident["tokens"][0, -1, cfg.n_prefix_tokens:].reshape(cfg.n_time, rows, cols).numpy()
frame_strip(last, frames, title=f"Clip 0 ({motion.class_names[int(labels[0])]}): last-block identifiability",
            zmin=0, zmax=1, colorbar_title="identifiability")"""),
    ("code", """pattern = cache[f"blocks.{cfg.n_layers - 1}.attn.hook_pattern"][0].numpy()  # [heads, P, P]
ph, pw = cfg.patch_size
coverage = motion[0]["mask"][0].float().reshape(rows, ph, cols, pw).mean((1, 3))  # shape share per patch
query = cfg.n_prefix_tokens + int(coverage.flatten().argmax())  # a time-0 token on the shape
attention_across_frames(pattern, query, frames, n_prefix=cfg.n_prefix_tokens, n_time=cfg.n_time, grid=cfg.grid_size,
                        labels=names)"""),
    ("md", """## 5. A motion circuit

Edge attribution patching with integrated gradients (EAP-IG, Hanna et al. 2024) scores every
edge of the graph (heads and MLPs of every block, over all space-time tokens) for the logit
difference between each clip's direction and its reverse, against the same clips played
backwards (`clips.flip(1)`: every direction becomes its opposite, every frame's content stays).
A circuit grown greedily from the logits keeps a fifth of the edges; `faithfulness` runs it,
every other edge patched with the reversed run's value."""),
    ("code", """opposite = torch.tensor([1, 0, 3, 2])[labels[:32]]  # right <-> left, down <-> up
pair = dict(clean_targets=labels[:32], corrupted_targets=opposite)
scores = edge_attribution(model, clips[:32], clips[:32].flip(1), "logit_diff", method="eap-ig", **pair)
total = int(scores.mask.sum())
rows = []
for budget in (total // 10, total // 5, total // 2, total):
    f = faithfulness(model, prune(scores, budget=budget, greedy=True), clips[:32], clips[:32].flip(1), "logit_diff",
                     **pair)
    rows.append({"edges": budget, "share of the graph": budget / total, "recovered": f.recovered})
pd.DataFrame(rows).round(3)"""),
    ("code", """print(f"notebook ran in {time.time() - _start:.1f} s")"""),
]

if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).with_name("08_video.ipynb"))
