"""Layer indices outside [-n_layers, n_layers) are refused everywhere a layer is taken, never
wrapped (issue 23, item 2): `perturb --layers 12` on a 2-block model used to record layer 0."""

from __future__ import annotations

import pytest
import torch

from circuits.cli import main
from circuits.explain.trace import trace as record_trace
from helpers import images, make_timm
from hooked_vit import HookedViT, UserError
from hooked_vit.layers import block_range, layer_index, layer_indices


@pytest.fixture(scope="module")
def vit():
    timm_model, size = make_timm("vit_tiny_patch16_224")  # 2 blocks
    return HookedViT.from_timm(timm_model), size


@pytest.mark.parametrize("layer,expected", [(0, 0), (1, 1), (-1, 1), (-2, 0)])
def test_layer_index_counts_from_either_end(layer, expected):
    assert layer_index(layer, 2) == expected


@pytest.mark.parametrize("layer", [2, 3, 12, -3, -13, 1.5, "1", True])
def test_layer_index_refuses_what_is_not_a_block(layer):
    with pytest.raises(UserError, match=r"layer"):
        layer_index(layer, 2)


def test_layer_indices_sorted_distinct_and_never_empty():
    assert layer_indices(None, 3) == [0, 1, 2]
    assert layer_indices([2, -1, 0], 3) == [0, 2]
    assert layer_indices(1, 3) == [1]
    with pytest.raises(UserError, match="no block"):
        layer_indices([], 3)
    with pytest.raises(UserError, match=r"--layers 7 is outside \[-3, 3\)"):
        layer_indices([0, 7], 3, "--layers")


def test_perturbation_hooks_refuse_out_of_range_layers(vit):
    from circuits.interventions import perturbation_hooks

    model, _ = vit
    assert [n for n, _ in perturbation_hooks(model, "self_only", [-1])] == ["blocks.1.attn.hook_pattern"]
    for bad in ([2], [12], [-3]):
        with pytest.raises(UserError, match="outside"):
            perturbation_hooks(model, "self_only", bad)


def test_patch_activations_refuses_out_of_range_layers_positions_heads(vit):
    from circuits.patching import patch_activations

    model, size = vit
    clean, corrupted = images(size, 2, seed=1), images(size, 2, seed=2)
    grid = patch_activations(model, clean, corrupted, "resid_pre", layers=[-1], positions=[0])
    assert grid.coords["layer"] == [1]
    with pytest.raises(UserError, match="layers 7"):
        patch_activations(model, clean, corrupted, "resid_pre", layers=[7], positions=[0])
    n_tokens = model.cfg.n_ctx
    with pytest.raises(UserError, match="position"):
        patch_activations(model, clean, corrupted, "resid_pre", layers=[0], positions=[n_tokens])
    with pytest.raises(UserError, match="head"):
        patch_activations(model, clean, corrupted, "z", layers=[0], positions=[0], heads=[model.cfg.n_heads])


def test_explanation_maps_refuse_out_of_range_layers(vit):
    from circuits.explain.attention import raw_attention, rollout
    from circuits.explain.class_embedding import class_embedding
    from circuits.explain.gradients import attention_gradcam

    model, size = vit
    trace = record_trace(model, images(size, 1))
    for call in (lambda: raw_attention(trace, layer=2), lambda: attention_gradcam(trace, layer=-3),
                 lambda: class_embedding(trace, layers=[5]), lambda: rollout(trace, start_layer=2)):
        with pytest.raises(UserError, match="outside"):
            call()
    torch.testing.assert_close(raw_attention(trace, layer=-1), raw_attention(trace, layer=1))


def test_probes_and_text_span_refuse_out_of_range_layers(vit):
    from circuits.probes import train_probes
    from circuits.text_span import head_contributions

    model, size = vit
    with pytest.raises(UserError, match="outside"):
        train_probes(model, [], layers=[2], progress=False)
    with pytest.raises(UserError, match="outside"):
        head_contributions(model, images(size, 1), layers=[-3])


def test_forward_refuses_block_bounds_outside_the_model(vit):
    model, size = vit
    assert list(block_range(None, -1, 2)) == [0]
    x = images(size, 1)
    with pytest.raises(UserError, match="stop_at_layer=3"):
        model(x, stop_at_layer=3)
    torch.testing.assert_close(model(x, stop_at_layer=-1), model(x, stop_at_layer=1))


@pytest.mark.parametrize("layer", ["12", "-13", "6"])
def test_cli_perturb_refuses_layers_the_model_does_not_have(layer, tmp_path, capsys):
    # the embedded default has 6 blocks
    assert main(["perturb", "--out", str(tmp_path / "run"), "--limit", "2", "--removal", "--layers", layer]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--layers {layer} is outside [-6, 6)" in err, err
    assert not (tmp_path / "run" / "attention" / "none" / "manifest.json").exists()
