"""`hooked-vit demo`: every analysis (small: circuit, SAE and TextSpan included) on the embedded
default, the embedded video models on moving-shapes clips (identify, a motion circuit, no
cross-frame attention), then one HTML report.

No downloads: the synthetic dataset is generated, the model is the project's own. Each
step below runs one analysis over the data (`circuits.runs`); runs are resumable, so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from circuits.runs.memories import memories
from circuits.runs.probe import run_probes
from circuits.report import build_report
from circuits.runs.decompose import decompose_run
from circuits.runs.explain import benchmark
from circuits.runs.identify import identify
from circuits.runs.perturb import perturbation_experiment, token_removal_experiment
from circuits.runs.circuit import circuit_run
from circuits.runs.sae import eval_run, features_run, train_run
from circuits.runs.textspan import textspan_run
from circuits.runs.sources import load_dataset, load_model, synthetic_for
from circuits.runs.specs import parse_model_spec
from hooked_vit import HookedViT

DEMO_LIMIT = 256  # images per perturbation run: the step stays well under 30 s on 2 cores
DEMO_IMAGES = 128  # images of the explanation benchmark
PROBE_PER_CLASS = 10
CIRCUIT_BUDGET, CIRCUIT_IMAGES = 20, 64  # EAP edges kept; images scored
SAE_TRAIN_IMAGES, SAE_WIDTH, SAE_STEPS, SAE_EVAL_IMAGES = 256, 256, 300, 128
TEXTSPAN_IMAGES = 256
DEMO_CLIPS = 128  # moving-shapes clips per video run
VIDEO_CIRCUIT_CLIPS = 48  # clips scored by the video circuit run


@dataclass
class DemoContext:
    """What every demo step gets: where to write, the embedded models and data."""

    out: Path
    trained: HookedViT  # the embedded default
    random: HookedViT  # the same architecture with random weights
    data: torch.utils.data.Dataset  # the synthetic test split, preprocessed
    batch_size: int = 64
    overwrite: bool = False
    device: str = "cpu"


def identify_step(ctx: DemoContext) -> None:
    for label, model in (("trained", ctx.trained), ("random weights", ctx.random)):
        identify(model, ctx.data, str(ctx.out / "identify" / label), batch_size=ctx.batch_size,
                 overwrite=ctx.overwrite)


def perturb_step(ctx: DemoContext) -> None:
    root = ctx.out / "perturb"
    limit = min(DEMO_LIMIT, len(ctx.data))
    perturbation_experiment(ctx.trained, ctx.data, root / "attention", batch_size=ctx.batch_size,
                            limit=limit, overwrite=ctx.overwrite)
    token_removal_experiment(ctx.trained, ctx.data, root / "token_removal", batch_size=ctx.batch_size,
                             limit=limit, overwrite=ctx.overwrite)


def memories_step(ctx: DemoContext) -> None:
    for label, model in (("trained", ctx.trained), ("random weights", ctx.random)):
        memories(model, ctx.data, str(ctx.out / "memories" / label), batch_size=ctx.batch_size,
                 overwrite=ctx.overwrite, progress=False)
    train = synthetic_for("default", "train", 4 * PROBE_PER_CLASS * ctx.trained.cfg.n_classes)
    run_probes(ctx.trained, train, ctx.data, str(ctx.out / "probes" / "trained"), per_class=PROBE_PER_CLASS,
               batch_size=ctx.batch_size, overwrite=ctx.overwrite, progress=False)


def decompose_step(ctx: DemoContext) -> None:
    """The spurious embedded model (reference = synthetic val split, data = test split), and
    the default model with a planted background-shortcut head, as ground truth."""
    from circuits.decomposition.planted import plant_background_shortcut

    model = load_model("embedded:spurious", device=ctx.device)
    n = len(ctx.data)
    decompose_run(model, synthetic_for("spurious", "test", n), synthetic_for("spurious", "val", n),
                  ctx.out / "decompose" / "spurious", batch_size=ctx.batch_size, overwrite=ctx.overwrite,
                  progress=False)
    reference = synthetic_for("default", "val", n)
    hooks, head = plant_background_shortcut(ctx.trained, reference)
    decompose_run(ctx.trained, ctx.data, reference, ctx.out / "decompose" / "default with a planted shortcut",
                  batch_size=ctx.batch_size, n_heatmaps=0, fwd_hooks=hooks, overwrite=ctx.overwrite,
                  progress=False, settings={"planted": head})


def explain_step(ctx: DemoContext) -> None:
    benchmark(ctx.trained, ctx.data, ctx.out / "explain" / "trained", batch_size=ctx.batch_size,
              limit=DEMO_IMAGES, sanity_images=16, overwrite=ctx.overwrite)


def circuit_step(ctx: DemoContext) -> None:
    """Edge attribution patching (EAP) with a small budget on a few images."""
    circuit_run(ctx.trained, ctx.data, ctx.out / "circuit" / "trained", budget=CIRCUIT_BUDGET,
                limit=min(CIRCUIT_IMAGES, len(ctx.data)), batch_size=min(ctx.batch_size, 32), overwrite=ctx.overwrite)


def sae_step(ctx: DemoContext) -> None:
    """A small top-k SAE on the middle residual stream, trained briefly on the synthetic train
    split, then evaluated and its features studied on the test images."""
    layer = ctx.trained.cfg.n_layers // 2
    root = ctx.out / "sae"
    train = synthetic_for("default", "train", SAE_TRAIN_IMAGES)
    sae_dir = train_run(ctx.trained, train, root / "train", hook=f"blocks.{layer}.hook_resid_post", d_sae=SAE_WIDTH,
                        k=8, steps=SAE_STEPS, train_batch=512, batch_size=ctx.batch_size, overwrite=ctx.overwrite,
                        device=ctx.device, progress=False)
    limit = min(SAE_EVAL_IMAGES, len(ctx.data))
    eval_run(ctx.trained, sae_dir, ctx.data, root / "eval", batch_size=ctx.batch_size, limit=limit,
             overwrite=ctx.overwrite)
    features_run(ctx.trained, sae_dir, ctx.data, root / "features", batch_size=ctx.batch_size, limit=limit,
                 overwrite=ctx.overwrite)


def textspan_step(ctx: DemoContext) -> None:
    """TextSpan (Gandelsman et al. 2024) on the classifier's last heads. The embedded default
    has no text tower, so the pool of "texts" is its class names with their logit directions
    (one-hot rows in the logit space the heads write to), not CLIP prompts."""
    names = list(ctx.trained.cfg.class_names or [str(c) for c in range(ctx.trained.cfg.n_classes)])
    directions = torch.eye(len(names))
    textspan_run(ctx.trained, ctx.data, ctx.out / "textspan" / "trained (class directions)", names, directions,
                 k=3, batch_size=ctx.batch_size, limit=min(TEXTSPAN_IMAGES, len(ctx.data)), overwrite=ctx.overwrite,
                 progress=False, settings={"texts_from": "class names and logit directions (no text tower)"})


def video_step(ctx: DemoContext) -> None:
    """The embedded video models (docs/video.md) on moving-shapes clips of the test split:
    identify (space-time identifiability) and a motion circuit (EAP-IG against the clips
    played backwards, 20 edges grown from the logits) on the motion model, and no cross-frame
    attention on the motion model and on its static control."""
    from circuits.embedded.video_models import VIDEO_NAMES

    root = ctx.out / "video"
    for name, task in VIDEO_NAMES.items():
        model = load_model(f"embedded:{name}", device=ctx.device)
        clips = load_dataset(f"{'moving_shapes' if task == 'motion' else 'moving_shapes_static'}:test:"
                             f"{min(DEMO_CLIPS, len(ctx.data))}", model)
        if task == "motion":
            identify(model, clips, str(root / "identify" / name), batch_size=ctx.batch_size, overwrite=ctx.overwrite,
                     progress=False)
            circuit_run(model, clips, root / "circuit" / name, method="eap-ig", corruption="reverse_frames",
                        budget=CIRCUIT_BUDGET, greedy=True, limit=min(VIDEO_CIRCUIT_CLIPS, len(clips)),
                        batch_size=min(ctx.batch_size, 24), overwrite=ctx.overwrite)
        perturbation_experiment(model, clips, root / "perturb" / name, kinds=("none", "no_cross_frame"),
                                batch_size=ctx.batch_size, overwrite=ctx.overwrite, progress=False)


STEPS: dict[str, Callable[[DemoContext], None]] = {
    "identify": identify_step, "perturb": perturb_step, "memories": memories_step,
    "decompose": decompose_step, "explain": explain_step, "circuit": circuit_step, "sae": sae_step,
    "textspan": textspan_step, "video": video_step,
}


def run_demo(out: str | Path = "demo_out", n: int = 512, batch_size: int = 64, device: str = "cpu",
             overwrite: bool = False, threads: int | None = 1) -> Path:
    """Run every demo step and build the report; returns the report's path.

    threads: torch CPU threads during the demo (default 1: the embedded model is tiny, and
    extra threads only wait on each other, badly so when other processes share the cores).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_steps(Path(out), n, batch_size, device, overwrite)
    finally:
        torch.set_num_threads(previous)


def _run_steps(out: Path, n: int, batch_size: int, device: str, overwrite: bool) -> Path:
    torch.manual_seed(0)
    spec = parse_model_spec("embedded")
    trained = load_model(spec, device=device)
    ctx = DemoContext(out=out, trained=trained, random=load_model("embedded", device=device, random_weights=True),
                      data=load_dataset(f"synthetic:test:{n}", trained, spec), batch_size=batch_size,
                      overwrite=overwrite, device=device)
    return run_steps(ctx, STEPS, title="hooked-vit demo: embedded default")


def run_steps(ctx: DemoContext, steps: dict[str, Callable[[DemoContext], None]], title: str) -> Path:
    """Run the given steps in order, then the report over everything under ctx.out."""
    for name, step in steps.items():
        start = time.perf_counter()
        step(ctx)
        print(f"demo step {name}: {time.perf_counter() - start:.1f} s")
    return build_report([ctx.out], ctx.out / "report.html", title=title)
