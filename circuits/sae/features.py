"""Feature studies over a dataset, in constant memory: per feature the top-activating images
and tokens, a histogram of its activations, its decoder direction through the logit lens,
and its correlation with ground-truth image attributes (the embedded dataset's shape class
``label`` and ``background``, or any per-image scalar a dataset provides).

Correlation: the point-biserial correlation between a feature's per-image maximum
activation and the indicator "attribute == value", accumulated from running sums. A
ground-truth value counts as *identified* by the feature with the largest correlation when
that correlation is at least `identified_at` (default 0.5).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from circuits.arrays import to_numpy
from circuits.sae.activations import image_batches, stop_kwargs, token_activations, token_positions
from circuits.sae.dictionaries import SparseDictionary
from hooked_vit.errors import UserError
from hooked_vit.tokens import token_coords, token_frames, token_labels

HIST_EDGES = np.concatenate([[0.0], np.logspace(-3, 3, 37)])  # fixed bins: no first pass needed


class _TopK:
    """Running top-k (value, image, token) per feature."""

    def __init__(self, d: int, k: int, device):
        self.values = torch.full((d, k), -float("inf"), device=device)
        self.image = torch.full((d, k), -1, dtype=torch.long, device=device)
        self.token = torch.full((d, k), -1, dtype=torch.long, device=device)

    def add(self, acts: torch.Tensor, image: torch.Tensor, token: torch.Tensor) -> None:
        """acts [b, p, d] of images `image` [b] at token positions `token` [p]; one entry per image."""
        k = self.values.shape[1]
        per_image, arg = acts.max(1)  # [b, d]: each image's most active token per feature
        vals = torch.cat([self.values, per_image.T], 1)
        imgs = torch.cat([self.image, image[None].expand(vals.shape[0], -1)], 1)
        toks = torch.cat([self.token, token[arg].T], 1)
        top, idx = vals.topk(k, dim=1)
        self.values, self.image, self.token = top, imgs.gather(1, idx), toks.gather(1, idx)


@torch.no_grad()
def study_features(model, sae: SparseDictionary, dataset: Dataset, *, batch_size: int = 64, num_workers: int = 0,
                   limit: Optional[int] = None, top_k: int = 8, attributes: Sequence[str] = ("label", "background"),
                   identified_at: float = 0.5) -> dict:
    """Statistics of every feature of `sae` over `dataset` (see the module docstring)."""
    cfg, device = sae.cfg, next(model.parameters()).device
    loader = image_batches(dataset, limit=limit, batch_size=batch_size, num_workers=num_workers)
    positions = token_positions(model, cfg.tokens).to(device)
    sae = sae.to(device).eval()
    top = _TopK(cfg.d_sae, top_k, device)
    hist = torch.zeros(cfg.d_sae, len(HIST_EDGES), dtype=torch.long)
    edges = torch.tensor(HIST_EDGES[1:], dtype=torch.float32, device=device)
    s1 = torch.zeros(cfg.d_sae, dtype=torch.float64, device=device)
    s2 = torch.zeros_like(s1)
    by_value: dict[str, dict[int, list]] = {a: {} for a in attributes}  # value -> [count, sum of acts]
    n_images, fired = 0, torch.zeros(cfg.d_sae, device=device)
    lens = feature_logit_lens(model, sae)  # before the pass: a model it does not apply to fails fast
    stop = stop_kwargs(model, [cfg.hook_name])
    for data in loader:
        if data is None:
            continue
        images = model.to_input(data["image"])
        b = images.shape[0]
        _, cache = model.run_with_cache(images, names_filter=[cfg.hook_name], **stop)
        acts = sae.encode(token_activations(model, cfg.hook_name, cache[cfg.hook_name], positions))  # [b, p, d_sae]
        flat = acts.reshape(-1, cfg.d_sae)
        top.add(acts, data["index"].to(device), positions)
        nz = flat > 0
        fired += nz.float().sum(0)
        bins = torch.bucketize(flat, edges)  # 0: exactly zero
        hist += torch.zeros(cfg.d_sae, len(HIST_EDGES), dtype=torch.long, device=device).scatter_add_(
            1, bins.T, torch.ones_like(bins.T)).cpu()
        img_max = acts.amax(1).double()  # [b, d_sae]
        s1 += img_max.sum(0)
        s2 += img_max.pow(2).sum(0)
        n_images += b
        for attr in attributes:
            if attr not in data:
                continue
            for v in data[attr].unique().tolist():
                sel = (data[attr] == v).to(device)
                entry = by_value[attr].setdefault(int(v), [0, torch.zeros_like(s1)])
                entry[0] += int(sel.sum())
                entry[1] += img_max[sel].sum(0)
    if n_images == 0:
        raise UserError("no readable images to study")
    correlations = {attr: {v: to_numpy(_point_biserial(s1, s2, n_images, c, s))
                           for v, (c, s) in sorted(vals.items())} for attr, vals in by_value.items() if vals}
    identified = {attr: _identified(corr, top.image.cpu(), dataset, attr, identified_at)
                  for attr, corr in correlations.items()}
    return {"hook_name": cfg.hook_name, "n_images": n_images, "n_tokens": n_images * len(positions),
            "frequency": to_numpy(fired / (n_images * len(positions))),
            "top_values": to_numpy(top.values), "top_images": top.image.cpu().numpy(),
            "top_tokens": top.token.cpu().numpy(), "top_token_labels": _token_names(model, top.token.cpu()),
            "histogram": hist.numpy(), "hist_edges": HIST_EDGES,
            "logit_lens": lens, "correlations": correlations, "identified": identified,
            "identified_at": identified_at}


def _token_names(model, tokens: torch.Tensor) -> np.ndarray:
    """The name of every top token ("t3 patch (2, 5)" on video models; "" where none)."""
    names = token_labels(model)
    return np.array([[names[t] if t >= 0 else "" for t in row] for row in tokens.tolist()], dtype=object)


def _point_biserial(s1, s2, n, count, sum_in):
    """corr(a, 1[attr == v]) from sum a, sum a^2, n, #(attr == v), sum of a where attr == v."""
    p = count / n
    mean, std = s1 / n, (s2 / n - (s1 / n) ** 2).clamp_min(0).sqrt()
    if p in (0.0, 1.0):
        return torch.zeros_like(s1)
    mean_in = sum_in / count
    return torch.where(std > 0, (mean_in - mean) / std.clamp_min(1e-12) * np.sqrt(p / (1 - p)), 0.0)


def _identified(corr: dict, top_images: torch.Tensor, dataset, attr: str, at: float) -> list[dict]:
    """Per attribute value, the most correlated feature and the share of its top images with that value."""
    rows = []
    for v, c in corr.items():
        f = int(np.argmax(c))
        imgs = [int(i) for i in top_images[f] if i >= 0]
        meta = getattr(dataset, "meta", None)
        share = None
        if callable(meta) and attr in ("label", "background"):
            share = float(np.mean([meta(i)[0 if attr == "label" else 1] == v for i in imgs])) if imgs else 0.0
        rows.append({"attribute": attr, "value": v, "feature": f, "correlation": float(c[f]),
                     "top_image_share": share, "identified": bool(c[f] >= at)})
    return rows


@torch.no_grad()
def feature_logit_lens(model, sae: SparseDictionary, top: int = 5) -> Optional[dict]:
    """Each feature's decoder direction through the final norm and head: the classes it
    writes towards directly (direct effect of a unit-variance step along it; the norm's
    bias and the head's bias, the same for every direction, are subtracted)."""
    if sae.cfg.d_out != model.cfg.d_model or model.head is None or model.cfg.global_pool == "token_avg":
        # not in the residual space (e.g. MLP hidden units), no classes (a headless tower; CLIP
        # without text classes), or a head on [class token, mean patch token] that no single
        # residual vector has logits for: no direct path to the classes
        return None
    w = sae.W_dec.to(model.device, model.embed.proj.weight.dtype)  # in the model's own dtype
    logits = (model.to_class_logits(w) - model.to_class_logits(torch.zeros_like(w[:1]))).float()
    vals, idx = logits.topk(min(top, logits.shape[-1]), dim=-1)
    return {"classes": idx.cpu().numpy(), "logits": to_numpy(vals)}


def feature_thumbnails(model, dataset: Dataset, result: dict, features: Sequence[int], max_px: int = 96) -> dict:
    """PNG (base64) of each shown feature's top images (the model's normalisation undone),
    with the most active patch's box."""
    import base64
    import io

    from PIL import Image

    from circuits.plot import display_rgb

    patch_size, n_prefix = model.cfg.patch_size, model.cfg.n_prefix_tokens
    video = model.cfg.is_video
    coords, names = (token_coords(model), token_labels(model)) if video else (None, None)
    out = {}
    for f in features:
        items = []
        for img_i, tok, val in zip(result["top_images"][f], result["top_tokens"][f], result["top_values"][f]):
            if img_i < 0 or not np.isfinite(val):
                continue
            item = dataset[int(img_i)]["image"]
            if video:  # a clip [T, 3, H, W]: the first frame of the token's tubelet (the first frame for a prefix token)
                time = coords[int(tok)][0] if coords[int(tok)] is not None else 0
                item = item[token_frames(model, time)[0]]
            rgb = display_rgb(model, item[None])[0]  # [H, W, 3] uint8
            h, w = rgb.shape[:2]
            pil = Image.fromarray(rgb)
            scale = min(1.0, max_px / max(h, w)) if max(h, w) > max_px else max(1, max_px // max(h, w))
            pil = pil.resize((int(w * scale), int(h * scale)), Image.NEAREST)
            buf = io.BytesIO()
            pil.save(buf, format="PNG")
            box = None
            if tok >= n_prefix:  # a patch token: its box in the thumbnail's pixels
                gw = w // patch_size[1]
                r, c = divmod(int(tok) - n_prefix, gw) if not video else coords[int(tok)][1:]
                box = [c * patch_size[1] * scale, r * patch_size[0] * scale, patch_size[1] * scale, patch_size[0] * scale]
            items.append({"image": int(img_i), "token": int(tok), "value": float(val), "box": box,
                          "png": base64.b64encode(buf.getvalue()).decode(),
                          **({"token_label": names[int(tok)]} if video else {})})
        out[int(f)] = items
    return out


def summary_for_report(model, dataset: Dataset, result: dict, n_extra: int = 8, class_names=None) -> dict:
    """JSON-ready summary: identified features (with thumbnails, histogram, logit lens) and metrics."""
    shown = list(dict.fromkeys([r["feature"] for rows in result["identified"].values() for r in rows]
                               + list(np.argsort(-result["frequency"])[:n_extra])))
    thumbs = feature_thumbnails(model, dataset, result, shown)
    lens = result["logit_lens"]
    names = list(class_names) if class_names is not None else None
    feats = {}
    for f in shown:
        entry = {"frequency": float(result["frequency"][f]), "histogram": result["histogram"][f].tolist(),
                 "top": thumbs[int(f)]}
        if lens is not None:
            entry["logit_lens"] = [{"class": names[c] if names else int(c), "logit": float(v)}
                                   for c, v in zip(lens["classes"][f], lens["logits"][f])]
        feats[int(f)] = entry
    return {"hook_name": result["hook_name"], "n_images": result["n_images"], "identified": result["identified"],
            "identified_at": result["identified_at"], "hist_edges": result["hist_edges"].tolist(), "features": feats,
            "class_names": names}
