"""Generate notebooks/05_decomposition.ipynb (no outputs stored): python notebooks/make_05_decomposition.py"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# Exact component decomposition (Balasubramanian et al. 2024)

The final representation of a ViT (the normalised class token, the pooled vector of a GAP
model, or the class + distillation pair of a distilled DeiT) is a sum: the embedding, every
attention head, every MLP, and the bias terms. The final LayerNorm is linear once its
statistics (mean and biased variance of the full residual vector, the model's eps) are
fixed, so the sum is exact. On the small embedded models (32x32 shapes, 6 blocks, 4 heads)
this notebook:

1. decomposes a batch and checks the sum, per component and per sublayer;
2. attributes the class logit to heads and MLPs, and splits a head by source token (heatmap);
3. scores components for two features, the shape class and the background, and retrieves images;
4. aligns components to another embedding space (no CLIP needed);
5. removes a spurious feature from the `spurious` model by mean-ablating components.

See `docs/decomposition.md` for the formulas and options."""),
    ("code", """import time
import warnings

_start = time.time()
warnings.filterwarnings("ignore", message="IProgress not found")

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from circuits.data import collate_samples, mask_to_token_grid
from circuits.decomposition.align import fit_alignment
from circuits.decomposition.decompose import decompose, decompose_dataset, head_token_terms
from circuits.decomposition.scoring import (
    component_scores, feature_retrieval, image_retrieval, patch_grid, token_heatmaps, top_components,
)
from circuits.decomposition.spurious import feature_basis, fit_removal
from circuits.plot import class_label, display_rgb, token_maps
from circuits.runs.sources import synthetic_for
from circuits.embedded import CLASS_NAMES
from circuits.runs.sources import load_model

torch.manual_seed(0)
model = load_model("embedded")  # the embedded default
data = synthetic_for("default", "test", 256)
batch = collate_samples([data[i] for i in range(8)])
images, labels = batch["image"], batch["label"]"""),
    ("md", """## 1. Decompose a batch

`decompose(model, images)` runs one forward pass, caching `attn.hook_z`, `hook_mlp_out`, the
stream entering the start layer and the final norm's `hook_scale`, and returns a
`Decomposition`: `terms` [batch, components, read-outs, d_model] and the component list."""),
    ("code", """dec = decompose(model, images)
print(len(dec.components), "components:", ", ".join(dec.names[:8]), "...", dec.names[-1])
rel = (dec.total() - dec.representation).norm() / dec.representation.norm()
logit_terms, logit_comps = dec.logit_terms(model)
rel_logits = (logit_terms.sum(1) - dec.logits).norm() / dec.logits.norm()
print(f"relative error of the sum: representation {rel:.1e}, logits {rel_logits:.1e}")

grouped, groups = dec.sublayer_terms()  # heads + b_O = attention output, mlp + b_out = MLP output
print("sublayer groups:", groups)"""),
    ("md", """Starting at a later layer folds everything before it into one `resid_in` term; the
reference convention spreads the bias terms evenly over the other components
(`biases="split"`). Both still sum exactly."""),
    ("code", """late = decompose(model, images, start_layer=4, biases="split")
print(late.names)
print("relative error:", ((late.total() - late.representation).norm() / late.representation.norm()).item())"""),
    ("md", """## 2. Which components write the class?

The classifier head is linear, so each component's contribution to the label's logit is
the head applied to its term (the head bias is one more term, `b_U`)."""),
    ("code", """label_terms = logit_terms[torch.arange(len(labels)), :, labels]  # [batch, components + 1]
attribution = pd.Series(label_terms.mean(0).numpy(), index=[c.name for c in logit_comps])
fig = px.bar(attribution, title="Mean contribution to the label's logit (8 images)",
             labels={"index": "component", "value": "logit"})
fig.update_layout(showlegend=False, height=350)
fig.show()
best = max((c for c in dec.components if c.kind == "head"),
           key=lambda c: attribution[c.name])
print("head writing the most of the label logit:", best.name)"""),
    ("md", """### Token heatmap of that head

Head h of layer l contributes sum_q u[q] A[h, q, k] v_k W_O[h] through source token k.
`token_terms` computes these chunk by chunk (one more forward pass, the pattern reduced in
its hook); `token_heatmaps` projects them on a direction, here each image's own label
direction of the head (a column of `W_U`)."""),
    ("code", """directions = model.W_U[:, labels].T  # [batch, d_model]: the label's unembedding
heat = token_heatmaps(model, images, dec, directions, layers=[best.layer])[:, 0, best.head]  # [batch, tokens]
tokens = head_token_terms(model, images, dec, best.layer)[:, best.head, 0]  # [batch, tokens, d_model]
head_term = dec.terms[:, dec.names.index(best.name), 0]
print("token terms add up to the head term:", torch.allclose(tokens.sum(1), head_term, atol=1e-5))
object_tokens = mask_to_token_grid(batch["mask"], model.cfg.patch_size).float()  # [batch, 64]
n_prefix = model.cfg.n_prefix_tokens
print("share of the head's label logit read from object tokens:",
      ((heat[:, n_prefix:] * object_tokens).sum(1) / heat.sum(1)).mean().item(),
      f"(object tokens: {object_tokens.mean().item():.0%} of the patches)")
grid = patch_grid(heat, model)  # [batch, 8, 8]
token_maps([g.numpy().ravel() for g in grid[:4]], display_rgb(model, images[:4]),
           titles=[class_label(model, int(l)) for l in labels[:4]], grid=model.cfg.grid_size, symmetric=True,
           colorscale="RdBu_r", colorbar_title="label logit", outlines=[o.bool().numpy() for o in object_tokens[:4]],
           title=f"{best.name}: label logit through each patch token (red squares: object tokens)").show()"""),
    ("md", """## 3. Scoring components for a feature

Features are orthonormal bases B of directions. Without CLIP text embeddings we take them
in the model's own representation space (identity alignment), from a held-out reference
split: the class feature is spanned by the class means minus their average, the background
feature by the background means. Score = mean over basis directions of corr(B c_i, B z),
z the total (covariance mode: the scores add up to Var(B z))."""),
    ("code", """ref_data = synthetic_for("default", "val", 256)
ref = decompose_dataset(model, ref_data, batch_size=128, progress=False)
flat = ref.flat()  # [images, components, d_model]
total = flat.sum(1)
class_basis = feature_basis(total, ref.meta["label"], balance=ref.meta["background"])
bg_basis = feature_basis(total, ref.meta["background"], balance=ref.meta["label"])
scores = pd.DataFrame({
    "class": component_scores(flat, class_basis).numpy(),
    "background": component_scores(flat, bg_basis).numpy(),
    "class (cov)": component_scores(flat, class_basis, "covariance").numpy(),
}, index=[c.name for c in ref.components])
print(class_basis.shape[0], "class directions,", bg_basis.shape[0], "background direction")
print("covariance scores add up to Var(z):",
      scores["class (cov)"].sum(), (flat.sum(1) @ class_basis.T).var(0, unbiased=False).mean().item())
scores.sort_values("class", ascending=False).head(8)"""),
    ("code", """fig = go.Figure([go.Bar(x=scores.index, y=scores[c], name=c) for c in ("class", "background")])
fig.update_layout(barmode="group", title="Component scores on the embedded default", height=350)
fig.show()"""),
    ("md", """### Retrieval

By a feature: the sum of the feature's top components, dotted with a probe; here the probe
is the (balanced) mean direction of one class, "ring". By a reference image: cosine
between the sums of the chosen components of two images."""),
    ("code", """from circuits.decomposition.spurious import balanced_means

values, class_means = balanced_means(total, ref.meta["label"], ref.meta["background"])
ring = CLASS_NAMES.index("ring")
probe = class_means[ring] - class_means.mean(0)
class_top = top_components(torch.tensor(scores["class"].values), 5)
print("class components:", [ref.components[i].name for i in class_top])
order, _ = feature_retrieval(flat, class_top, probe)
share = (ref.meta["label"][order[:20]] == ring).float().mean().item()
print(f"top-20 by the ring probe through the class components: {share:.0%} rings "
      f"(base rate {(ref.meta['label'] == ring).float().mean().item():.0%})")

order, cos = image_retrieval(flat, class_top, flat[0])
print(f"reference image: {CLASS_NAMES[ref.meta['label'][0]]}; 8 nearest through the class components: "
      f"{[CLASS_NAMES[i] for i in ref.meta['label'][order[1:9]]]}")"""),
    ("md", """## 4. Alignment to another embedding space

The paper maps every component into CLIP's image space with its own linear map trained on
1 - cos(sum_i f_i(c_i), target) + d * mean((W_i^T W_i - I)^2). Any target embedding works;
with no CLIP model here we align the default model's components to the `spurious` model's
representation of the same images (an unrelated network), one map per layer."""),
    ("code", """other = load_model("embedded:spurious")
val = collate_samples([ref_data[i] for i in range(len(ref_data))])
with torch.no_grad():
    targets = other(val["image"], return_type="pooled")  # [256, 64]: the other model's representation
layer_of = [(c.layer + 1) if c.layer is not None else 0 for c in ref.components]  # one map per layer
result = fit_alignment(flat, targets, groups=layer_of, steps=60, lr=3e-2, progress=False)
print(f"cosine(sum of mapped components, target) = {result.cosine:.3f}; "
      f"orthogonality penalty {result.history[-1]['penalty']:.2e}")"""),
    ("md", """## 5. Removing a spurious feature

The `spurious` model was trained on images whose background predicts `label % 2` 97% of the
time, with small low-contrast shapes, so it leans on the background. On test images where
background and class are independent its worst group (class x background) suffers. We rank
components by background score minus class score on a reference split, mean-ablate the
top k (k chosen on the reference split), and measure group accuracy on the test split.

The shipped `spurious` model has learned the shapes only weakly (about 30% test accuracy):
some class x background groups stay at 0% whatever is ablated (even a linear probe on its
representation, trained on balanced data, misses them), so its worst-group accuracy cannot
move. The ground-truth check that follows plants a background shortcut in a head of the
default model, which does know the shapes."""),
    ("code", """spur_ref = decompose_dataset(other, synthetic_for("spurious", "val", 512), batch_size=128, progress=False)
spur_test = decompose_dataset(other, synthetic_for("spurious", "test", 512), batch_size=128, progress=False)
removal = fit_removal(other, spur_ref, max_k=10)
print("ablated:", [c.name for c in removal.ablated])
curve = pd.DataFrame(removal.curve(other, spur_test, max_k=10)).set_index("k")
print("test split, before -> after:")
print(curve.loc[[0, removal.k], ["accuracy", "avg_group", "worst_group"]])
pd.DataFrame(removal.summary(6))"""),
    ("code", """fig = go.Figure()
for key in ("worst_group", "avg_group"):
    fig.add_scatter(x=curve.index, y=curve[key], name=f"test {key}", mode="lines+markers")
    fig.add_scatter(x=[r["k"] for r in removal.reference_curve], y=[r[key] for r in removal.reference_curve],
                    name=f"reference {key}", mode="lines", line=dict(dash="dot"))
fig.add_vline(x=removal.k, line_dash="dash", annotation_text="chosen k")
fig.update_layout(title="Group accuracy after mean-ablating the top k spurious components", height=350,
                  xaxis_title="k", yaxis_title="accuracy")
fig.show()"""),
    ("md", """### Ground truth: a planted shortcut head

`plant_background_shortcut` returns hooks that make head 0 of the last block a background
detector (a linear read-out of the mean patch embedding) writing towards the classes whose
parity matches the background. `decompose_dataset(..., fwd_hooks=hooks)` decomposes the
hooked model; the removal should find that head."""),
    ("code", """from circuits.decomposition.planted import plant_background_shortcut

hooks, planted = plant_background_shortcut(model, ref_data)
planted_ref = decompose_dataset(model, ref_data, batch_size=128, fwd_hooks=hooks, progress=False)
planted_test = decompose_dataset(model, data, batch_size=128, fwd_hooks=hooks, progress=False)
removal = fit_removal(model, planted_ref, max_k=6)
print(f"planted {planted}; ranked first: {removal.components[removal.order[0]].name}; ablated {[c.name for c in removal.ablated]}")
curve = pd.DataFrame(removal.curve(model, planted_test, max_k=6)).set_index("k")
print(curve.loc[[0, removal.k], ["accuracy", "avg_group", "worst_group"]])
print(f"notebook ran in {time.time() - _start:.0f} s")"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


if __name__ == "__main__":
    out = Path(__file__).with_name("05_decomposition.ipynb")
    nbformat.write(build(), out)
    print(f"wrote {out}")
