"""Linear probes per token position and site, side by side with the projection (Vilas et al. 2023, section 6).

One ridge-regression probe per (site, layer, token position): site = block output, attention
output or MLP output (`circuits.projection.SITES`), trained on a few images per class and
tested on held-out images, as in Vilas et al. (2023, section 6).

The probe (sklearn's `RidgeClassifier(alpha=1)` written out): targets are one-hot coded
+1 / -1, Y in {-1, 1}^{n x c}; the intercept is not penalised, which is the same as
centring X and Y on their training means:
    W = (Xc^T Xc + alpha I)^{-1} Xc^T Yc,    b = mean(Y) - mean(X) W,
and the predicted class is argmax(x W + b).

Training data is never stored: `RidgeAccumulator` sums X^T X, X^T Y, sum(X), sum(Y) and n
per (site, layer, position) inside the forward hooks, in float64, after subtracting a
per-probe shift (the first batch's mean) so the centring subtracts no large numbers. Memory
does not depend on the number of training images; per (site, layer) it is
positions * (d_model^2 + d_model * classes) * 8 bytes of statistics (float64 X^T X and X^T Y)
plus positions * d_model * classes * 4 bytes of probes (float32 W); `probe_memory_bytes`
is the whole peak. ViT-B/16 with 1000 classes: 197 tokens, d 768, 2.7 GB per site and layer,
104 GB for the default 3 sites x 12 layers (ViT-B/32: 26 GB), so `train_probes` refuses up front when the
estimate exceeds the available memory, and `layers=` / `sites=` restrict a run. The systems
are solved by Cholesky (`spd_solve`), the batched LU solve hangs under 2 threads in this torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from circuits.data import collate_samples
from circuits.projection import DEFAULT_SITES, SITES, count_above, project_batch
from hooked_vit import HookedViT
from hooked_vit.layers import layer_indices
from hooked_vit.errors import UserError


# ------------------------------------------------------------------ ridge regression
def signed_one_hot(labels: Int[Tensor, "n"], n_classes: int) -> Float[Tensor, "n c"]:
    """+1 at the label, -1 elsewhere (float64)."""
    y = -torch.ones(len(labels), n_classes, dtype=torch.float64, device=labels.device)
    return y.scatter_(1, labels[:, None].long(), 1.0)


def ridge_fit(X: Float[Tensor, "n d"], Y: Float[Tensor, "n c"], alpha: float = 1.0
              ) -> tuple[Float[Tensor, "d c"], Float[Tensor, "c"]]:
    """Ridge regression with an unpenalised intercept, from the features directly."""
    acc = RidgeAccumulator((), X.shape[-1], Y.shape[-1])
    acc.update(X, Y)
    return acc.solve(alpha)


def check_alpha(alpha: float) -> None:
    """The ridge penalty must be positive: with fewer images than features the scatter
    matrix is singular, and only alpha > 0 makes the system positive definite."""
    if not alpha > 0:
        raise UserError(f"ridge alpha must be > 0 (got {alpha}); sklearn's RidgeClassifier default is 1.0")


def spd_solve(S: Float[Tensor, "*g d d"], B: Float[Tensor, "*g d c"], alpha: float
              ) -> Float[Tensor, "*g d c"]:
    """(S + alpha I)^{-1} B for symmetric positive semi-definite S (a scatter matrix) and
    alpha > 0, by a Cholesky factorisation.

    Not `torch.linalg.solve`: its batched LU path (MKL `getrs` with `laswp`) fails with
    "Intel oneMKL ERROR: Parameter 6 was incorrect on entry to DLASWP" and hangs in the
    torch of this project after `torch.set_num_threads(2)`, at ViT-B size (a batch of
    768 x 768 systems with 1000 right-hand sides). S + alpha I is symmetric positive
    definite, so Cholesky (`torch.linalg.cholesky_ex`, `torch.cholesky_solve`) is the
    sound and cheaper factorisation (half the flops of LU, no pivoting); see
    https://pytorch.org/docs/stable/generated/torch.linalg.cholesky_ex.html.
    """
    check_alpha(alpha)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    L, info = torch.linalg.cholesky_ex(S + alpha * eye)
    if bool((info > 0).any()) or not bool(torch.isfinite(L).all()):
        raise UserError(f"ridge system not positive definite at alpha={alpha} (non-finite features, or "
                         "alpha too small against their scale); check the activations or raise alpha")
    return torch.cholesky_solve(B, L)


class RidgeAccumulator:
    """Sufficient statistics of independent ridge problems (one per group, e.g. per token
    position) that share their target rows; X [n, *groups, d], Y [n, c]."""

    def __init__(self, groups: tuple[int, ...], d: int, c: int, device: Any = "cpu"):
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.shift: Optional[Tensor] = None  # [*groups, d]
        self.sum_x = torch.zeros(*groups, d, **f64)
        self.sum_y = torch.zeros(c, **f64)
        self.xtx = torch.zeros(*groups, d, d, **f64)
        self.xty = torch.zeros(*groups, d, c, **f64)

    def update(self, X: Float[Tensor, "n *g d"], Y: Float[Tensor, "n c"]) -> None:
        X, Y = X.to(torch.float64), Y.to(torch.float64)
        if self.shift is None:
            self.shift = X.mean(0)
        X = X - self.shift
        self.n += X.shape[0]
        self.sum_x += X.sum(0)
        self.sum_y += Y.sum(0)
        self.xtx += torch.einsum("n...i,n...j->...ij", X, X)
        self.xty += torch.einsum("n...i,nc->...ic", X, Y)

    def solve(self, alpha: float = 1.0) -> tuple[Float[Tensor, "*g d c"], Float[Tensor, "*g c"]]:
        """W [*groups, d, c] and intercept b [*groups, c] on the original (unshifted) features."""
        if self.n == 0:
            raise UserError("no training data")
        mean_x, mean_y = self.sum_x / self.n, self.sum_y / self.n
        sxx = self.xtx - self.n * mean_x[..., :, None] * mean_x[..., None, :]
        sxy = self.xty - self.n * mean_x[..., :, None] * mean_y
        W = spd_solve(sxx, sxy, alpha)
        b = mean_y - torch.einsum("...d,...dc->...c", mean_x + self.shift, W)
        return W, b


# ------------------------------------------------------------------ memory
def probe_memory_bytes(n_sites: int, n_layers: int, positions: int, d_model: int, n_classes: int) -> int:
    """Peak bytes of `train_probes`: the float64 statistics X^T X [P, d, d] and X^T Y [P, d, c]
    of every (site, layer), the float32 probes W [S, L, P, d, c], and one (site, layer)'s
    float64 solve temporaries (S + alpha I, its Cholesky factor, the centred scatter [P, d, d];
    the centred X^T Y and W [P, d, c]). Model and batch activations are not counted."""
    groups, dd, dc = n_sites * n_layers, d_model * d_model, d_model * n_classes
    return positions * (groups * (dd + dc) * 8 + groups * dc * 4 + (3 * dd + 2 * dc) * 8)


def available_memory_bytes(device: Any = "cpu") -> int:
    """Free memory where the statistics live: CUDA free memory, else the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # Linux without psutil
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024


def check_probe_memory(n_sites: int, n_layers: int, positions: int, d_model: int, n_classes: int,
                       device: Any = "cpu") -> int:
    """Refuse (one line, before any forward pass) when the probes would not fit in memory."""
    need = probe_memory_bytes(n_sites, n_layers, positions, d_model, n_classes)
    free = available_memory_bytes(device)
    if need > free:
        per = positions * (8 * d_model * d_model + 12 * d_model * n_classes)  # one more site or layer
        raise UserError(
            f"linear probes need about {need / 1e9:.1f} GB ({n_sites} sites x {n_layers} layers x {positions} "
            f"positions x d_model {d_model} x {n_classes} classes, float64 statistics), more than the "
            f"{free / 1e9:.1f} GB available; restrict the run with --layers / --sites (layers= / sites=), "
            f"about {per / 1e9:.2f} GB per site and layer")
    return need


# ------------------------------------------------------------------ probes on a model
@dataclass
class LinearProbes:
    """Trained probes. S = sites, L = layers (`layers`), P = token positions."""

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    W: Float[Tensor, "S L P d c"]
    b: Float[Tensor, "S L P c"]
    alpha: float
    n_train: int

    def scores(self, site: str, layer: int, X: Float[Tensor, "b P d"]) -> Float[Tensor, "b P c"]:
        """Class scores of every token of one site and layer."""
        s, l = self.sites.index(site), self.layers.index(layer)
        W, b = self.W[s, l].to(X), self.b[s, l].to(X)
        return torch.einsum("bpd,pdc->bpc", X, W) + b


def _hook_names(model: HookedViT, sites: Sequence[str], layers: Sequence[int]) -> dict[str, tuple[str, int]]:
    """hook name -> (site, layer)."""
    names = {f"blocks.{l}.{SITES.get(s, s)}": (s, l) for s in sites for l in layers}
    for name in names:
        model.check_hook_name(name)
    return names


def batch_labels(batch: dict) -> Tensor:
    labels = torch.as_tensor(batch["label"])
    if bool((labels < 0).any()):
        raise UserError("linear probes need labelled images (label >= 0)")
    return labels


@torch.inference_mode()
def train_probes(
    model: HookedViT,
    dataset: Dataset,
    *,
    sites: Sequence[str] = DEFAULT_SITES,
    layers: Optional[Sequence[int]] = None,
    alpha: float = 1.0,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> LinearProbes:
    """Fit one ridge probe per (site, layer, token position) on every image of `dataset`
    (use `per_class_indices` + `Subset` for a few images per class); one forward per batch."""
    check_alpha(alpha)  # before the forward passes, not after them
    cfg = model.cfg
    layers = tuple(layer_indices(layers, cfg.n_layers, "layers"))
    names = _hook_names(model, sites, layers)
    check_probe_memory(len(sites), len(layers), cfg.n_ctx, cfg.d_model, cfg.n_classes, model.device)
    accumulators: dict[tuple[str, int], RidgeAccumulator] = {}
    n_train = 0
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples)
    for batch in tqdm(loader, desc="train probes", unit="batch", disable=not progress):
        if batch is None:
            continue
        Y = signed_one_hot(batch_labels(batch).to(model.device), cfg.n_classes)

        def hook(act: Tensor, hook) -> None:
            key = names[hook.name]
            if key not in accumulators:
                accumulators[key] = RidgeAccumulator((act.shape[1],), act.shape[2], cfg.n_classes, act.device)
            accumulators[key].update(act, Y)

        images = model.to_input(batch["image"])
        model.run_with_hooks(images, fwd_hooks=[(n, hook) for n in names], return_type=None)
        n_train += len(images)
    W, b = _solve_all(accumulators, sites, layers, alpha)
    return LinearProbes(tuple(sites), layers, W, b, alpha, n_train)


def _solve_all(accumulators: dict[tuple[str, int], RidgeAccumulator], sites: Sequence[str],
               layers: Sequence[int], alpha: float) -> tuple[Float[Tensor, "S L P d c"], Float[Tensor, "S L P c"]]:
    """Solve one (site, layer) at a time into preallocated float32 probes, freeing its
    statistics as it goes (the peak `probe_memory_bytes` counts)."""
    if not accumulators:
        raise UserError("no training data")
    first = next(iter(accumulators.values()))
    (P, d), c, device = first.sum_x.shape, first.sum_y.shape[0], first.sum_x.device
    W = torch.empty(len(sites), len(layers), P, d, c, dtype=torch.float32, device=device)
    b = torch.empty(len(sites), len(layers), P, c, dtype=torch.float32, device=device)
    for i, site in enumerate(sites):
        for j, layer in enumerate(layers):
            w, bias = accumulators.pop((site, layer)).solve(alpha)
            W[i, j], b[i, j] = w, bias
            del w, bias
    return W, b


@dataclass
class ProbeBatch:
    """Ranks of the target class per token: probe and projection at the same sites."""

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    probe_rank: Int[Tensor, "b S L P"]
    projection_rank: Int[Tensor, "b S L P"]
    logits: Float[Tensor, "b c"]
    targets: Int[Tensor, "b"]


@torch.inference_mode()
def probe_batch(model: HookedViT, probes: LinearProbes, images: Float[Tensor, "b c h w"],
                targets: Int[Tensor, "b"]) -> ProbeBatch:
    """Probe and projection ranks of the target class for every token, in one forward."""
    names = _hook_names(model, probes.sites, probes.layers)
    targets = targets.to(model.device)
    ranks: dict[tuple[str, int], Tensor] = {}

    def hook(act: Tensor, hook) -> None:
        site, layer = names[hook.name]
        scores = probes.scores(site, layer, act)
        target_score = scores.gather(-1, targets[:, None, None].expand(-1, act.shape[1], 1))[..., 0]
        ranks[site, layer] = count_above(scores, target_score)

    proj = project_batch(model, images, targets, sites=probes.sites, k=1,
                         fwd_hooks=[(n, hook) for n in names])
    probe_rank = torch.stack([torch.stack([ranks[s, l] for l in probes.layers], 1) for s in probes.sites], 1)
    projection_rank = proj.rank[:, :, list(probes.layers)]
    return ProbeBatch(probes.sites, probes.layers, probe_rank, projection_rank, proj.logits, targets)


# ------------------------------------------------------------------ data
def dataset_labels(dataset: Dataset, decode: bool = True) -> Optional[np.ndarray]:
    """Labels of every item, without decoding images where the dataset allows it; with
    decode=False, None where it does not."""
    from circuits.data import ImageFolderDataset, ImageNetS
    from circuits.data.video import VideoFolderDataset

    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset, decode)
        return None if inner is None else inner[list(dataset.indices)]
    if hasattr(dataset, "meta"):  # SyntheticShapes: (label, background) without rendering
        return np.array([dataset.meta(i)[0] for i in range(len(dataset))], dtype=np.int64)
    if isinstance(dataset, ImageNetS):
        return np.array([s[2] for s in dataset.samples], dtype=np.int64)
    if isinstance(dataset, (ImageFolderDataset, VideoFolderDataset)):  # (path, label) per file or clip
        return np.array([s[1] for s in dataset.samples], dtype=np.int64)
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr), dtype=np.int64)
    if not decode:
        return None
    return np.array([item["label"] if item is not None else -1 for item in dataset], dtype=np.int64)


def per_class_indices(labels: np.ndarray, per_class: int) -> list[int]:
    """The first `per_class` indices of every class (deterministic; fewer where a class has
    fewer items)."""
    labels = np.asarray(labels)
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels[labels >= 0])]
    return sorted(int(i) for i in np.concatenate(chosen)) if chosen else []


# ------------------------------------------------------------------ whole dataset
@dataclass
class ProbeResults:
    settings: dict
    images: pd.DataFrame
    probe_rank: np.ndarray  # [N, S, L, P]
    projection_rank: np.ndarray  # [N, S, L, P]

    @property
    def sites(self) -> list[str]:
        return self.settings["sites"]

    @property
    def layers(self) -> list[int]:
        return self.settings["layers"]


def accuracy_by_layer(res: ProbeResults) -> pd.DataFrame:
    """Top-1 accuracy (rank 0), mean rank and identifiability (1 - rank / n_classes) of the
    probe and the projection, per site, layer and token kind (cls = position 0 of
    class-token models; image = positions after the prefix tokens)."""
    s, c = res.settings, res.settings["n_classes"]
    kinds = ([("cls", slice(0, 1))] if s["class_token"] else []) + [("image", slice(s["n_prefix_tokens"], None))]
    rows = []
    for i, site in enumerate(res.sites):
        for j, layer in enumerate(res.layers):
            for token, sl in kinds:
                row = {"site": site, "layer": layer, "token": token}
                for name, rank in (("probe", res.probe_rank), ("projection", res.projection_rank)):
                    r = rank[:, i, j, sl]
                    row |= {f"{name}_accuracy": float((r == 0).mean()), f"{name}_rank": float(r.mean()),
                            f"{name}_identifiability": float(1 - r.mean() / c)}
                rows.append(row)
    return pd.DataFrame(rows)


def summarize_probes(res: ProbeResults) -> dict:
    return {"n_images": len(res.images), "accuracy": float(res.images["correct"].mean()),
            "by_layer": accuracy_by_layer(res).to_dict("records")}
