"""Generate notebooks/06_circuits.ipynb (no outputs stored): python notebooks/make_06_circuits.py"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbgen import write_notebook  # noqa: E402

CELLS = [
    ("md", """# Circuits in a ViT: weights, patching, attribution patching, EAP

On the embedded default (a 6-block, 4-head ViT trained on 32x32 synthetic shapes, one class
token and 64 patch tokens), this notebook goes from the weights to a circuit:

1. TransformerLens parity: the heads' OV and QK circuits as `FactoredMatrix`, checked against
   the forward pass;
2. activation patching by token position, with the positions named;
3. attribution patching (AtP) against exact patching, and AtP*'s QK fix for queries and keys;
4. path patching: a head's effect through its direct path to the logits only;
5. edge attribution patching (EAP), a pruned circuit, its faithfulness and its graph;
6. a ground-truth check: a planted background shortcut head is found first.

It runs on a CPU in well under a minute. See `docs/circuit_discovery.md` for the methods and
the measured figures."""),
    ("code", """import time
import warnings

_start = time.time()
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by transformer_lens

import pandas as pd
import plotly.express as px
import torch

from circuits.circuit_discovery import (attribution_patch, corrupt, edge_attribution, faithfulness,
                                        path_patch, prune)
from circuits.data import collate_samples
from circuits.patching import patch_activations
from circuits.plot import circuit_graph, position_heatmap, token_labels
from circuits.runs.sources import load_model, synthetic_for

torch.manual_seed(0)
torch.set_num_threads(1)  # the model is tiny: CPU threading overhead outweighs its gain
model = load_model("embedded")
cfg = model.cfg
data = synthetic_for("default", "test", 400)
batch = collate_samples([data[i] for i in range(len(data))])
clean = batch["image"][:8]
corrupted = corrupt(clean, "shuffle")  # each image replaced by another one of the batch
tokens = token_labels(model)
print(cfg.n_layers, "blocks,", cfg.n_heads, "heads,", len(tokens), "tokens:", tokens[:3], "...")"""),
    ("md", """## 1. OV and QK circuits (TransformerLens parity)

`model.OV` and `model.QK` are TransformerLens `FactoredMatrix` objects over every layer and
head, `[n_layers, n_heads, d_model, d_model]`, of rank `d_head`. A head's output is its
pattern applied to the normalised input through OV (plus the value bias, which the pattern's
rows, summing to 1, pass through unchanged); its pre-softmax scores are the normalised
input's bilinear form under QK plus the bias terms, times `1/sqrt(d_head)`."""),
    ("code", """OV, QK = model.OV, model.QK
print("OV", tuple(OV.shape), "rank", OV.mdim, "| QK", tuple(QK.shape))
layer, head = 2, 0
names = [f"blocks.{layer}.ln1.hook_normalized", f"blocks.{layer}.attn.hook_pattern",
         f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_attn_scores"]
_, cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
x = cache[names[0]]
pattern = cache[names[1]][:, head]
attn = model.blocks[layer].attn
out = cache[names[2]][:, :, head] @ attn.W_O[head]  # the head's write to the residual stream
via_ov = pattern @ (x @ OV[layer, head].AB) + attn.b_V[head] @ attn.W_O[head]
q, k = x @ attn.W_Q[head] + attn.b_Q[head], x @ attn.W_K[head] + attn.b_K[head]
bilinear = x @ QK[layer, head].AB @ x.transpose(1, 2)
bias_terms = (x @ attn.W_Q[head]) @ attn.b_K[head][:, None] + (attn.b_Q[head] @ k.transpose(1, 2))[:, None]
via_qk = (bilinear + bias_terms) * attn.scale
print("head output = pattern @ x OV + b_V W_O:", torch.allclose(out, via_ov, atol=1e-4))
print("scores = (x QK x^T + bias terms) / sqrt(d_head):", torch.allclose(cache[names[3]][:, head], via_qk, atol=1e-4))
px.imshow(OV.norm().detach().numpy(), labels=dict(x="head", y="block", color="Frobenius norm"),
          title="OV circuit norm per head").update_layout(height=300).show()"""),
    ("md", """## 2. Activation patching by position

Patch each block's residual stream at one token position from the clean run into the
corrupted run and measure the logit difference (clean prediction minus corrupted prediction),
normalised so that 0 is the corrupted run and 1 the clean run. Positions carry their names
(`cls`, `patch (row, col)`): `circuits.patching` sweeps the token sequence, not the image
width."""),
    ("code", """grid = patch_activations(model, clean, corrupted, "resid_pre")
heat = grid.mean(normalize=True).numpy()
position_heatmap(heat, token_names=tokens, row_names=[f"block {l}" for l in range(cfg.n_layers)],
                 title="Patching resid_pre: share of the logit difference recovered", colorbar_title="recovered",
                 yaxis_title="block").show()
print(f"class token entering the last block recovers {heat[-1, 0]:.2f}")"""),
    ("md", """## 3. Attribution patching against exact patching

AtP estimates every patching effect at once, `(a_clean - a_corrupted) . d metric / d a` at the
corrupted run (one clean forward, one corrupted forward, one backward). Below: each head's
output `z` per position in the last two blocks and the residual stream per position, AtP
against exact patching."""),
    ("code", """atp = attribution_patch(model, clean, corrupted, sites=["z", "resid_pre"])
z_grid = patch_activations(model, clean, corrupted, "z", layers=[4, 5])
rows = []
for site, estimate, g in (("z (blocks 4-5)", atp["z"][4:], z_grid), ("resid_pre", atp["resid_pre"], grid)):
    exact = g.mean() - g.corrupted.mean()
    r = torch.corrcoef(torch.stack([estimate.flatten(), exact.flatten()]))[0, 1]
    rows.append(pd.DataFrame({"site": site, "AtP": estimate.flatten().numpy(), "exact": exact.flatten().numpy()}))
    print(f"{site}: {exact.numel()} cells, Pearson r = {float(r):.3f}")
px.scatter(pd.concat(rows), x="exact", y="AtP", color="site", title="AtP against exact activation patching",
           height=350).show()"""),
    ("md", """### AtP*'s QK fix

A query or key reaches the output only through the softmax; where attention saturates the
gradient vanishes and AtP misses the effect. AtP* (Kramar et al. 2024) recomputes the pattern
exactly with the clean query or key patched in, from the corrupted run's q and k, and
multiplies the change by `d metric / d pattern` (`qk_fix=True`; no extra forward pass)."""),
    ("code", """qk_plain = attribution_patch(model, clean, corrupted, sites=["q", "k"])
qk_star = attribution_patch(model, clean, corrupted, sites=["q", "k"], qk_fix=True)
qk_exact = patch_activations(model, clean, corrupted, ["q", "k"], layers=[4, 5])
for side in ("q", "k"):
    exact = (qk_exact[side].mean() - qk_exact[side].corrupted.mean()).flatten()
    for name, est in (("AtP", qk_plain[side][4:]), ("AtP*", qk_star[side][4:])):
        r = torch.corrcoef(torch.stack([est.flatten(), exact]))[0, 1]
        print(f"{side}, blocks 4-5, {name}: Pearson r with exact patching = {float(r):.3f}")"""),
    ("md", """## 4. Path patching

The residual stream is the sum of the writers (embedding, heads, MLPs) plus constant biases,
so a sender's direct path into chosen receivers is patched by adding
`sender_clean - sender_corrupted` to those receivers' inputs only. For the head with the
largest AtP total: its effect through the direct path to the logits, against its total
effect (every path, which equals patching its output)."""),
    ("code", """totals = atp["z"].sum(1)  # [layer, head]: AtP summed over positions
layer, head = divmod(int(totals.abs().argmax()), cfg.n_heads)
sender = f"L{layer}H{head}"
direct = path_patch(model, clean, corrupted, sender, ["logits"]).mean()
total = path_patch(model, clean, corrupted, sender, "all").mean()
later = [f"L{l}H{h}.{s}" for l in range(layer + 1, cfg.n_layers) for h in range(cfg.n_heads) for s in "qkv"]
via_heads = path_patch(model, clean, corrupted, sender, later).mean() if later else torch.tensor(0.0)
print(f"{sender}: total {float(total):.3f}, direct to the logits {float(direct):.3f}, "
      f"through later heads' q/k/v {float(via_heads):.3f}")"""),
    ("md", """## 5. Edge attribution patching and a circuit

EAP scores every edge (writer output -> reader input) with one clean forward, one corrupted
forward and one backward. `prune` keeps the top-|score| edges, or grows the circuit greedily
from the logits (`greedy=True`, Hanna et al. 2024) so that every kept edge lies on a path to
the logits. Faithfulness runs the clean images with every other edge carrying its corrupted
value: the share of the clean-minus-corrupted metric the circuit recovers (0 = none, 1 = all)."""),
    ("code", """clean16 = batch["image"][:16]
corrupted16 = corrupt(clean16, "shuffle")
scores = edge_attribution(model, clean16, corrupted16)
edges = scores.to_frame()
print(len(edges), "edges; the top 8:")
print(edges.head(8).to_string(index=False))
curve = []
for budget in (5, 20, 50, 100, 200):
    for greedy in (False, True):
        result = faithfulness(model, prune(scores, budget=budget, greedy=greedy), clean16, corrupted16)
        curve.append({"edges": budget, "pruning": "greedy" if greedy else "top |score|", "recovered": result.recovered})
curve = pd.DataFrame(curve)
px.line(curve, x="edges", y="recovered", color="pruning", markers=True, log_x=True,
        title="Faithfulness of the pruned circuit", height=320).show()"""),
    ("code", """circuit = prune(scores, budget=20, greedy=True)
kept = set(circuit.edge_names())
edges["in_circuit"] = [(u, d) in kept for u, d in zip(edges.upstream, edges.downstream)]
result = faithfulness(model, circuit, clean16, corrupted16)
title = f"Greedy circuit of 20 edges: recovers {result.recovered:.2f} (red raises the metric)"
circuit_graph(edges, title=title).show()"""),
    ("md", """## 6. Ground truth: a planted shortcut head

`plant_background_shortcut` turns head 0 of the last block into a background detector that
writes towards the classes whose parity matches the background. Clean images on background
0 and corrupted ones with the same objects on background 1 differ only in the background;
the metric is the shortcut's read-out (odd-class minus even-class mean logit). EAP should
rank the planted head's edge to the logits first, and a small circuit should recover the
behaviour."""),
    ("code", """from circuits.circuit_discovery.corruptions import swap_background
from circuits.decomposition.planted import plant_background_shortcut

hooks, planted = plant_background_shortcut(model, synthetic_for("default", "val", 256))
lab, bg = batch["label"], batch["background"]
pairs, used = [], set()
for i in (bg == 0).nonzero()[:, 0].tolist():  # a donor of the same class on background 1
    j = next((j for j in ((bg == 1) & (lab == lab[i])).nonzero()[:, 0].tolist() if j not in used), None)
    if j is not None:
        pairs.append((i, j)), used.add(j)
idx, donors = [i for i, _ in pairs[:32]], [j for _, j in pairs[:32]]
bg_clean = batch["image"][idx]
bg_corrupted = swap_background(bg_clean, batch["mask"][idx], batch["image"][donors])
sign = torch.tensor([1.0 if c % 2 else -1.0 for c in range(cfg.n_classes)])
parity = lambda logits, clean_t, corrupted_t: (logits * sign).mean(-1)  # noqa: E731
planted_scores = edge_attribution(model, bg_clean, bg_corrupted, parity, fwd_hooks=hooks)
top = planted_scores.to_frame().iloc[0]
result = faithfulness(model, prune(planted_scores, budget=20, greedy=True), bg_clean, bg_corrupted, parity,
                      fwd_hooks=hooks)
print(f"planted {planted}; EAP's top edge: {top.upstream} -> {top.downstream}; "
      f"20-edge circuit recovers {result.recovered:.2f}")
print(f"notebook ran in {time.time() - _start:.0f} s")"""),
]


if __name__ == "__main__":
    write_notebook(CELLS, Path(__file__).with_name("06_circuits.ipynb"))
