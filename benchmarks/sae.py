"""hooked-vit's SAE training against SAELens's, on the same activations and the same batches, in one run.

Activations of `blocks.4.hook_resid_post` (all 65 tokens) of the embedded default model over 2,000
synthetic training images (130,000 rows; held out: 512 test images). Both trainers see the same
sequence of 1,500 batches of 1,024 rows (seeded epoch permutations), the same learning rate and the
same schedule (linear warm-up, then linear decay to 0). Measured on the held-out rows: explained
variance 1 - sum |x - x_hat|^2 / sum |x - mean|^2, MSE (summed over dims), L0, dead features (never
active on the held-out rows); and training tokens/s (the training loop alone, same thread count).

SAELens runs in this interpreter when importable, else in `--saelens-python` (a scratch venv with
SAELens: `pip install sae-lens`; never a dependency of hooked-vit), else the comparison is a faithful
reference loop of SAELens 6's TopK training (`reference_topk_loop`, written from its source:
decoder rows of norm 0.1, W_enc = W_dec^T, b_dec 0, pre-activations scaled by the decoder norms,
AuxK with weight 1 and a 1,000-step dead window, gradient-norm clip 1).

    PYTHONPATH=. python benchmarks/sae.py [--saelens-python /tmp/saelens-venv/bin/python] [--steps 1500]
    PYTHONPATH=. python benchmarks/sae.py --store   # also: activation-store write rate and peak RSS

Results: docs/benchmarks.md ("Sparse autoencoder training").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HOOK = "blocks.4.hook_resid_post"
ROOT = Path(__file__).resolve().parents[1]


# --- shared by both sides (torch only: the SAELens worker runs this file in another venv) ---

def batch_sequence(n_rows: int, batch: int, steps: int, seed: int = 0):
    """Row indices of each step's batch: epoch permutations (seed + epoch), last partial batch dropped."""
    per_epoch, epoch = n_rows // batch, 0
    done = 0
    while done < steps:
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
        for b in range(min(per_epoch, steps - done)):
            yield perm[b * batch:(b + 1) * batch]
            done += 1
        epoch += 1


def metrics(encode, decode, x: torch.Tensor) -> dict:
    """Held-out explained variance, MSE, L0 and dead features of an encode/decode pair."""
    with torch.no_grad():
        acts = torch.cat([encode(c) for c in x.split(4096)])
        recon = torch.cat([decode(a) for a in acts.split(4096)])
    err = (x - recon).pow(2).sum(-1)
    return {"explained_variance": float(1 - err.sum() / (x - x.mean(0)).pow(2).sum()),
            "mse": float(err.mean()), "l0": float((acts > 0).float().sum(-1).mean()),
            "dead": int(((acts > 0).sum(0) == 0).sum())}


def schedule(steps: int) -> tuple[int, int]:
    """Warm-up and decay steps, the same for both trainers (hooked-vit's CLI default)."""
    warm = min(100, steps // 10)
    return warm, steps - warm


def saelens_topk(train: torch.Tensor, test: torch.Tensor, args) -> dict:
    """SAELens 6's own trainer (SAETrainer, TopKTrainingSAE with its defaults)."""
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=args.d_sae, k=args.k, device="cpu"))
    warm, decay = schedule(args.steps)
    cfg = SAETrainerConfig(total_training_samples=args.steps * args.train_batch, train_batch_size_samples=args.train_batch,
                           lr=args.lr, lr_end=args.lr, lr_warm_up_steps=warm, lr_decay_steps=decay,
                           device="cpu")
    provider = (train[idx] for idx in batch_sequence(len(train), args.train_batch, args.steps, args.seed))
    trainer = SAETrainer(cfg, sae, provider)
    t0 = time.perf_counter()
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        trainer.fit()
    seconds = time.perf_counter() - t0
    sae.eval()
    out = metrics(sae.encode, sae.decode, test)
    return {**out, "seconds": seconds, "tokens_per_s": args.steps * args.train_batch / seconds,
            "trainer": f"SAELens {sae_lens.__version__} SAETrainer + TopKTrainingSAE"}


def reference_topk_loop(train: torch.Tensor, test: torch.Tensor, args) -> dict:
    """SAELens 6's TopK training re-implemented in plain torch, for machines without SAELens."""
    torch.manual_seed(args.seed)
    d_in, d_sae, k = train.shape[1], args.d_sae, args.k
    w_dec = torch.nn.init.kaiming_uniform_(torch.empty(d_sae, d_in))
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * 0.1
    W_dec = torch.nn.Parameter(w_dec)
    W_enc = torch.nn.Parameter(w_dec.T.clone())
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(d_sae)), torch.nn.Parameter(torch.zeros(d_in))
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=args.lr)
    warm, decay = schedule(args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 1.0, max(0.0, (args.steps - s) / decay)))
    since = torch.zeros(d_sae)

    def encode(x, norm=None):
        norm = W_dec.norm(dim=1) if norm is None else norm
        pre = ((x - b_dec) @ W_enc + b_enc) * norm
        v, i = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, v.relu()) / norm, pre

    def decode(a):
        return a @ W_dec + b_dec

    t0 = time.perf_counter()
    for idx in batch_sequence(len(train), args.train_batch, args.steps, args.seed):
        x = train[idx]
        norm = W_dec.norm(dim=1)
        acts, pre = encode(x, norm)
        recon = decode(acts)
        loss = (recon - x).pow(2).sum(-1).mean()
        dead = since > 1000
        if dead.any():
            k_aux = d_in // 2
            scale, k_aux = min(int(dead.sum()) / k_aux, 1.0), min(k_aux, int(dead.sum()))
            v, i = torch.where(dead, pre, -torch.inf).topk(k_aux, dim=-1, sorted=False)
            aux = (torch.zeros_like(pre).scatter(-1, i, v) / norm) @ W_dec
            loss = loss + scale * (aux - (x - recon).detach()).pow(2).sum(-1).mean()
        with torch.no_grad():
            since += 1
            since[(acts > 0).any(0)] = 0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
    seconds = time.perf_counter() - t0
    out = metrics(lambda x: encode(x)[0], decode, test)
    return {**out, "seconds": seconds, "tokens_per_s": args.steps * args.train_batch / seconds,
            "trainer": "reference loop of SAELens 6's TopK training (SAELens not installed)"}


def worker(acts_path: str, out_path: str, args) -> None:
    """Run in the SAELens interpreter: train on the saved activations, write the metrics."""
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    t = load_file(acts_path)
    Path(out_path).write_text(json.dumps(saelens_topk(t["train"], t["test"], args)))


# --- hooked-vit's side ---

def activations(n_train: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    from circuits.runs.sources import load_model, synthetic_for
    from circuits.sae.activations import hook_activations, image_batches

    model = load_model("embedded")
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [hook_activations(model, model.to_input(b["image"]), [HOOK])[0][HOOK]
                for b in image_batches(synthetic_for("default", split, n), limit=None, batch_size=100)]
        out.append(torch.cat(rows))
    return out[0], out[1]


def hooked_vit_topk(train: torch.Tensor, test: torch.Tensor, args) -> dict:
    from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
    from circuits.sae.train import TrainConfig, train_dictionary

    sae = SparseDictionary(DictionaryConfig(train.shape[1], args.d_sae, "topk", k=args.k, hook_name=HOOK),
                           seed=args.seed)
    warm, _ = schedule(args.steps)
    order = list(batch_sequence(len(train), args.train_batch, args.steps, args.seed))
    t0 = time.perf_counter()
    train_dictionary(sae, lambda epoch: ({HOOK: train[idx]} for idx in order) if epoch == 0 else iter(()),
                     TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=warm, seed=args.seed), progress=False)
    seconds = time.perf_counter() - t0
    out = metrics(sae.encode, sae.decode, test)
    return {**out, "seconds": seconds, "tokens_per_s": args.steps * args.train_batch / seconds,
            "trainer": "hooked-vit train_dictionary (defaults)"}


def compare(train: torch.Tensor, test: torch.Tensor, args) -> dict:
    try:
        import sae_lens  # noqa: F401
        return saelens_topk(train, test, args)
    except ImportError:
        pass
    if args.saelens_python:
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            acts, res = Path(tmp) / "acts.safetensors", Path(tmp) / "res.json"
            save_file({"train": train.contiguous(), "test": test.contiguous()}, str(acts))
            cmd = [args.saelens_python, __file__, "--worker", str(acts), str(res)] + _shared_flags(args)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"the SAELens run failed:\n{done.stderr[-3000:]}")
            return json.loads(res.read_text())
    return reference_topk_loop(train, test, args)


def _shared_flags(args) -> list[str]:
    return ["--steps", str(args.steps), "--train-batch", str(args.train_batch), "--d-sae", str(args.d_sae),
            "--k", str(args.k), "--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads)]


def store_throughput(images: int) -> None:
    from circuits.embedded import SyntheticShapes, normalize
    from circuits.runs.activation_store import build_activation_store
    from circuits.runs.sources import load_model

    model = load_model("embedded")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build_activation_store(model, SyntheticShapes(images, seed=0, split="train", transform=normalize),
                                       Path(tmp) / "store", [HOOK], batch_size=100, progress=False)
        s = time.perf_counter() - t0
        print(f"store: {len(store)} activations in {s:.1f} s = {len(store) / s:,.0f} activations/s "
              f"(includes rendering the synthetic images)")
        from tests.test_sae_store import peak_rss_mib

        small, large = peak_rss_mib(128, Path(tmp) / "s"), peak_rss_mib(2560, Path(tmp) / "l")
        print(f"store peak RSS: {small:.0f} MiB (128 images) vs {large:.0f} MiB (2560 images)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--train-batch", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--lr", type=float, default=None,
                   help="the same for both trainers (default: hooked-vit's TopK default, 4e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=2000, help="training images (65 rows each)")
    p.add_argument("--test-images", type=int, default=512)
    p.add_argument("--saelens-python", default=None, help="an interpreter with sae_lens, when this one lacks it")
    p.add_argument("--reference-loop", action="store_true", help="compare with the reference loop, not SAELens")
    p.add_argument("--store", action="store_true", help="also measure the activation store")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args)
    sys.path.insert(0, str(ROOT))
    from circuits.sae.train import default_lr

    args.lr = default_lr("topk") if args.lr is None else args.lr
    torch.set_num_threads(args.threads)
    train, test = activations(args.images, args.test_images)
    ours = hooked_vit_topk(train, test, args)
    theirs = reference_topk_loop(train, test, args) if args.reference_loop else compare(train, test, args)
    print(f"{HOOK}: {len(train)} training rows, {len(test)} held-out rows; TopK {args.d_sae} features, k {args.k}, "
          f"{args.steps} steps x {args.train_batch} rows, lr {args.lr}, {args.threads} threads")
    print("| trainer | explained variance | MSE | L0 | dead | train s | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in (ours, theirs):
        print(f"| {r['trainer']} | {r['explained_variance']:.4f} | {r['mse']:.3f} | {r['l0']:.1f} | {r['dead']} | "
              f"{r['seconds']:.1f} | {r['tokens_per_s']:,.0f} |")
    print(f"speed ratio (hooked-vit / other): {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")
    print(json.dumps({"hooked_vit": ours, "other": theirs}))
    if args.store:
        store_throughput(args.images)


if __name__ == "__main__":
    main()
