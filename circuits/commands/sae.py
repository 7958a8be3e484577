"""`hooked-vit sae train|eval|features`: sparse autoencoders and transcoders (argument parsing only)."""

from __future__ import annotations

import argparse

from circuits.commands._common import add_model_args, add_run_args, add_video_args, load_inputs

ORDER = 60


def add_parser(sub) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders / transcoders: train, evaluate, study features",
                       description="Train a sparse dictionary on any hook, evaluate it spliced in, study its features.")
    cmds = p.add_subparsers(dest="sae_command", required=True)

    t = cmds.add_parser("train", help="store activations of a hook and train a dictionary on them")
    add_model_args(t)
    add_run_args(t, target=False, video=True)
    add_video_args(t)
    t.add_argument("--hook", default="blocks.4.hook_resid_post", help="hook point the dictionary reads")
    t.add_argument("--hook-out", default=None, help="transcoder: the hook it predicts (e.g. blocks.3.hook_mlp_out)")
    t.add_argument("--architecture", default="topk", choices=["relu", "topk", "batchtopk", "jumprelu"])
    t.add_argument("--d-sae", type=int, default=512)
    t.add_argument("--k", type=int, default=16, help="active features per token (topk, batchtopk)")
    t.add_argument("--tokens", default="all", choices=["all", "cls", "patch"])
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--train-batch", type=int, default=1024, help="activation rows per step")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: per architecture, 4e-3 for topk / batchtopk, 2e-3 otherwise)")
    t.add_argument("--sparsity-coeff", "--l1-coeff", dest="sparsity_coeff", type=float, default=None,
                   help="relu: L1 weight; jumprelu: L0 weight (default: per architecture, scaled by the activations' "
                        "norm to reach L0 ~20-30; see docs/sparse_autoencoders.md)")
    t.add_argument("--sparsity-warmup-steps", type=int, default=None,
                   help="steps over which the sparsity weight rises linearly from 0 (default 5%% of --steps)")
    t.add_argument("--jumprelu-sparsity", default="step", choices=["step", "tanh"],
                   help="jumprelu: L0 through the step function's straight-through estimator, or SAELens's tanh")
    t.add_argument("--aux-coeff", type=float, default=1.0, help="topk / batchtopk: AuxK weight (SAELens; Gao et al.)")
    t.add_argument("--dead-after-tokens", type=int, default=50_000,
                   help="a feature silent for this many rows counts as dead (AuxK / resampling revive it)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    t.add_argument("--checkpoint-every", type=int, default=0,
                   help="write a checkpoint and the resumable trainer state every N steps (rerun to resume)")
    t.add_argument("--activations", default=None,
                   help="train on this existing activation store instead of building OUT/activations")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(run=run_train, data="synthetic:train:2000")

    for name, fn, text in (("eval", run_eval, "explained variance, L0, dead/dense features, spliced accuracy and CE"),
                           ("features", run_features, "top images, histograms, logit lens, ground-truth attributes")):
        e = cmds.add_parser(name, help=text)
        add_model_args(e)
        add_run_args(e, target=False, video=name == "eval")  # features draws images: not on video yet
        if name == "eval":
            add_video_args(e)
        e.add_argument("--sae", required=True, help="a dictionary folder (SAELens or ViT-Prisma format)")
        if name == "features":
            e.add_argument("--top-k", type=int, default=8)
        e.set_defaults(run=fn)


def run_train(args: argparse.Namespace) -> int:
    from circuits.runs.distributed import init_distributed
    from circuits.runs.sae import train_run

    model, dataset, _ = load_inputs(args)
    out = train_run(model, dataset, args.out, hook=args.hook, hook_out=args.hook_out,
                    architecture=args.architecture, d_sae=args.d_sae, k=args.k, tokens=args.tokens,
                    steps=args.steps, train_batch=args.train_batch, lr=args.lr, sparsity_coeff=args.sparsity_coeff,
                    checkpoint_every=args.checkpoint_every, seed=args.seed, batch_size=args.batch_size,
                    limit=args.limit, num_workers=args.workers, overwrite=args.overwrite,
                    device=str(model.cfg.device), activations=args.activations,
                    sparsity_warmup_steps=args.sparsity_warmup_steps, jumprelu_sparsity=args.jumprelu_sparsity,
                    aux_coeff=args.aux_coeff, grad_clip=args.grad_clip,
                    dead_after_tokens=args.dead_after_tokens)
    if init_distributed().is_main:
        print(f"dictionary in {out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from circuits.runs.sae import eval_run

    model, dataset, _ = load_inputs(args)
    metrics = eval_run(model, args.sae, dataset, args.out, batch_size=args.batch_size,
                       limit=args.limit, num_workers=args.workers, overwrite=args.overwrite)
    print(f"explained variance {metrics['explained_variance']:.3f}, L0 {metrics['l0']:.1f}; results in {args.out}")
    return 0


def run_features(args: argparse.Namespace) -> int:
    from circuits.runs.sae import features_run

    model, dataset, _ = load_inputs(args)
    features_run(model, args.sae, dataset, args.out, batch_size=args.batch_size,
                 limit=args.limit, top_k=args.top_k, num_workers=args.workers, overwrite=args.overwrite)
    print(f"feature study in {args.out}")
    return 0
