"""Generate notebooks/04_explanations.ipynb (run: python notebooks/make_04_explanations.py).

The notebook is written without outputs; tests/test_notebooks.py executes it.
"""

from pathlib import Path

from nbgen import write_notebook

CELLS = [
    ("md", """# 04 · Explanation maps and how they are judged

Which image tokens does a ViT's decision rest on? This notebook computes the explanation
maps of `circuits.explain` on the embedded default (a small ViT trained on synthetic
shapes, 32x32 images, 4x4 patches), and judges them the way the literature does:

* **methods**: raw attention, attention rollout, Chefer et al.'s generic attention
  explainability (GAE), attention Grad-CAM, the class-embedding importance map of Vilas et al.
  (2023), and TokenTM (Wu et al. 2024, a reconstruction with its uncertain choices as options);
* **tests**: segmentation against the object masks, positive / negative perturbation,
  the keep-the-most-important AUC, a random baseline, and the model-parameter
  randomisation sanity check.

Formulas and options: `docs/explanations.md`."""),
    ("code", """import tempfile

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from circuits.data import collate_samples
from circuits.plot import class_label, display_rgb, token_maps
from circuits.explain import (METHODS, explain, explain_many, perturbation_curve, randomization_check,
                              segmentation_counts, segmentation_scores, spearman, trace, upsample, auc)
from circuits.runs.explain import benchmark, summarize_benchmark
from circuits.explain.attention import rollout_matrix
from circuits.runs.sources import load_dataset, load_model

torch.set_num_threads(1)  # a tiny model: on a busy machine one thread beats several
model = load_model("embedded")
data = load_dataset("synthetic:test:512", model)
batch = collate_samples([data[i] for i in range(16)])
images, labels, masks = batch["image"], batch["label"], batch["mask"]
print(model.cfg.n_layers, "blocks,", model.cfg.n_patches, "patches; accuracy on the batch:",
      (model(images).argmax(-1) == labels).float().mean().item())"""),
    ("md", """## One call per method

`explain(method, model, images, targets)` returns a relevance per image token
`[batch, n_patches]`; `explain_many` runs several methods on one forward pass.
Class-specific methods explain `targets` (default: the predicted class)."""),
    ("code", """maps = explain_many(model, images, labels, list(METHODS))
for name, rel in maps.items():
    print(f"{name:16s} {tuple(rel.shape)}  class-specific: {METHODS[name].class_specific}")"""),
    ("code", """def show(images, maps, n=4):
    \"\"\"Every method's token map (min-max normalised) over the first images (circuits.plot, as in the report).\"\"\"
    rgb = display_rgb(model, images[:n])
    names = list(maps)
    values, pictures, titles = [], [], []
    for i in range(n):
        for name in names:
            rel = maps[name][i].detach().float()
            values.append(((rel - rel.min()) / (rel.max() - rel.min()).clamp(min=1e-12)).numpy())
            pictures.append(rgb[i])
            titles.append(f"{class_label(model, int(labels[i]))} · {name}")
    return token_maps(values, pictures, titles=titles, title="Relevance maps (min-max normalised per map)",
                      grid=model.cfg.grid_size, zmin=0, zmax=1, colorscale="Jet", colorbar_title="relevance",
                      cols=len(names), cell=150, opacity=0.5)

show(images, maps)"""),
    ("md", """## The formulas, checked on the spot

Rollout: every factor `norm_rows(mean_h A + I)` is row-stochastic, so the product is too.
A trace (`circuits.explain.trace`) keeps every block's attention pattern with its autograd
graph, so you can compute your own variants; `target_grads()` gives `d logit_t / d A_l`."""),
    ("code", """tr = trace(model, images, labels)
r = rollout_matrix(tr.patterns)
print("rollout row sums:", r.sum(-1).min().item(), r.sum(-1).max().item())

# GAE by hand: R = I; R += mean_h(clamp(g * A, min=0)) @ R; map = R[CLS, image tokens]
R = torch.eye(tr.n_tokens).expand(len(images), -1, -1)
for a, g in zip(tr.patterns, tr.target_grads()):
    R = R + (g * a).clamp(min=0).mean(1).detach() @ R
print("GAE by hand == explain('gae'):", torch.allclose(R[:, 0, 1:], maps["gae"], atol=1e-6))"""),
    ("md", """Class-specific maps move with the target; TokenTM's options (see the docs) switch off
its parts: with unit transformation weights, no gradient term and an identity start it is
the unnormalised attention product."""),
    ("code", """other = explain("gae", model, images, (labels + 1) % 10)
print("GAE rank correlation, true vs another class:", np.nanmean(spearman(maps["gae"], other)).round(3))
variants = {"default": {}, "no gradient term": dict(grad="none"), "no NECC": dict(necc="none"),
            "no length ratio": dict(length=False), "sublayer output": dict(attn_transform="output")}
rows = []
for name, opts in variants.items():
    rel = explain("tokentm", model, images, labels, **opts)
    rows.append({"variant": name, "Spearman with default": float(np.nanmean(spearman(maps["tokentm"], rel)))})
pd.DataFrame(rows)"""),
    ("md", """## Segmentation test and perturbation on this batch

Segmentation: the pixel map thresholded at its mean vs the object mask. Perturbation: drop
0, 10, ..., 90% of the patches in relevance order (through `keep_mask`: the tokens leave the
sequence) and watch top-1 accuracy."""),
    ("code", """rows = []
for name, rel in maps.items():
    seg = segmentation_scores(segmentation_counts(upsample(rel, model.cfg.img_size), masks))
    pos = perturbation_curve(model, images, labels, rel, order="positive").float().mean(0)
    neg = perturbation_curve(model, images, labels, rel, order="negative").float().mean(0)
    rows.append({"method": name, **seg, "positive AUC (lower better)": auc(pos.numpy()),
                 "negative AUC (higher better)": auc(neg.numpy())})
pd.DataFrame(rows).round(3)"""),
    ("md", """## Sanity check: do the maps depend on the weights?

Cascading re-initialisation from the top (Adebayo et al. 2018): the head, then the last
block, then the one before... A map that stays the same explains the input, not the model."""),
    ("code", """sanity = pd.DataFrame(randomization_check(model, images[:8], labels[:8]))
sanity.pivot(index="step", columns="method", values="spearman").round(2)"""),
    ("md", """## The whole benchmark over a dataset

`benchmark` streams a dataset, writes parquet tables through `RunStore` (resumable) and
`summarize_benchmark` reduces them to one row per method. The CLI equivalent is
`hooked-vit explain --model embedded --data synthetic:test:512 --out runs/explain`."""),
    ("code", """out = tempfile.mkdtemp()
benchmark(model, data, out, ["attention", "rollout", "gae", "gradcam", "class_embedding", "tokentm", "random"],
          limit=64, batch_size=64, progress=False)
summarize_benchmark(out).drop(columns=["positive_curve", "negative_curve"]).round(3)"""),
]


if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).with_name("04_explanations.ipynb"))
