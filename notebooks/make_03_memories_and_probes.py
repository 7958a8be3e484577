"""Generate notebooks/03_memories_and_probes.ipynb (no outputs stored).

    python notebooks/make_03_memories_and_probes.py
"""

from __future__ import annotations

from pathlib import Path

from nbgen import write_notebook

CELLS = [
    ("md", """# Key-value memories and linear probes

Two analyses of Vilas et al. (NeurIPS 2023), *Analyzing Vision Transformers for Image
Classification in Class Embedding Space*, on the project's embedded model (a 6-block ViT
trained on the synthetic shapes; 32x32 images, 4x4 patches, 10 classes). Runs on a CPU in
well under a minute.

1. **Key-value memories** (`circuits.memories`): every attention and MLP sublayer writes a
   sum of *value vectors* weighted by *coefficients* (keys). We project the values onto the
   classes and ask whether the memories a token activates most are those of its class.
2. **Linear probes** (`circuits.probes`): a ridge probe per token position and site, trained
   on 10 images per class, against the projection onto the class embedding space
   ("logit lens") at the same sites.

See `docs/memories_and_probes.md` for the definitions and their limits."""),
    ("code", """import tempfile
import time
import warnings
from pathlib import Path

_start = time.time()
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by transformer_lens

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from circuits.embedded import CLASS_NAMES, SyntheticShapes, collate, normalize
from circuits.memories import (agreement_by_layer, class_value_agreement, class_value_by_layer,
                               correct_vs_wrong, memory_bank, memory_batch, random_classes)
from circuits.plot import class_label, display_rgb, token_maps
from circuits.probes import accuracy_by_layer
from circuits.runs.memories import load_memory_results, memories
from circuits.runs.probe import load_probe_results, run_probes
from circuits.runs.sources import load_model

torch.manual_seed(0)
torch.set_grad_enabled(False)
model = load_model("embedded")  # the trained default
random_model = load_model("embedded", random_weights=True)  # same architecture, fresh weights
cfg = model.cfg
data = SyntheticShapes(256, seed=0, split="test", transform=normalize)
runs = Path(tempfile.mkdtemp(prefix="memories_"))  # results of the streaming runs
print(f"{cfg.n_layers} blocks, d_model {cfg.d_model}, {cfg.n_heads} heads x d_head {cfg.d_head} "
      f"(= {cfg.n_heads * cfg.d_head} attention memories), d_mlp {cfg.d_mlp} (MLP memories), "
      f"{cfg.n_classes} classes")"""),
    ("md", """## 1. Values in class embedding space

For MLP layer *l* the values are the rows of `W_out[l]` ([d_mlp, d_model]) and the keys the
pre-activations `blocks.l.mlp.hook_pre`; for attention, the rows of `W_O[l]` flattened over
heads ([n_heads * d_head, d_model]) and the keys `blocks.l.attn.hook_z`. A value's class
scores are `W_U^T v` (no norm, no bias). `memory_bank` holds them for every layer, with the
5 memories most aligned with each class and each memory's top-1 class."""),
    ("code", """mlp_bank = memory_bank(model, "mlp", k=5)
last = cfg.n_layers - 1
scores = mlp_bank.class_scores[last]  # [d_mlp, n_classes]
print("5 MLP memories most aligned with each class, last layer:")
for c, name in enumerate(CLASS_NAMES):
    top = mlp_bank.top_per_class[last, c].tolist()
    print(f"  {name:>10}: memories {top}, scores {[round(float(scores[j, c]), 3) for j in top]}")

best = mlp_bank.top_per_class[last, :, 0]  # the most aligned memory of each class
fig = px.imshow(scores[best].numpy(), x=list(CLASS_NAMES), y=[f"memory {int(j)}" for j in best],
                color_continuous_scale="RdBu", color_continuous_midpoint=0, aspect="auto",
                title=f"Class scores W_U^T v of each class's most aligned MLP memory (layer {last})")
fig.show()"""),
    ("md", """**Class-value agreement**: for each class, the largest cosine between its class
embedding (a column of `W_U`) and any value vector of a layer. A random-weight model gives
the level expected from chance alignment in d_model dimensions."""),
    ("code", """cv = pd.concat([class_value_by_layer(class_value_agreement(m)).assign(model=name)
                for name, m in (("trained", model), ("random weights", random_model))])
fig = px.line(cv, x="layer", y="max_cosine", color="model", facet_col="sublayer", markers=True,
              title="Class-value agreement: mean over classes of the max cosine")
fig.show()
cv.pivot_table(index=["sublayer", "layer"], columns="model", values="max_cosine").round(3)"""),
    ("md", """## 2. One batch: which memories do tokens activate?

`memory_batch` runs the model once; hooks on the keys and on the sublayer outputs reduce
every token to flags (the coefficients are never kept):
- **agree**: one of the token's 5 most activated memories is among the 5 memories most
  aligned with the target class; **agree_random**: the same for a seeded random other class;
- **compose**: one of the 5 most activated memories has, as its top-1 class, the top-1
  class of the sublayer output's projection (final norm + head)."""),
    ("code", """batch = collate([data[i] for i in range(64)])
images, labels = batch["image"], batch["label"]
banks = {s: memory_bank(model, s) for s in ("attn", "mlp")}
rand = random_classes(batch["index"].tolist(), labels, cfg.n_classes, seed=0)
out = memory_batch(model, images, labels, rand, banks)
print("accuracy on the batch:", (out.predictions == labels).float().mean().item())
img = slice(cfg.n_prefix_tokens, None)
rows = []
for s, sublayer in enumerate(out.sublayers):
    for layer in range(cfg.n_layers):
        rows.append({"sublayer": sublayer, "layer": layer,
                     **{m: getattr(out, m)[:, s, layer, img].float().mean().item()
                        for m in ("agree", "agree_random", "compose", "compose_random")}})
pd.DataFrame(rows).round(3)"""),
    ("code", """# Where on the image do tokens agree? Last MLP layer, the first four images.
agree = [out.agree[i, out.sublayers.index("mlp"), last, img].float().numpy() for i in range(4)]
fig = token_maps(agree, display_rgb(model, images[:4]), titles=[class_label(model, int(labels[i])) for i in range(4)],
                 grid=cfg.grid_size, zmin=0, zmax=1, colorbar_title="agrees",
                 title="Image tokens whose top-5 MLP memories include one of the target class's (last layer)")
fig.show()"""),
    ("md", """## 3. The whole test set, streamed

`memories(model, dataset, out_dir)` streams a dataset, writes per-image, per-layer token
counts as parquet through `RunStore` (atomic parts, resumable) and the class-value table as
JSON. `load_memory_results` reads them back; the summaries are plain functions over
pandas tables."""),
    ("code", """for name, m in (("trained", model), ("random weights", random_model)):
    memories(m, data, str(runs / "memories" / name), batch_size=128, progress=False)
results = {name: load_memory_results(runs / "memories" / name) for name in ("trained", "random weights")}
by_layer = pd.concat([agreement_by_layer(r.layers).assign(model=name) for name, r in results.items()])
long = by_layer[by_layer["token"] == "image"].melt(
    id_vars=["model", "sublayer", "layer"], value_vars=["agreement", "agreement_random"],
    var_name="class", value_name="share of image tokens")
fig = px.line(long, x="layer", y="share of image tokens", color="model", line_dash="class",
              facet_col="sublayer", markers=True, range_y=[0, 1.02],
              title="Key-value agreement by layer (dashed: random-class baseline)")
fig.show()
by_layer.query("token == 'image'").drop(columns=["token"]).round(3)"""),
    ("code", """# Correctly vs wrongly classified images: per-image agreement, permutation test.
res = results["trained"]
print(f"{int(res.images['correct'].sum())} correct, {int((~res.images['correct']).sum())} wrong images")
correct_vs_wrong(res.images, res.layers, n_resamples=1000).round(4)"""),
    ("code", """# Usage: how often each MLP memory is among a token's top 5, and its top-1 class.
usage = res.usage["mlp"][last]
most_used = np.argsort(-usage)[:8]
pd.DataFrame({"memory": most_used, "top-5 count": usage[most_used],
              "top-1 class": [CLASS_NAMES[int(c)] for c in mlp_bank.top1_class[last, most_used]]})"""),
    ("md", """## 4. Linear probes vs the projection

One ridge probe (alpha 1, targets one-hot coded +1/-1, unpenalised intercept) per site
(block, attention and MLP outputs), layer and token position, trained on 10 images per class
from the synthetic *train* split, tested on the held-out test images; the projection's
accuracy comes from the same forward pass. Training accumulates X^T X and X^T Y inside the
hooks; no features are stored."""),
    ("code", """train = SyntheticShapes(400, seed=0, split="train", transform=normalize)
run_probes(model, train, data, str(runs / "probes"), per_class=10, batch_size=128, progress=False)
probe_res = load_probe_results(runs / "probes")
acc = accuracy_by_layer(probe_res)
long = acc.melt(id_vars=["site", "layer", "token"], value_vars=["probe_accuracy", "projection_accuracy"],
                var_name="method", value_name="top-1 accuracy")
fig = px.line(long, x="layer", y="top-1 accuracy", color="method", line_dash="token", facet_col="site",
              markers=True, range_y=[0, 1.02], title="Linear probes vs projection, per token, by layer")
fig.show()
acc.round(3)"""),
    ("md", """Reading the figure: a probe is trained for the question "which class?" and can read
class information in any direction of the residual stream, so it is an upper bound on what
is linearly decodable; the projection reads only the directions the classifier head uses.
Where the projection approaches the probe, tokens already represent their class in the
class embedding space."""),
    ("code", """print(f"notebook ran in {time.time() - _start:.1f} s")"""),
]


if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).with_name("03_memories_and_probes.ipynb"))
