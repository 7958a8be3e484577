"""Generate notebooks/02_interventions.ipynb (no outputs stored).

    python notebooks/make_02_interventions.py
"""

from __future__ import annotations

from pathlib import Path

from nbgen import write_notebook

CELLS = [
    ("md", """# Interventions: attention perturbation, token removal, activation patching

Three causal experiments on the project's embedded model (a 6-block ViT trained on the
synthetic shapes; 32x32 images, 4x4 patches, one class token, 10 classes). The first two
follow Vilas et al. (NeurIPS 2023), *Analyzing Vision Transformers for Image Classification
in Class Embedding Space*; the third is activation patching as in TransformerLens, with
image positions. Runs on a CPU in well under a minute.

1. **Attention perturbation** (`circuits.interventions`): edit the attention pattern after
   the softmax with hooks: `self_only` (image tokens attend only to themselves) and
   `no_cls` (image tokens cannot read the class token).
2. **Token removal** (`circuits.token_removal`): drop background or object tokens before the
   first block with `keep_mask`, and ask how identifiable the remaining tokens are.
3. **Activation patching** (`circuits.patching`): swap activations from a clean image into a
   corrupted one, layer by layer and token by token.

See `docs/interventions.md` for the definitions, options and limits."""),
    ("code", """import time
import warnings

_start = time.time()
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by transformer_lens

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from circuits.data import mask_to_token_grid
from circuits.embedded import CLASS_NAMES, SyntheticShapes, collate, normalize
from circuits.embedded.synthetic import render
from circuits.interventions import attention_edge_mask, no_cls, perturbation_hooks, self_only
from circuits.patching import patch_activations
from circuits.plot import position_heatmap, token_labels
from circuits.projection import project_batch
from circuits.runs.sources import load_model
from circuits.token_removal import keep_mask_for, last_block_ranks, removal_batch, removal_rates

torch.manual_seed(0)
torch.set_grad_enabled(False)
torch.set_num_threads(1)  # the model is tiny: CPU threading overhead outweighs its gain
model = load_model("embedded")  # the trained default
cfg = model.cfg
batch = collate([SyntheticShapes(256, seed=0, split="test", transform=normalize)[i] for i in range(256)])
x, y = batch["image"], batch["label"]
n_prefix = cfg.n_prefix_tokens  # 1: the class token
print(f"{cfg.n_layers} blocks, {cfg.n_heads} heads, {cfg.n_ctx} tokens = {n_prefix} class token + "
      f"{cfg.grid_size[0]}x{cfg.grid_size[1]} patches; {len(x)} test images")"""),
    ("md", """## 1. Attention perturbation

A perturbation is a hook on `blocks.{l}.attn.hook_pattern` ([batch, head, query, key],
after the softmax). Rows are not renormalised. `perturbation_hooks(model, kind, layers)`
places it on every (or chosen) block; the class token's own query row is never touched.

First the definition, checked by hand: under `self_only` an image token's attention output
is its own value vector through the output matrix, `attn_out[t] = sum_h v_h[t] W_O[h] + b_O`."""),
    ("code", """store = {}
keep = lambda act, hook: store.__setitem__(hook.name, act)  # runs after the perturbation hook
hooks = perturbation_hooks(model, "self_only") + [("blocks.2.attn.hook_v", keep), ("blocks.2.hook_attn_out", keep),
                                                  ("blocks.2.attn.hook_pattern", keep)]
model.run_with_hooks(x[:8], fwd_hooks=hooks)
attn = model.blocks[2].attn
by_hand = torch.einsum("bphe,hem->bpm", store["blocks.2.attn.hook_v"], attn.W_O) + attn.b_O
err = (store["blocks.2.hook_attn_out"][:, n_prefix:] - by_hand[:, n_prefix:]).abs().max()
print(f"self_only, block 2: max |attn_out - v W_O - b_O| over image tokens = {err:.2e}")
pattern = store["blocks.2.attn.hook_pattern"][0, 0]
print(f"class token row untouched: weight on itself {pattern[0, 0]:.3f}, largest weight {pattern[0].max():.3f}")
print("image token rows are one-hot:", bool((pattern[n_prefix:] == torch.eye(cfg.n_ctx)[n_prefix:]).all()))"""),
    ("md", """Now the experiment of Vilas et al.: the share of image tokens whose class rank is 0 at
the last block (the *identifiable-token rate*), with and without each perturbation.
`project_batch` projects every token onto the classes while the hooks are active."""),
    ("code", """def rates(hooks, **kwargs):
    proj = project_batch(model, x, y, sites=("block",), k=1, fwd_hooks=hooks, **kwargs)
    top1 = proj.rank[:, 0, -1, n_prefix:] == 0  # [images, image tokens] at the last block
    return {"identifiable_token_rate": top1.float().mean().item(),
            "images_with_identifiable_token": top1.any(1).float().mean().item(),
            "accuracy": (proj.predictions == y).float().mean().item()}

table = pd.DataFrame({kind: rates(perturbation_hooks(model, kind)) for kind in ("none", "self_only", "no_cls")}).T
table["Vilas et al. B/32"] = [0.607, 0.0013, 0.607]  # ImageNet-S, for the shape of the result
table.round(3)"""),
    ("md", """`self_only` removes everything an image token learns from the other tokens; `no_cls`
removes only what it reads from the class token. The same hooks can act on single blocks:
below, each perturbation applied in one block at a time."""),
    ("code", """per_block = pd.DataFrame([
    {"block": l, "kind": kind, "rate": rates(perturbation_hooks(model, kind, layers=[l]))["identifiable_token_rate"]}
    for kind in ("self_only", "no_cls") for l in range(cfg.n_layers)])
fig = px.bar(per_block, x="block", y="rate", color="kind", barmode="group",
             title="Identifiable image tokens at the last block, perturbing one block at a time")
fig.add_hline(y=table.loc["none", "identifiable_token_rate"], line_dash="dot", annotation_text="unperturbed")
fig.show()"""),
    ("md", """Prefix tokens are options, not guesses: `perturb_prefix_queries=True` also edits register /
distillation query rows, `no_cls(model, keys="prefix")` cuts every prefix token as a key,
`heads=[...]` limits an edit to some heads. Any other edge set is an `attention_edge_mask`:
here image tokens on the object may not read background tokens (per image, from the masks)."""),
    ("code", """obj = mask_to_token_grid(batch["mask"], cfg.patch_size)  # [images, patches] object tokens
prefix = torch.zeros(len(x), n_prefix, dtype=torch.bool)
on_object = torch.cat([prefix, obj], 1)
on_background = torch.cat([prefix, ~obj], 1)
edge_hooks = perturbation_hooks(model, attention_edge_mask(on_object, on_background))
print("object tokens blind to the background:", {k: round(v, 3) for k, v in rates(edge_hooks).items()})"""),
    ("md", """## 2. Token removal

`model(x, keep_mask=...)` drops tokens after the embedding, before the first block (kept
tokens move left, rows of different lengths are padded and masked). `keep_mask_for` builds
the masks from object masks: `context` removes the background (keeps class + object tokens),
`class_label` removes the object (keeps class + background tokens)."""),
    ("code", """i = 0
keep_ctx = keep_mask_for(obj[i:i + 1], "context", n_prefix)[0, n_prefix:].reshape(cfg.grid_size)
keep_obj = keep_mask_for(obj[i:i + 1], "class_label", n_prefix)[0, n_prefix:].reshape(cfg.grid_size)
image = (x[i] * 0.5 + 0.5).permute(1, 2, 0).numpy()
fig = make_subplots(rows=1, cols=3, subplot_titles=(f"image ({CLASS_NAMES[int(y[i])]})",
                                                    "context removed: kept tokens", "object removed: kept tokens"))
fig.add_trace(go.Image(z=(image * 255).astype(np.uint8)), row=1, col=1)
fig.add_trace(go.Heatmap(z=keep_ctx.float().numpy(), showscale=False, colorscale="Greys"), row=1, col=2)
fig.add_trace(go.Heatmap(z=keep_obj.float().numpy(), showscale=False, colorscale="Greys"), row=1, col=3)
fig.update_yaxes(autorange="reversed")
fig.update_layout(height=300)
fig.show()"""),
    ("code", """out = removal_batch(model, x, obj, y)  # last-block ranks at original positions, -1 where removed
rank_none, pred_none = out["none"]
rows = []
for removal, kept in (("context", obj), ("class_label", ~obj)):
    rank, pred, valid = out[removal]
    rate, rate_none = removal_rates(rank, rank_none, kept, n_prefix)
    rows.append({"removal": removal, "images": int(valid.sum()),
                 "remaining tokens identifiable": rate[valid].mean().item(),
                 "same tokens, unperturbed": rate_none[valid].mean().item(),
                 "accuracy after removal": (pred[valid] == y[valid]).float().mean().item()})
removal = pd.DataFrame(rows).set_index("removal")
removal["Vilas et al. B/32"] = ["44.7% (vs 71.9%)", "38.7% (vs 56.2%)"]
removal.round(3)"""),
    ("md", """Removing tokens is not the same as masking pixels: the kept tokens keep their position
embeddings and the model never sees the removed ones. A batch mixes images with different
numbers of kept tokens; each row equals running that image alone:"""),
    ("code", """keep = keep_mask_for(obj[:4], "context", n_prefix)
together = model(x[:4], keep_mask=keep)
alone = torch.cat([model(x[j:j + 1], keep_mask=keep[j:j + 1]) for j in range(4)])
print("kept tokens per image:", keep.sum(1).tolist(), " max |batched - alone| =",
      f"{(together - alone).abs().max():.2e}")"""),
    ("md", """## 3. Activation patching over layer x position

A minimal pair: the same scene (background, position, size, colour, noise) rendered with two
different shapes, from identically seeded generators. The clean run sees shape A, the
corrupted run shape B. Patching a clean activation into the corrupted run and measuring the
logit difference `logit[A] - logit[B]`, normalised so that 0 is the corrupted run and 1 the
clean run, shows where the information that decides the class sits."""),
    ("code", """def pair(seed, a, b, background):
    imgs = []
    for label in (a, b):
        img, _, _ = render(np.random.default_rng(seed), label, background)
        imgs.append(normalize(torch.from_numpy(img.transpose(2, 0, 1).copy())))
    return imgs

shapes = [c for c, name in enumerate(CLASS_NAMES) if name != "bar"]  # bars draw an extra random number
gen = np.random.default_rng(0)
pairs = [pair(100 + s, *gen.choice(shapes, 2, replace=False), s % 2) for s in range(8)]
clean, corrupted = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
clean_t, corrupted_t = model(clean).argmax(-1), model(corrupted).argmax(-1)
print("clean predictions:    ", [CLASS_NAMES[int(c)] for c in clean_t])
print("corrupted predictions:", [CLASS_NAMES[int(c)] for c in corrupted_t])

grid = patch_activations(model, clean, corrupted, "resid_pre", metric="logit_diff",
                         clean_targets=clean_t, corrupted_targets=corrupted_t)
print(f"{grid.values.shape[0]} layers x {grid.values.shape[1]} positions x {grid.values.shape[2]} images")"""),
    ("code", """heat = grid.mean(normalize=True).numpy()  # [layer, position]
fig = position_heatmap(heat, token_names=token_labels(model), row_names=[f"block {l}" for l in range(len(heat))],
                       title="Patching resid_pre: share of the clean - corrupted logit difference recovered",
                       colorbar_title="recovered", yaxis_title="block (resid_pre)")
fig.show()
print(f"class token entering the last block: {heat[-1, 0]:.2f}; "
      f"best image token at block 0: {heat[0, n_prefix:].max():.2f}")"""),
    ("md", """Per head: patching one head's output `z` at all positions (`positions="all"`), for
every layer and head. Head sites (`z`, `q`, `k`, `v`, `result`, `pattern`) take
`heads=None` (each head), `"all"`, or a list; `positions` likewise. `grid.to_frame()` gives
the per-image values in long format for pandas."""),
    ("code", """heads = patch_activations(model, clean, corrupted, "z", positions="all", metric="logit_diff",
                          clean_targets=clean_t, corrupted_targets=corrupted_t)
fig = px.imshow(heads.mean(normalize=True)[:, 0].numpy(), color_continuous_scale="RdBu",
                color_continuous_midpoint=0, labels=dict(x="head", y="block", color="recovered"),
                title="Patching each head's z at every position")
fig.show()
heads.to_frame().head()"""),
    ("code", """print(f"notebook ran in {time.time() - _start:.1f} s")"""),
]


if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).with_name("02_interventions.ipynb"))
