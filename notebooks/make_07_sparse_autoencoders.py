"""Generate notebooks/07_sparse_autoencoders.ipynb (no outputs stored): python notebooks/make_07_sparse_autoencoders.py"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbgen import write_notebook  # noqa: E402

CELLS = [
    ("md", """# Sparse autoencoders on a ViT, end to end

Train a TopK SAE (Gao et al. 2024) on a mid-layer residual stream of the embedded default
(a 6-block ViT on 32x32 synthetic shapes), splice it in, evaluate it on held-out images and
find the features that pick out the ground-truth shape classes and backgrounds. The budget
is tiny so this runs in seconds on a CPU; `docs/sparse_autoencoders.md` has the figures of
a longer run."""),
    ("code", """import time
import warnings
warnings.filterwarnings("ignore", message="IProgress not found")
_start = time.time()

import torch
from circuits.embedded import CLASS_NAMES, SyntheticShapes, normalize
from circuits.runs.activation_store import build_activation_store
from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
from circuits.sae.train import TrainConfig, train_dictionary
from circuits.sae.splice import spliced
from circuits.sae.evaluate import evaluate_dictionary
from circuits.sae.features import study_features
from circuits.runs.sources import load_model

torch.manual_seed(0)
model = load_model("embedded")
HOOK = "blocks.4.hook_resid_post"
train = SyntheticShapes(300, seed=0, split="train", transform=normalize)
test = SyntheticShapes(160, seed=0, split="test", transform=normalize)"""),
    ("md", "## 1. Activations to disk (sharded, shuffled, resumable), then training"),
    ("code", """store = build_activation_store(model, train, "store", [HOOK], batch_size=100, progress=False)
sae = SparseDictionary(DictionaryConfig(d_in=64, d_sae=256, architecture="topk", k=16, hook_name=HOOK))
log = train_dictionary(sae, lambda epoch: store.batches(1024, seed=epoch),
                       TrainConfig(steps=150, lr=3e-3, warmup_steps=15), out="sae", progress=False)
print(len(store), "rows stored; final", {k: round(v, 3) for k, v in log[-1].items()})"""),
    ("md", """## 2. Splice it in: features become hook points

With the error term added back the unedited logits are unchanged. As in SAELens, the error is
computed from the *unedited* input without gradient, so editing the features at
`...hook_sae_acts_post` changes the output (ablating every feature leaves
`decode(0) + error`), and gradients past the splice flow through the dictionary only.
`model.run_with_cache_with_saes(images, saes=[sae], use_error_term=True)` does the same in
SAELens's words."""),
    ("code", """images = torch.stack([test[i]["image"] for i in range(8)])
clean = model(images)
zero_all = lambda a, hook: a * 0
with spliced(model, sae, use_error=True):
    logits, cache = model.run_with_cache(images)
    print("max logit change with the error term:", float((logits - clean).abs().max()))
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    print("feature activations", tuple(acts.shape), "L0 per token", float((acts > 0).sum(-1).float().mean()))
    top = int(acts[:, 0].mean(0).argmax())
    ablated = model.run_with_hooks(images, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post",
                                                        lambda a, hook: a.index_fill(-1, torch.tensor([top]), 0))])
    print(f"ablating feature {top} changes logits by", float((ablated - clean).abs().max()))
    none_left = model.run_with_hooks(images, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_all)])
    print("ablating every feature changes logits by", float((none_left - clean).abs().max()))"""),
    ("md", "## 3. Evaluation on held-out images"),
    ("code", """metrics = evaluate_dictionary(model, sae, test)
{k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}"""),
    ("md", """## 4. Features and the ground truth

Per shape class and background, the feature whose per-image maximum activation correlates
most with the attribute, the share of that feature's top images with the attribute, and
the feature's logit lens (its decoder direction through the final norm and head)."""),
    ("code", """import pandas as pd
result = study_features(model, sae, test)
rows = pd.DataFrame(result["identified"]["label"] + result["identified"]["background"])
rows["value"] = [CLASS_NAMES[v] if a == "label" else ("warm", "cool")[v] for a, v in zip(rows.attribute, rows.value)]
rows["logit lens top class"] = [CLASS_NAMES[result["logit_lens"]["classes"][f][0]] for f in rows.feature]
rows"""),
    ("code", """import plotly.express as px
f = int(rows[rows.attribute == "label"].sort_values("correlation").iloc[-1].feature)
tops = [test[int(i)] for i in result["top_images"][f]]
grid = torch.stack([(t["image"] * 0.5 + 0.5).clamp(0, 1) for t in tops]).permute(0, 2, 3, 1)
fig = px.imshow(grid.numpy(), facet_col=0, facet_col_wrap=8, title=f"feature {f}: top images")
fig.show()
print(f"done in {time.time() - _start:.0f} s")"""),
]

if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).resolve().parent / "07_sparse_autoencoders.ipynb")
