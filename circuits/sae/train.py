"""Training a sparse dictionary on a stream of activation batches, in one process or data-parallel.

Care taken (Bricken et al. 2023; Gao et al. 2024, arXiv:2406.04093; Rajamanoharan et al. 2024,
arXiv:2407.14435; Conerly et al. 2024, "Update on how we train our SAEs",
transformer-circuits.pub/2024/april-update), checked against SAELens 6's trainer
(docs/sparse_autoencoders.md, "Training"):

* decoder rows of unit norm, encoder = decoder transpose (``SparseDictionary.__init__``), b_dec at
  the geometric median of the first batch (Weiszfeld), parallel decoder-gradient removal;
* Adam, linear learning-rate warm-up then linear decay to 0, global gradient-norm clipping;
* the losses (``training_losses``): MSE summed over output dims and averaged over rows;
  ReLU: L1 of ``acts * ||W_dec||``; JumpReLU: L0 through the step function's straight-through
  estimator (or SAELens's ``tanh`` surrogate) plus an optional pre-activation loss on dead
  features; TopK / BatchTopK: AuxK, ``aux_coeff * min(n_dead / k_aux, 1) * ||e - e_hat||^2``
  on the same scale as the MSE term (Gao et al. sec. A.2; SAELens ``calculate_topk_aux_loss``);
* sparsity coefficients warmed up linearly from 0 (``sparsity_warmup_steps``); the default
  coefficient per architecture is scale-free: multiplied by the first batch's RMS norm (L1) or
  its mean squared norm (L0), as if the activations were normalised;
* dead features counted over a window of rows, revived by AuxK (top-k variants) or by
  resampling onto badly reconstructed inputs (ReLU, JumpReLU);
* resumable: ``trainer_state.pt`` (dictionary, Adam moments, schedule, step, dead-feature
  counters, RNG, the log) written atomically with every checkpoint and read back with
  ``weights_only=True``; the per-step log as a table (``training_log.parquet``, pandas loads it);
* under ``torchrun`` every rank reads the same global batch and trains on its slice; gradients
  and the fired-feature masks are all-reduced, so the result equals one process with the same
  seed and global batch (tests/test_sae_distributed.py).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol

import torch
import torch.distributed as tdist
from torch import Tensor
from tqdm.auto import tqdm

from circuits.sae.dictionaries import ARCHITECTURES, SparseDictionary, _JumpStep
from hooked_vit.errors import UserError

Batches = Callable[[int], Iterable[dict[str, torch.Tensor]]]  # epoch -> batches {hook: [n, d]}

# Default sparsity coefficient per architecture, before scaling by the data (see `sparsity_scale`):
# ReLU's L1 weight times the RMS norm of the centred inputs, JumpReLU's L0 weight times their mean
# squared norm. Measured on the embedded default (blocks.4.hook_resid_post, 512 features, 300 steps
# of 1,024 rows, docs/sparse_autoencoders.md "Training"): ReLU L0 39 (0.03: 78), JumpReLU L0 9.6
# (2e-3: 9.2; its L0 is set more by the threshold dynamics than by this weight, not tuned further).
DEFAULT_SPARSITY = {"relu": 0.1, "jumprelu": 7e-4}
STATE_FILE = "trainer_state.pt"


class Dist(Protocol):
    """The process' place in a data-parallel run (``circuits.runs.distributed.Dist`` is one)."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...


@dataclass(frozen=True)
class OneProcess:
    """No data parallelism: rank 0 of 1."""

    rank: int = 0
    world: int = 1
    is_main: bool = True

    def barrier(self) -> None:
        pass

LOG_TABLE = "training_log.parquet"

# Default learning rates per architecture. TopK / BatchTopK at 4e-3: on the SAELens benchmark
# (docs/benchmarks.md, "Sparse autoencoder training against SAELens") it beats SAELens's trainer at
# both 2e-3 and 4e-3 (explained variance 0.9808 vs 0.9771 / 0.9796, 6 vs 191 / 221 dead features), where
# 2e-3 left it 0.0017 below. ReLU / JumpReLU keep 2e-3, where their sparsity defaults were tuned.
DEFAULT_LR = {"topk": 4e-3, "batchtopk": 4e-3, "relu": 2e-3, "jumprelu": 2e-3}


def default_lr(architecture: str) -> float:
    """The default learning rate of `architecture` (DEFAULT_LR; 2e-3 for anything else)."""
    return DEFAULT_LR.get(architecture, 2e-3)


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    warmup_steps: int = 100
    decay_steps: Optional[int] = None  # linear decay to 0 over the last decay_steps (None: all after warm-up)
    grad_clip: float = 1.0  # global gradient-norm clip (SAELens and Gao et al. use 1); 0: off
    sparsity_coeff: Optional[float] = None  # relu: L1 weight; jumprelu: L0 weight; None: the scaled default
    sparsity_warmup_steps: Optional[int] = None  # linear warm-up of the sparsity weight (None: 5 % of steps)
    jumprelu_sparsity: str = "step"  # step (L0 through the STE) | tanh (SAELens's tanh surrogate)
    jumprelu_tanh_scale: float = 4.0
    pre_act_coeff: float = 0.0  # jumprelu: pull dead features' pre-activations up to the threshold
    jumprelu_init_fire_rate: Optional[float] = 0.1  # initial thresholds: each feature's (1 - rate) quantile
    aux_coeff: float = 1.0  # AuxK weight on the MSE's scale (SAELens; about Gao et al.'s 1/32 on normalised MSEs)
    dead_after_tokens: int = 50_000  # a feature silent for this many rows counts as dead
    resample_every: int = 500  # relu / jumprelu: resample dead features this often (0: never)
    checkpoint_every: int = 0  # 0: only at the end
    init_b_dec: str = "geometric_median"  # geometric_median | mean | zeros
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if self.jumprelu_sparsity not in ("step", "tanh"):
            raise UserError(f"jumprelu_sparsity must be step or tanh, got {self.jumprelu_sparsity!r}")
        if self.init_b_dec not in ("geometric_median", "mean", "zeros"):
            raise UserError(f"init_b_dec must be geometric_median, mean or zeros, got {self.init_b_dec!r}")
        if self.jumprelu_init_fire_rate is not None and not 0 < self.jumprelu_init_fire_rate < 1:
            raise UserError(f"jumprelu_init_fire_rate must be in (0, 1) or None, got {self.jumprelu_init_fire_rate}")
        if self.grad_clip < 0 or self.aux_coeff < 0 or self.pre_act_coeff < 0:
            raise UserError("grad_clip, aux_coeff and pre_act_coeff must be >= 0")


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


def training_losses(sae: SparseDictionary, x: Tensor, target: Tensor, dead: Optional[Tensor], cfg: TrainConfig,
                    sparsity_coeff: float) -> dict[str, Tensor]:
    """Losses of one batch x [n, d_in] -> target [n, d_out]: ``mse`` (summed over the output
    dims, averaged over rows), ``penalty`` (the architecture's sparsity or auxiliary loss, already
    weighted) and ``loss``; ``acts`` for the dead-feature counters."""
    z = sae.pre_acts(x)
    acts = sae.activate(z)
    recon = sae.decode(acts)
    if sae.cfg.skip:  # a skip transcoder's linear path (SAELens's SkipTranscoder)
        recon = recon + sae.skip_term(x)
    err = target - recon
    mse = err.pow(2).sum(-1).mean()
    arch = sae.cfg.architecture
    if arch == "relu":
        penalty = sparsity_coeff * (acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
    elif arch == "jumprelu":
        penalty = sparsity_coeff * _jumprelu_sparsity(sae, z, acts, cfg) + _pre_act_loss(sae, z, dead, cfg.pre_act_coeff)
    else:
        penalty = cfg.aux_coeff * auxk_loss(sae, z, err, dead)
    return {"mse": mse, "penalty": penalty, "loss": mse + penalty, "acts": acts}


def _jumprelu_sparsity(sae: SparseDictionary, z: Tensor, acts: Tensor, cfg: TrainConfig) -> Tensor:
    """Rajamanoharan et al. 2024 eq. 9-11: L0 = sum_i H(z_i - theta_i) with the rectangle-kernel
    pseudo-derivative wrt theta; or SAELens's ``tanh`` mode, sum_i tanh(c * f_i * ||W_dec,i||)."""
    if cfg.jumprelu_sparsity == "tanh":
        return torch.tanh(cfg.jumprelu_tanh_scale * acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
    return _JumpStep.apply(z, sae.threshold, sae.cfg.jumprelu_bandwidth).sum(-1).mean()


def _pre_act_loss(sae: SparseDictionary, z: Tensor, dead: Optional[Tensor], coeff: float) -> Tensor:
    """Conerly et al. 2025 / SAELens ``pre_act_loss``: relu(theta - z) * ||W_dec|| on dead features."""
    if not coeff or dead is None:
        return z.new_tensor(0.0)
    gap = torch.relu(sae.threshold - z) * dead * sae.W_dec.norm(dim=1)
    return coeff * gap.sum(-1).mean()


def auxk_loss(sae: SparseDictionary, z: Tensor, err: Tensor, dead: Optional[Tensor]) -> Tensor:
    """AuxK (Gao et al. 2024, sec. A.2): the top k_aux = d_in / 2 dead pre-activations reconstruct
    the main error, e_hat = z_aux @ W_dec; loss = min(n_dead / k_aux, 1) * ||e - e_hat||^2 (summed
    over dims, averaged over rows: the MSE's scale, not divided by ||e||^2). The scale factor is
    SAELens's (``calculate_topk_aux_loss``), which fades the term in while few features are dead."""
    if dead is None:
        return z.new_tensor(0.0)
    n_dead = int(dead.sum())
    if not n_dead:
        return z.new_tensor(0.0)
    k_aux = max(sae.cfg.d_in // 2, 1)
    scale = min(n_dead / k_aux, 1.0)
    # Only the dead columns take part: top-k over them and a product with their decoder rows
    # (n_dead is usually a small share of d_sae, so this costs a fraction of a full pass).
    cols = dead.nonzero().squeeze(-1)
    z_dead = z.index_select(-1, cols)
    values, idx = z_dead.topk(min(k_aux, n_dead), dim=-1, sorted=False)
    aux = z_dead.new_zeros(z_dead.shape).scatter_(-1, idx, values) @ sae.W_dec.index_select(0, cols)
    return scale * (err.detach() - aux).pow(2).sum(-1).mean()


def sparsity_scale(arch: str, y: Tensor) -> float:
    """What the default coefficient is multiplied by: the RMS norm of the centred rows (L1 scales
    with the activations) or their mean squared norm (L0 against an MSE scales with its square)."""
    msn = float((y.float() - y.float().mean(0)).pow(2).sum(-1).mean())
    return math.sqrt(msn) if arch == "relu" else msn


class _Stream:
    """The endless batch stream with its position (epoch, batches taken), so a resumed run
    skips exactly what was consumed."""

    def __init__(self, batches: Batches, epoch: int = 0, taken: int = 0):
        self.batches, self.epoch, self.taken = batches, epoch, 0
        self._it = iter(batches(epoch))
        for _ in range(taken):
            self.next()

    def next(self) -> dict[str, Tensor]:
        for attempt in range(2):
            try:
                batch = next(self._it)
                self.taken += 1
                return batch
            except StopIteration:
                if attempt or not self.taken:
                    raise UserError("the activation source yielded no batch; use a smaller batch size or "
                                     "more data") from None
                self.epoch, self.taken = self.epoch + 1, 0
                self._it = iter(self.batches(self.epoch))
        raise AssertionError("unreachable")


def _io(sae: SparseDictionary, batch: dict[str, torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = sae.cfg
    for hook in filter(None, (cfg.hook_name, cfg.hook_out)):
        if hook not in batch:
            raise UserError(f"the activation batches hold {sorted(batch)}, not {hook} that the dictionary needs")
    x = batch[cfg.hook_name].to(device)
    return x, (batch[cfg.hook_out].to(device) if cfg.is_transcoder else x)


def _local(t: Tensor, d: Dist) -> Tensor:
    """This rank's contiguous slice of a global batch."""
    if d.world == 1:
        return t
    if len(t) % d.world:
        raise UserError(f"the global batch ({len(t)} rows) must divide by the number of processes ({d.world})")
    n = len(t) // d.world
    return t[d.rank * n:(d.rank + 1) * n]


def _all_reduce_grads(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Average the gradients over the ranks in one flat buffer (what DDP's reducer does)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat /= d.world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm = max(cfg.warmup_steps, 1)
    decay = cfg.steps - cfg.warmup_steps if cfg.decay_steps is None else cfg.decay_steps
    decay = max(decay, 1)
    return lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / decay), 1.0)


def train_dictionary(sae: SparseDictionary, batches: Batches, cfg: TrainConfig, out: Optional[str | Path] = None,
                     progress: bool = True, resume: bool = True, dist: Optional[Dist] = None) -> list[dict]:
    """Train `sae` in place; returns the per-step log (loss, mse, penalty, L0, dead, lr,
    sparsity weight, grad norm, rows/s).

    `batches(epoch)` yields {hook: [n, d]} dicts (an ActivationStore's `batches` or
    `stream_activations`), deterministic per epoch; the dictionary's hook_name (and hook_out)
    must be among the keys. With `out`: checkpoints (SAELens format) in out/checkpoints/step-N
    and the trainer state in out/checkpoints/trainer_state.pt every `checkpoint_every` steps, the
    final dictionary and out/training_log.parquet at the end; with `resume`, a run finding a
    trainer state there continues from it (same config required) and ends as an uninterrupted run.
    With `dist` of world size > 1 (an initialised torch.distributed process group; the runs
    layer passes ``init_distributed()``) rank r trains on slice r of each global batch.
    """
    d = dist if dist is not None else OneProcess()
    if sae.cfg.architecture not in ARCHITECTURES:
        raise UserError(f"{sae.cfg.architecture} dictionaries are read and spliced, not trained here; "
                         f"train one of {ARCHITECTURES}")
    if sae.cfg.normalize_activations != "none":
        raise UserError(f"training with normalize_activations={sae.cfg.normalize_activations!r} is not supported; "
                         "train with none (the default)")
    if d.world > 1 and sae.cfg.architecture == "batchtopk":
        raise UserError("batchtopk does not train data-parallel yet (its top-k is over the whole global batch); "
                         "run one process, or use topk")
    torch.manual_seed(cfg.seed)
    sae.to(cfg.device).train()
    params = list(sae.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    state = _load_state(out, cfg) if (out is not None and resume) else None
    if state is None:
        stream = _Stream(batches)
        first = stream.next()
        _, y0 = _io(sae, first, cfg.device)
        _init_b_dec(sae, y0, cfg.init_b_dec)
        if sae.cfg.architecture == "jumprelu" and cfg.jumprelu_init_fire_rate is not None:
            _init_threshold(sae, _io(sae, first, cfg.device)[0], cfg.jumprelu_init_fire_rate)
        base = DEFAULT_SPARSITY.get(sae.cfg.architecture, 0.0) * sparsity_scale(sae.cfg.architecture, y0) \
            if cfg.sparsity_coeff is None else cfg.sparsity_coeff
        since_fired = torch.zeros(sae.cfg.d_sae, device=cfg.device)
        log: list[dict] = []
        start = 0
        stream = _Stream(batches)  # the first batch is also step 0's
    else:
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        since_fired = state["since_fired"].to(cfg.device)
        torch.set_rng_state(state["rng"])
        base, start, log = state["sparsity_coeff"], state["step"], state["log"]
        stream = _Stream(batches, state["epoch"], state["taken"])
    warm_sparsity = max(cfg.steps // 20, 1) if cfg.sparsity_warmup_steps is None else cfg.sparsity_warmup_steps
    bar = tqdm(range(start, cfg.steps), desc=f"train {sae.cfg.architecture} on {sae.cfg.hook_name}",
               disable=not progress or not d.is_main)
    t0, rows = time.perf_counter(), 0
    for step in bar:
        x, y = _io(sae, stream.next(), cfg.device)
        lx, ly = _local(x, d), _local(y, d)
        dead = since_fired >= cfg.dead_after_tokens
        coeff = base * min(1.0, (step + 1) / warm_sparsity) if warm_sparsity else base
        losses = training_losses(sae, lx, ly, dead, cfg, coeff)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if d.world > 1:
            _all_reduce_grads(params, d)
        sae.remove_parallel_grad_()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        opt.step()
        sched.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            acts = losses["acts"].detach()  # >= 0 in every architecture: the max tells which fired
            l0 = acts.sign().sum(dtype=torch.float32) / len(acts)  # sign: the cheapest count here
            stats = torch.stack([losses[k].detach().float() for k in ("loss", "mse", "penalty")] + [l0])
            fired = (acts.amax(0) > 0).float()
            if d.world > 1:
                tdist.all_reduce(fired, op=tdist.ReduceOp.MAX)
                tdist.all_reduce(stats)
                stats /= d.world
            since_fired = torch.where(fired > 0, torch.zeros_like(since_fired), since_fired + len(x))
        if cfg.resample_every and sae.cfg.architecture in ("relu", "jumprelu") and (step + 1) % cfg.resample_every == 0:
            _resample_dead(sae, x, y, dead, opt)  # on the global batch: the same on every rank
        rows += len(x)
        loss, mse, penalty, l0 = stats.tolist()
        rec = {"step": step + 1, "loss": loss, "mse": mse, "penalty": penalty, "l0": l0, "dead": int(dead.sum()),
               "lr": sched.get_last_lr()[0], "sparsity_coeff": coeff, "grad_norm": float(grad_norm),
               "rows_per_s": rows / (time.perf_counter() - t0)}
        log.append(rec)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4g}", L0=f"{l0:.1f}", dead=rec["dead"])
        if out is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _checkpoint(sae, opt, sched, since_fired, base, step + 1, stream, log, cfg, Path(out), d)
    sae.eval()
    if out is not None and d.is_main:
        _write_outputs(sae, log, cfg, Path(out))
    d.barrier()
    return log


def _write_outputs(sae: SparseDictionary, log: list[dict], cfg: TrainConfig, out: Path) -> None:
    from circuits.files import atomic_write_text
    from circuits.sae.formats import save_saelens

    save_saelens(sae, out)
    write_log_table(log, out / LOG_TABLE)
    atomic_write_text(out / "training_config.json", json.dumps(asdict(cfg), indent=1))


def write_log_table(log: list[dict], path: Path) -> None:
    """The per-step log as a parquet table (``pandas.read_parquet(path)``), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from circuits.files import atomic_write_bytes

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(log), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _checkpoint(sae, opt, sched, since_fired, base, step, stream: _Stream, log, cfg, out: Path, d: Dist) -> None:
    """A SAELens-format snapshot in checkpoints/step-N and the full trainer state (rank 0 writes;
    every rank holds the same state)."""
    from circuits.files import atomic_write_bytes
    from circuits.sae.formats import save_saelens

    if d.is_main:
        save_saelens(sae, out / "checkpoints" / f"step-{step}")
        state = {"sae": sae.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "since_fired": since_fired.cpu(), "rng": torch.get_rng_state(), "sparsity_coeff": base,
                 "step": step, "epoch": stream.epoch, "taken": stream.taken, "log": log,
                 "config": json.dumps(_resume_keys(cfg), sort_keys=True)}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(out / "checkpoints" / STATE_FILE, buf.getvalue())
    d.barrier()


def _resume_keys(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share (the checkpoint cadence and device may change)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("checkpoint_every", "device")}


def _load_state(out: Path | str, cfg: TrainConfig) -> Optional[dict]:
    path = Path(out) / "checkpoints" / STATE_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location=cfg.device, weights_only=True)
    saved = json.loads(state["config"])
    diff = {k: (saved.get(k), v) for k, v in _resume_keys(cfg).items() if saved.get(k) != v}
    if diff:
        raise UserError(f"{path} was written by a training run with other settings {diff} (saved, new); "
                         "pass the same settings to resume, or use another output directory")
    return state


@torch.no_grad()
def _init_b_dec(sae: SparseDictionary, y: torch.Tensor, how: str) -> None:
    if how == "geometric_median":
        sae.b_dec.copy_(geometric_median(y.float()))
    elif how == "mean":
        sae.b_dec.copy_(y.float().mean(0))


@torch.no_grad()
def _init_threshold(sae: SparseDictionary, x: Tensor, rate: float) -> None:
    """JumpReLU thresholds at each feature's (1 - rate) quantile of its pre-activations on the first
    batch (floored at 1e-3), so training starts at L0 ~ rate * d_sae whatever the activations' scale.
    The threshold is learned as log(theta), which Adam moves by about lr per step, i.e. by a factor
    e^(lr * steps) at most: from a fixed 0.01 it cannot reach thresholds of order of the pre-activations
    in a short run (the cause of L0 ~110 of 256 before), from the quantile it only has to fine-tune."""
    q = torch.quantile(sae.pre_acts(x).float(), 1 - rate, dim=0)
    sae.log_threshold.copy_(q.clamp_min(1e-3).log())


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
