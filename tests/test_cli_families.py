"""The demo's commands through the command line on random-weight SigLIP (MAP head) and DINOv3
(RoPE, registers) towers: each runs, or refuses in one line (no traceback).

Fast: the towers are shrunk with `--arch NAME:depth=2,embed_dim=64,...` (timm constructor
overrides of a --random-weights model) on 64 px synthetic images; the full-size SigLIP-B/16
and DINOv3-S/16 are the slow tests at the end."""

from __future__ import annotations

import pytest

from circuits.cli import main

SIGLIP = "vit_base_patch16_siglip_224"
DINOV3 = "vit_small_patch16_dinov3"
SMALL = "depth=2,embed_dim=64,num_heads=4,img_size=64"
DATA = ["--data", "synthetic:test:8", "--batch-size", "4", "--device", "cpu"]

# The demo's steps (circuits/report/demo.py STEPS; probes beside memories), small settings.
COMMANDS = {
    "identify": ["identify"],
    "perturb": ["perturb", "--kinds", "self_only"],
    "memories": ["memories"],
    "probe": ["probe", "--per-class", "1"],
    "decompose": ["decompose", "--reference-limit", "8", "--heatmaps", "1"],
    "explain": ["explain"],
    "circuit": ["circuit", "--budget", "5"],
    "sae": ["sae", "train", "--d-sae", "32", "--k", "4", "--steps", "5", "--train-batch", "64",
            "--hook", "blocks.1.hook_resid_post"],
    "textspan": ["textspan"],
}
# A headless tower (num_classes=0, as timm registers both) has no class space.
NEEDS_CLASSES = {"identify", "perturb", "memories", "probe", "explain", "circuit"}
REASONS = {"textspan": "text tower", **{c: "no classifier head" for c in NEEDS_CLASSES}}


def run_cli(argv, capsys):
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s" not in line
           and "%|" not in line and "stage" not in line]
    return code, err


def command_line(name: str, command: str, out, options: str, full_size: bool = False) -> list[str]:
    argv = COMMANDS[command]
    n = 2 if argv[0] == "sae" else 1
    arch = [] if full_size else ["--arch", f"{name}:{options}"]
    return [*argv[:n], "--model", f"timm:{name}", "--random-weights", *arch, *DATA, "--out", str(out / command),
            *argv[n:]]


def check(code, err, command, out, refused):
    if command in refused:
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"hooked-vit {COMMANDS[command][0]}: error: ") and REASONS[command] in err[0], err
        assert "Traceback" not in err[0]
    else:
        assert code == 0, err
        assert any((out / command).rglob("*.json")), f"{command} wrote no results"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", (SIGLIP, DINOV3))
def test_headless_tower_runs_or_refuses_in_one_line(name, command, tmp_path, capsys):
    """As timm builds them (num_classes=0): decompose and sae run; class analyses refuse."""
    code, err = run_cli(command_line(name, command, tmp_path, SMALL), capsys)
    check(code, err, command, tmp_path, NEEDS_CLASSES | {"textspan"})


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", (SIGLIP, DINOV3))
def test_tower_with_a_random_head_runs_every_analysis(name, command, tmp_path, capsys):
    """--arch NAME:num_classes=10 gives the random tower a (random) classifier head over the
    synthetic classes: every analysis runs; textspan (no text tower) refuses in one line."""
    code, err = run_cli(command_line(name, command, tmp_path, SMALL + ",num_classes=10"), capsys)
    check(code, err, command, tmp_path, {"textspan"})


def test_arch_override_must_name_the_model(tmp_path, capsys):
    code, err = run_cli(["decompose", "--model", f"timm:{SIGLIP}", "--random-weights", "--arch",
                         f"{DINOV3}:depth=2", *DATA, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and len(err) == 1 and "overrides options of the model itself" in err[0]
    code, err = run_cli(["decompose", "--model", f"timm:{SIGLIP}", "--arch", f"{SIGLIP}:depth=2", *DATA,
                         "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and len(err) == 1 and "--random-weights" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", ("identify", "decompose"))
@pytest.mark.parametrize("name", (SIGLIP, DINOV3))
def test_full_size_towers(name, command, tmp_path, capsys):
    """The registered SigLIP-B/16 and DINOv3-S/16 themselves (224 px synthetic images)."""
    argv = command_line(name, command, tmp_path, "", full_size=True)
    argv[argv.index("synthetic:test:8")] = "synthetic:test:2"
    if command == "decompose":
        argv[argv.index("--reference-limit") + 1] = "2"
    code, err = run_cli(argv, capsys)
    check(code, err, command, tmp_path, {"identify"})


def test_decompose_heatmaps_with_a_one_background_reference(tmp_path, capsys):
    """A reference of two images (here both with one background) holds one value of the spurious key, so no spurious direction:
    the heatmaps say so and keep the core maps (this crashed with an IndexError)."""
    import json

    argv = command_line(SIGLIP, "decompose", tmp_path, SMALL)
    argv[argv.index("--reference-limit") + 1] = "2"
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    heat = json.loads(next((tmp_path / "decompose").rglob("heatmaps.json")).read_text())
    assert "single value of the spurious key" in heat["notes"][0]
    assert heat["maps"] and {m["feature"] for m in heat["maps"]} == {"core"}
