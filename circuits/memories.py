"""Key-value memories of attention and MLP sublayers in class embedding space (Vilas et al. 2023, section 5).

A sublayer's output is a sum of value vectors weighted by coefficients (Geva et al. 2021;
Vilas et al. 2023, section 5):
- MLP layer l: values = rows of `W_out[l]` ([d_mlp, d_model]), coefficients = the
  pre-activation `mlp.hook_pre` (fc1 output before the nonlinearity, the "keys").
- attention layer l: values = rows of `W_O[l]` flattened over heads ([n_heads * d_head,
  d_model], memory index = head * d_head + e), coefficients = the input of W_O,
  `attn.hook_z` flattened the same way.
LayerScale is folded into W_out / W_O, so the values are exactly what the sublayer writes.
A value's class scores are W_U^T v (no final norm, no head bias).

Metrics, all per token and reduced to per-image counts inside the forward pass (the
coefficients are never stored; the original code saved ~12 MB of them per image):
- key-value agreement: any of the token's k most activated memories (largest signed
  coefficient) is among the k memories with the largest score for the target class;
  the same for a seeded random class (a class other than the target) as the baseline;
- composition: any of the token's k most activated memories has, as its top-1 class, the
  top-1 class of the sublayer output of that token (projected like `circuits.projection`:
  final norm + head); the same for the random class as the baseline;
- class-value agreement (weights only): for each class, the largest cosine between its
  class embedding (column of W_U) and any value vector of the layer;
- how often each memory is among a token's k most activated (usage counts).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuits.identifiability import pretrained_vs_random
from hooked_vit import HookedViT
from hooked_vit.errors import UserError


# sublayer -> (coefficient hook, output hook), per block.
SUBLAYERS = {"attn": ("attn.hook_z", "hook_attn_out"), "mlp": ("mlp.hook_pre", "hook_mlp_out")}
METRICS = ("agree", "agree_random", "compose", "compose_random")
TOKENS = ("cls", "image")


# ------------------------------------------------------------------ values (weights only)
def memory_values(model: HookedViT, sublayer: str) -> Float[Tensor, "L m d"]:
    """The value vectors of every layer of one sublayer kind (see the module docstring)."""
    if sublayer == "attn":
        return model.W_O.flatten(1, 2)  # [L, h, e, d] -> [L, h*e, d], same order as z.flatten
    if sublayer == "mlp":
        return model.W_out
    raise UserError(f"unknown sublayer {sublayer!r}; expected one of {sorted(SUBLAYERS)}")


@dataclass
class MemoryBank:
    """The values of one sublayer kind and their class scores, for every layer."""

    sublayer: str
    values: Float[Tensor, "L m d"]
    class_scores: Float[Tensor, "L m c"]  # W_U^T v per value, no norm, no bias
    k: int

    @property
    def n_memories(self) -> int:
        return self.values.shape[1]

    @property
    def top_per_class(self) -> Int[Tensor, "L c k"]:
        """The k memories most aligned with each class (largest class score)."""
        return self.class_scores.topk(self.k, dim=1).indices.transpose(1, 2)

    @property
    def top1_class(self) -> Int[Tensor, "L m"]:
        """Each memory's top-1 class."""
        return self.class_scores.argmax(-1)


@torch.no_grad()
def memory_bank(model: HookedViT, sublayer: str, k: int = 5) -> MemoryBank:
    values = memory_values(model, sublayer).detach()
    k = min(k, values.shape[1])
    return MemoryBank(sublayer, values, values @ model.W_U.detach(), k)


@torch.no_grad()
def class_value_agreement(model: HookedViT, sublayers: Sequence[str] = tuple(SUBLAYERS)) -> pd.DataFrame:
    """Per sublayer, layer and class: the largest cosine between the class embedding (column
    of W_U) and any value vector, and which memory attains it.

    Returns columns sublayer, layer, class, max_cosine, memory.
    """
    classes = F.normalize(model.W_U.detach().float(), dim=0)  # [d, c]
    rows = []
    for sublayer in sublayers:
        for layer, values in enumerate(memory_values(model, sublayer).detach().float()):
            cos = F.normalize(values, dim=-1) @ classes  # [m, c]; one layer at a time bounds memory
            best, memory = (t.cpu().tolist() for t in cos.max(0))
            rows += [(sublayer, layer, c, best[c], memory[c]) for c in range(cos.shape[1])]
    return pd.DataFrame(rows, columns=["sublayer", "layer", "class", "max_cosine", "memory"])


# ------------------------------------------------------------------ one batch
@dataclass
class MemoryBatch:
    """Per-token memory metrics of one batch. S = sublayers, L = layers, P = tokens."""

    sublayers: tuple[str, ...]
    agree: Bool[Tensor, "b S L P"]
    agree_random: Bool[Tensor, "b S L P"]
    compose: Bool[Tensor, "b S L P"]
    compose_random: Bool[Tensor, "b S L P"]
    usage: dict[str, Int[Tensor, "L m"]]  # top-k counts per memory, summed over the batch's tokens
    logits: Float[Tensor, "b c"]
    targets: Int[Tensor, "b"]
    random_classes: Int[Tensor, "b"]

    @property
    def predictions(self) -> Int[Tensor, "b"]:
        return self.logits.argmax(-1)


def random_classes(indices: Sequence[int], targets: Sequence[int], n_classes: int, seed: int = 0) -> Tensor:
    """A class other than the target for every image, drawn from a generator seeded by
    (seed, dataset index): the same image gets the same class whatever the batching."""
    if n_classes < 2:
        raise UserError("a random-class baseline needs at least two classes")
    offsets = [np.random.default_rng([seed, int(i)]).integers(1, n_classes) for i in indices]
    return (torch.as_tensor(targets).cpu() + torch.as_tensor(offsets)) % n_classes


def _any_member(top: Int[Tensor, "b p k"], sets: Int[Tensor, "b k2"], n_memories: int) -> Bool[Tensor, "b p"]:
    """Whether any of each token's memories is in its image's set."""
    # A membership mask and a gather: far cheaper on CPU than comparing all k x k2 pairs.
    member = torch.zeros(sets.shape[0], n_memories, dtype=torch.uint8, device=sets.device).scatter_(1, sets, 1)
    return member.gather(1, top.flatten(1)).view(top.shape).amax(-1).bool()


@torch.inference_mode()
def memory_batch(
    model: HookedViT,
    images: Float[Tensor, "b c h w"],
    targets: Int[Tensor, "b"],
    random_class: Int[Tensor, "b"],
    banks: dict[str, MemoryBank],
    fwd_hooks: Sequence = (),
) -> MemoryBatch:
    """Run the model once; per token, the key-value agreement (target and random class) and
    the composition of every sublayer in `banks`.

    Args:
        targets: class per image (the label, or the model's prediction).
        random_class: the baseline class per image, other than the target (`random_classes`).
        banks: sublayer name -> `memory_bank(model, sublayer, k)`.
        fwd_hooks: extra hooks active during the run (e.g. attention perturbations). Token
            removal (keep_mask) is not supported: padded rows would be counted as tokens.
    """
    dev = model.device
    targets, random_class = targets.to(dev), random_class.to(dev)
    flags: dict[tuple[str, str, int], Tensor] = {}
    tops: dict[tuple[str, int], Tensor] = {}
    usage = {s: torch.zeros(model.cfg.n_layers, bank.n_memories, dtype=torch.int64, device=dev)
             for s, bank in banks.items()}

    def key_hook(sublayer: str):
        bank = banks[sublayer]
        class_sets = bank.top_per_class.to(dev)

        def hook(act: Tensor, hook) -> None:
            layer = hook.layer()
            top = act.flatten(2).topk(bank.k, dim=-1).indices  # [b, p, k]; z [b,p,h,e] -> [b,p,h*e]
            tops[sublayer, layer] = top
            usage[sublayer][layer] += torch.bincount(top.flatten(), minlength=bank.n_memories)
            flags[sublayer, "agree", layer] = _any_member(top, class_sets[layer][targets], bank.n_memories)
            flags[sublayer, "agree_random", layer] = _any_member(top, class_sets[layer][random_class], bank.n_memories)
        return hook

    def out_hook(sublayer: str):
        top1_class = banks[sublayer].top1_class.to(dev)

        def hook(act: Tensor, hook) -> None:
            layer = hook.layer()
            memory_class = top1_class[layer][tops.pop((sublayer, layer))]  # [b, p, k]
            layer_top1 = model.to_class_logits(act).argmax(-1)  # [b, p]
            flags[sublayer, "compose", layer] = (memory_class == layer_top1[..., None]).any(-1)
            flags[sublayer, "compose_random", layer] = (memory_class == random_class[:, None, None]).any(-1)
        return hook

    hooks = list(fwd_hooks)
    for sublayer in banks:
        key_name, out_name = SUBLAYERS[sublayer]
        for layer in range(model.cfg.n_layers):
            hooks += [(f"blocks.{layer}.{key_name}", key_hook(sublayer)),
                      (f"blocks.{layer}.{out_name}", out_hook(sublayer))]
    logits = model.run_with_hooks(images, fwd_hooks=hooks)

    def stack(metric: str) -> Tensor:  # -> [b, S, L, P]
        return torch.stack([torch.stack([flags[s, metric, l] for l in range(model.cfg.n_layers)], 1)
                            for s in banks], 1)

    return MemoryBatch(tuple(banks), *(stack(m) for m in METRICS), usage=usage, logits=logits,
                       targets=targets, random_classes=random_class)


def token_counts(flags: Bool[Tensor, "b S L P"], n_prefix: int, class_token: bool) -> dict[str, np.ndarray]:
    """Per-token flags -> per-image counts [b, S, L] for the class token and image tokens."""
    cls = flags[..., 0] if class_token else torch.zeros(flags.shape[:-1], dtype=torch.bool, device=flags.device)
    return {"cls": cls.int().cpu().numpy(), "image": flags[..., n_prefix:].sum(-1).int().cpu().numpy()}


# ------------------------------------------------------------------ whole dataset
@dataclass
class MemoryResults:
    settings: dict
    images: pd.DataFrame  # one row per image
    layers: pd.DataFrame  # one row per image x sublayer x layer (token counts)
    usage: dict[str, np.ndarray]  # sublayer -> [L, m] top-k counts over the whole run
    class_value: pd.DataFrame  # `class_value_agreement`


def agreement_by_layer(layers: pd.DataFrame) -> pd.DataFrame:
    """Share of tokens that agree / compose, per sublayer, layer and token kind, pooled over
    images (sum of counts over sum of tokens).

    Returns columns sublayer, layer, token, agreement, agreement_random, composition,
    composition_random, tokens.
    """
    sums = layers.groupby(["sublayer", "layer"], sort=True).sum(numeric_only=True)
    rows = []
    for (sublayer, layer), s in sums.iterrows():
        for token in TOKENS:
            n = s[f"{token}_tokens"]
            if n == 0:
                continue
            rates = [s[f"{token}_{m}"] / n for m in METRICS]
            rows.append((sublayer, int(layer), token, *map(float, rates), int(n)))
    return pd.DataFrame(rows, columns=["sublayer", "layer", "token", "agreement", "agreement_random",
                                       "composition", "composition_random", "tokens"])


def per_image_rate(layers: pd.DataFrame, metric: str = "agree", token: str = "image") -> pd.DataFrame:
    """Per-image share of tokens with `metric`: a table indexed by image, one column per
    (sublayer, layer)."""
    rate = layers[f"{token}_{metric}"] / layers[f"{token}_tokens"].replace(0, np.nan)
    return layers.assign(rate=rate).pivot_table(index="index", columns=["sublayer", "layer"], values="rate")


def permutation_test(a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Two-sided permutation test of the difference of means mean(a) - mean(b).

    The group labels are shuffled `n_resamples` times (seeded) and
    p = (#{|shuffled difference| >= |observed|} + 1) / (n_resamples + 1); when there are at
    most `n_resamples` distinct splits, all of them are enumerated and p is exact.
    """
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    out = {"mean_a": float(a.mean()) if a.size else np.nan, "mean_b": float(b.mean()) if b.size else np.nan,
           "n_a": int(a.size), "n_b": int(b.size)}
    if a.size == 0 or b.size == 0:
        return {**out, "difference": np.nan, "p_value": np.nan}
    pooled, n = np.concatenate([a, b]), a.size + b.size
    observed = a.mean() - b.mean()
    exact = math.comb(n, a.size) <= n_resamples
    if exact:
        in_a = np.zeros((math.comb(n, a.size), n), dtype=bool)
        for row, split in enumerate(itertools.combinations(range(n), a.size)):
            in_a[row, list(split)] = True
    else:
        labels = np.arange(n) < a.size
        in_a = np.random.default_rng(seed).permuted(np.tile(labels, (n_resamples, 1)), axis=1)
    null = in_a @ pooled / a.size - ~in_a @ pooled / b.size
    # A small tolerance, so that splits equal to the observed one up to rounding count as extreme.
    extreme = int(np.sum(np.abs(null) >= abs(observed) * (1 - 1e-9) - 1e-12))
    p = extreme / len(null) if exact else (extreme + 1) / (n_resamples + 1)
    return {**out, "difference": float(observed), "p_value": float(p)}


def correct_vs_wrong(images: pd.DataFrame, layers: pd.DataFrame, metric: str = "agree", token: str = "cls",
                     n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per sublayer and layer: per-image `metric` rate of correctly vs wrongly classified
    images, with `permutation_test` (mean_a: correct, mean_b: wrong).

    token: "cls" (the default, the paper's comparison: Vilas et al. 2023, section 5, whose
    code reads token 0 only; the per-image rate is then 0 or 1) or "image" (share of the
    image tokens). Returns columns sublayer, layer, token, correct_mean, wrong_mean,
    n_correct, n_wrong, difference, p_value.
    """
    if token not in TOKENS:
        raise UserError(f"unknown token kind {token!r}; expected one of {TOKENS}")
    if int(layers[f"{token}_tokens"].sum()) == 0:
        raise UserError(f"this run has no {token} tokens (a model without a class token?); use token='image'")
    rates = per_image_rate(layers, metric, token)
    correct = images.set_index("index")["correct"].reindex(rates.index).to_numpy(bool)
    rows = []
    for column in rates.columns:
        values = rates[column].to_numpy()
        rows.append({"sublayer": column[0], "layer": int(column[1]), "token": token,
                     **permutation_test(values[correct], values[~correct], n_resamples, seed)})
    return pd.DataFrame(rows).rename(columns={"mean_a": "correct_mean", "mean_b": "wrong_mean",
                                              "n_a": "n_correct", "n_b": "n_wrong"})


def correct_vs_wrong_by_token(images: pd.DataFrame, layers: pd.DataFrame, metric: str = "agree",
                              n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """`correct_vs_wrong` for the class token (the paper's comparison; absent for models
    without one) and for the image tokens, one table with a `token` column, class token first."""
    tokens = [t for t in TOKENS if int(layers[f"{t}_tokens"].sum()) > 0]
    return pd.concat([correct_vs_wrong(images, layers, metric, t, n_resamples, seed) for t in tokens],
                     ignore_index=True)


def class_value_by_layer(class_value: pd.DataFrame) -> pd.DataFrame:
    """Mean over classes of the max cosine, per sublayer and layer."""
    return class_value.groupby(["sublayer", "layer"], as_index=False)["max_cosine"].mean()


def _paired_class_values(trained: pd.DataFrame, random: pd.DataFrame) -> pd.DataFrame:
    """The two `class_value_agreement` tables joined on (sublayer, layer, class)."""
    keys = ["sublayer", "layer", "class"]
    paired = trained[keys + ["max_cosine"]].merge(random[keys + ["max_cosine"]], on=keys, how="outer",
                                                  suffixes=("_trained", "_random"), indicator=True)
    if not (paired["_merge"] == "both").all() or len(paired) != len(trained) or len(paired) != len(random):
        raise UserError("class-value tables of the trained and random models do not pair up: run both with "
                         "the same architecture and sublayers")
    return paired.drop(columns="_merge")


def class_value_vs_random(trained: pd.DataFrame, random: pd.DataFrame) -> pd.DataFrame:
    """Per block (sublayer and layer), as the paper tests it (Vilas et al. 2023, section 5):
    one-sided Wilcoxon signed-rank test over classes that the max cosine of the trained
    model is larger than the random-weight model's (`pretrained_vs_random`, paired by class).

    trained, random: `class_value_agreement` tables (`MemoryResults.class_value`). Returns
    columns sublayer, layer, n_classes, pretrained_mean, random_mean, statistic, p_value.
    """
    rows = []
    for (sublayer, layer), block in _paired_class_values(trained, random).groupby(["sublayer", "layer"], sort=True):
        test = pretrained_vs_random(block["max_cosine_trained"].to_numpy(), block["max_cosine_random"].to_numpy())
        rows.append({"sublayer": sublayer, "layer": int(layer), "n_classes": len(block), **test})
    columns = ["sublayer", "layer", "n_classes", "pretrained_mean", "random_mean", "statistic", "p_value"]
    return pd.DataFrame(rows)[columns]


def class_value_vs_random_pooled(trained: pd.DataFrame, random: pd.DataFrame) -> pd.DataFrame:
    """Summary of `class_value_vs_random`: one Wilcoxon test over all (sublayer, layer,
    class) pairs; one row, columns n_pairs, pretrained_mean, random_mean, statistic, p_value."""
    paired = _paired_class_values(trained, random)
    test = pretrained_vs_random(paired["max_cosine_trained"].to_numpy(), paired["max_cosine_random"].to_numpy())
    return pd.DataFrame([{"n_pairs": len(paired), **test}])[
        ["n_pairs", "pretrained_mean", "random_mean", "statistic", "p_value"]]


def summarize_memories(res: MemoryResults, n_resamples: int = 1000) -> dict:
    """Every headline number of one run, as plain data (for the report and JSON).
    `correct_vs_wrong` holds both token kinds (`token` column; "cls" is the paper's)."""
    return {
        "n_images": len(res.images),
        "accuracy": float(res.images["correct"].mean()),
        "by_layer": agreement_by_layer(res.layers).to_dict("records"),
        "class_value": class_value_by_layer(res.class_value).to_dict("records"),
        "correct_vs_wrong": correct_vs_wrong_by_token(res.images, res.layers, n_resamples=n_resamples
                                                      ).to_dict("records"),
    }
