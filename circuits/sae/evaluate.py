"""How good a dictionary is, on held-out images: reconstruction and what splicing costs.

* explained variance: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the kept tokens;
* L0: mean number of active features per token; dead: never active on the images; dense:
  active on more than `dense_threshold` of the tokens;
* accuracy and cross-entropy of the model, clean, spliced with the reconstruction only, and
  spliced with the error term added back (which must equal clean), as in Bricken et al. 2023
  and Gao et al. 2024 ("downstream loss"). Images without a label (-1) are scored against
  the clean model's prediction instead; `unlabeled_images` counts them.
"""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm
import torch.nn.functional as F
from torch.utils.data import Dataset

from circuits.sae.activations import image_batches, token_activations, token_positions
from circuits.sae.dictionaries import SparseDictionary
from circuits.sae.splice import spliced
from hooked_vit.errors import UserError


class _Sums:
    def __init__(self):
        self.loss, self.correct, self.n = 0.0, 0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.n += len(labels)

    def result(self) -> tuple[float, float]:
        return self.correct / max(self.n, 1), self.loss / max(self.n, 1)


@torch.no_grad()
def evaluate_dictionary(model, sae: SparseDictionary, dataset: Dataset, *, batch_size: int = 64, num_workers: int = 0,
                        limit: Optional[int] = None, dense_threshold: float = 0.1, progress: bool = True) -> dict:
    """Reconstruction and downstream metrics of `sae` spliced into `model`, over `dataset`."""
    cfg, device = sae.cfg, next(model.parameters()).device
    loader = image_batches(dataset, limit=limit, batch_size=batch_size, num_workers=num_workers)
    positions = token_positions(model, cfg.tokens).to(device)
    sae = sae.to(device).eval()
    sse = sum_x = sum_x2 = 0.0
    rows, l0_sum = 0, 0.0
    fired = torch.zeros(cfg.d_sae, device=device)
    runs = {k: _Sums() for k in ("clean", "spliced", "spliced_with_error")}
    max_error_delta, unlabeled = 0.0, 0
    target_hook = cfg.hook_out if cfg.is_transcoder else cfg.hook_name
    for data in tqdm(loader, desc="sae eval: clean and spliced runs", unit="batch", disable=not progress):
        if data is None:
            continue
        images, labels = model.to_input(data["image"]), data["label"].to(device)
        logits, cache = model.run_with_cache(images, names_filter=list(filter(None, (cfg.hook_name, cfg.hook_out))))
        x = token_activations(model, cfg.hook_name, cache[cfg.hook_name], positions).reshape(-1, cfg.d_in)
        y = token_activations(model, target_hook, cache[target_hook], positions).reshape(-1, cfg.d_out)
        acts = sae.encode(x)
        err = y - sae.decode(acts)
        sse += float(err.pow(2).sum())
        sum_x += y.sum(0)
        sum_x2 += float(y.pow(2).sum())
        rows += len(y)
        active = acts > 0
        l0_sum += float(active.sum())
        fired += active.float().sum(0)
        unlabeled += int((labels < 0).sum())
        labels = torch.where(labels < 0, logits.argmax(-1), labels)  # no label: the clean prediction
        runs["clean"].add(logits, labels)
        with spliced(model, sae, use_error=False) as module:
            runs["spliced"].add(model(images), labels)
            module.use_error_term = True
            with_error = model(images)
        runs["spliced_with_error"].add(with_error, labels)
        max_error_delta = max(max_error_delta, float((with_error - logits).abs().max()))
    if rows == 0:
        raise UserError("no readable images to evaluate on")
    total_ss = sum_x2 - float((sum_x * sum_x).sum()) / rows
    freq = fired / rows
    out = {"hook_name": cfg.hook_name, "hook_out": cfg.hook_out, "architecture": cfg.architecture,
           "d_sae": cfg.d_sae, "images": runs["clean"].n, "tokens": rows,
           "explained_variance": 1 - sse / max(total_ss, 1e-12), "mse_per_token": sse / rows,
           "l0": l0_sum / rows, "dead_features": int((fired == 0).sum()),
           "dense_features": int((freq > dense_threshold).sum()), "dense_threshold": dense_threshold,
           "max_logit_change_with_error": max_error_delta, "unlabeled_images": unlabeled}
    for key, sums in runs.items():
        out[f"accuracy_{key}"], out[f"ce_{key}"] = sums.result()
    out["ce_increase_spliced"] = out["ce_spliced"] - out["ce_clean"]
    return out
