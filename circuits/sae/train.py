"""Training a sparse dictionary on a stream of activation batches.

Care taken (Bricken et al. 2023; Gao et al. 2024; Conerly et al. 2024, "Update on how we
train our SAEs", transformer-circuits.pub/2024/april-update): b_dec initialised at the
geometric median of a sample (Weiszfeld iterations), unit-norm decoder rows with the
parallel gradient component removed, linear learning-rate warm-up then linear decay to 0,
dead features counted over a window of tokens and revived by AuxK (top-k variants) or by
resampling onto badly reconstructed inputs (ReLU, JumpReLU), checkpoints in SAELens format,
and a progress bar showing loss, L0 and dead features.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from circuits.sae.dictionaries import SparseDictionary, dictionary_losses
from hooked_vit.errors import UserError

Batches = Callable[[int], Iterable[dict[str, torch.Tensor]]]  # epoch -> batches {hook: [n, d]}


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    warmup_steps: int = 100
    l1_coeff: float = 1e-3  # relu: L1 weight; jumprelu: L0 weight
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 50_000  # a feature silent for this many rows counts as dead
    resample_every: int = 500  # relu / jumprelu: resample dead features this often (0: never)
    checkpoint_every: int = 0  # 0: only at the end
    init_b_dec: str = "geometric_median"  # geometric_median | mean | zeros
    seed: int = 0
    device: str = "cpu"


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distances to the rows of x."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * y.norm().clamp_min(1):
            return y_new
        y = y_new
    return y


def _endless(batches: Batches) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        empty = True
        for b in batches(epoch):
            empty = False
            yield b
        if empty:
            raise UserError("the activation source yielded no batch; use a smaller batch size or more data")
        epoch += 1


def _io(sae: SparseDictionary, batch: dict[str, torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = sae.cfg
    for hook in filter(None, (cfg.hook_name, cfg.hook_out)):
        if hook not in batch:
            raise UserError(f"the activation batches hold {sorted(batch)}, not {hook} that the dictionary needs")
    x = batch[cfg.hook_name].to(device)
    return x, (batch[cfg.hook_out].to(device) if cfg.is_transcoder else x)


def train_dictionary(sae: SparseDictionary, batches: Batches, cfg: TrainConfig, out: Optional[str | Path] = None,
                     progress: bool = True) -> list[dict]:
    """Train `sae` in place; returns the per-step log (loss, mse, L0, dead, lr, rows/s).

    `batches(epoch)` yields {hook: [n, d]} dicts (an ActivationStore's `batches` or
    `stream_activations`); the dictionary's hook_name (and hook_out) must be among the keys.
    With `out`, checkpoints go to out/checkpoints/step-N and the final dictionary to out/.
    """
    from circuits.sae.formats import save_saelens

    torch.manual_seed(cfg.seed)
    sae.to(cfg.device).train()
    stream = _endless(batches)
    first = next(stream)
    x0, y0 = _io(sae, first, cfg.device)
    _init_b_dec(sae, y0, cfg.init_b_dec)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(cfg.warmup_steps, 1),
                                                                 max(0.0, (cfg.steps - s) / max(cfg.steps - cfg.warmup_steps, 1))))
    since_fired = torch.zeros(sae.cfg.d_sae, device=cfg.device)
    log: list[dict] = []
    bar = tqdm(range(cfg.steps), desc=f"train {sae.cfg.architecture} on {sae.cfg.hook_name}", disable=not progress)
    batch, t0 = first, time.perf_counter()
    for step in bar:
        x, y = _io(sae, batch, cfg.device)
        dead = since_fired >= cfg.dead_after_tokens
        losses = dictionary_losses(sae, x, y, dead, cfg.l1_coeff, cfg.aux_coeff)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        sae.remove_parallel_grad_()
        opt.step()
        sched.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            fired = (losses["acts"] > 0).any(0)
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + len(x))
            l0 = float((losses["acts"] > 0).float().sum(-1).mean())
        if cfg.resample_every and sae.cfg.architecture in ("relu", "jumprelu") and (step + 1) % cfg.resample_every == 0:
            _resample_dead(sae, x, y, dead, opt)
        rec = {"step": step + 1, "loss": losses["loss"].item(), "mse": losses["mse"].item(), "l0": l0,
               "dead": int(dead.sum()), "lr": sched.get_last_lr()[0],
               "rows_per_s": (step + 1) * len(x) / (time.perf_counter() - t0)}
        log.append(rec)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{rec['loss']:.4g}", L0=f"{l0:.1f}", dead=rec["dead"])
        if out is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_saelens(sae, Path(out) / "checkpoints" / f"step-{step + 1}")
        batch = next(stream)
    sae.eval()
    if out is not None:
        save_saelens(sae, out)
        from circuits.files import atomic_write_text

        atomic_write_text(Path(out) / "training_log.json", json.dumps({"config": asdict(cfg), "log": log}))
    return log


@torch.no_grad()
def _init_b_dec(sae: SparseDictionary, y: torch.Tensor, how: str) -> None:
    if how == "geometric_median":
        sae.b_dec.copy_(geometric_median(y.float()))
    elif how == "mean":
        sae.b_dec.copy_(y.float().mean(0))
    elif how != "zeros":
        raise UserError(f"init_b_dec must be geometric_median, mean or zeros, got {how!r}")


@torch.no_grad()
def _resample_dead(sae: SparseDictionary, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor,
                   opt: torch.optim.Optimizer) -> None:
    """Point dead features at inputs the dictionary reconstructs worst (Bricken et al. 2023,
    simplified: decoder row = normalised residual, encoder = a fifth of average alive norm)."""
    idx = dead.nonzero().flatten()
    if not len(idx):
        return
    err = (y - sae(x)).pow(2).sum(-1)
    pick = torch.multinomial(err / err.sum(), len(idx), replacement=len(idx) > len(x))
    target = y[pick] - sae(x[pick])
    target = target / target.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sae.W_dec[idx] = target
    alive = ~dead
    scale = sae.W_enc[:, alive].norm(dim=0).mean() * 0.2 if alive.any() else 1.0
    sae.W_enc[:, idx] = (target.T if not sae.cfg.is_transcoder else torch.randn_like(sae.W_enc[:, idx])) * scale
    sae.b_enc[idx] = 0
    for p in (sae.W_enc, sae.b_enc, sae.W_dec):  # fresh Adam moments for the new features
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                sl = state[key]
                if p is sae.W_enc:
                    sl[:, idx] = 0
                else:
                    sl[idx] = 0
