"""circuits.plot: trace shapes, square token maps over their images, labels, class names, compactness."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from circuits import plot
from circuits.identifiability import chance_identifiability, identifiability
from hooked_vit import HookedViTConfig

rng = np.random.default_rng(0)


def _img(h=32, w=32):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _decode(src: str) -> Image.Image:
    assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_token_map_over_image_square_and_aligned():
    values = rng.random(12)  # a 3 x 4 grid
    fig = plot.token_map(values, _img(48, 64), grid=(3, 4), title="a map", colorbar_title="score",
                         outline=values > 0.5)
    image, heat, marks = fig.data
    assert image.type == "image" and heat.type == "heatmap" and marks.type == "scatter"
    assert np.asarray(heat.z).shape == (3, 4)
    assert 0 < heat.opacity < 1 and heat.showscale and heat.colorbar.title.text == "score"
    # The image covers exactly the grid: 4 patches wide, 3 high, whatever its pixel size.
    w, h = _decode(image.source).size
    assert image.x0 - image.dx / 2 == pytest.approx(0) and image.dx * w == pytest.approx(4)
    assert image.dy * h == pytest.approx(3)
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis.scaleratio == 1
    assert fig.layout.title.text == "a map"
    assert len(marks.x) == int((values > 0.5).sum())


def test_token_maps_thumbnails_downsampled_and_values_rounded():
    maps = [rng.random(16) for _ in range(5)]
    fig = plot.token_maps(maps, [_img(224, 224) for _ in maps], titles=[f"image {i}" for i in range(5)],
                          title="maps", cols=3)
    images = [t for t in fig.data if t.type == "image"]
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert len(images) == len(heats) == 5
    assert max(_decode(images[0].source).size) == plot.THUMB_SIDE
    assert sum(bool(h.showscale) for h in heats) == 1  # one shared colour bar
    z = np.asarray(heats[0].z, dtype=np.float64)
    assert np.allclose(z, np.round(z, plot.DECIMALS), atol=1e-6) and not np.allclose(z, maps[0].reshape(4, 4))
    for i in range(1, 6):  # every subplot square
        suffix = "" if i == 1 else str(i)
        assert fig.layout[f"yaxis{suffix}"].scaleanchor == f"x{suffix}"
    assert [a.text for a in fig.layout.annotations][:5] == [f"image {i}" for i in range(5)]


def test_token_maps_refuses_mismatch():
    with pytest.raises(ValueError, match="titles"):
        plot.token_maps([rng.random(16)], titles=["a", "b"], title="t")
    with pytest.raises(ValueError, match="square grid"):
        plot.token_map(rng.random(15), title="t")
    with pytest.raises(ValueError, match="uint8"):
        plot.image_source(rng.random((8, 8, 3)))


def test_token_labels_follow_model_order():
    cfg = HookedViTConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=16, n_classes=3, img_size=8, patch_size=4,
                          n_reg_tokens=2)
    labels = plot.token_labels(cfg)
    assert labels == ["cls", "reg_0", "reg_1", "patch (0, 0)", "patch (0, 1)", "patch (1, 0)", "patch (1, 1)"]
    assert plot.token_labels((1, 2), class_token=True, distilled=True) == ["cls", "dist", "patch (0, 0)", "patch (0, 1)"]


def test_attention_view_per_head_and_mean():
    heads, n = 3, 1 + 16
    pattern = rng.random((heads, n, n))
    pattern /= pattern.sum(-1, keepdims=True)
    fig = plot.attention_view(pattern, 0, _img(), n_prefix=1, head=2)
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert np.allclose(np.asarray(heat.z, float).ravel(), pattern[2, 0, 1:], atol=1e-3)
    assert "cls" in fig.layout.title.text and "head 2" in fig.layout.title.text
    mean = plot.attention_view(pattern, 5, n_prefix=1)
    heat = next(t for t in mean.data if t.type == "heatmap")
    assert np.allclose(np.asarray(heat.z, float).ravel(), pattern[:, 5, 1:].mean(0), atol=1e-3)
    assert "patch (1, 0)" in mean.layout.title.text and "mean over heads" in mean.layout.title.text
    with pytest.raises(ValueError, match="head 3"):
        plot.attention_view(pattern, 0, n_prefix=1, head=3)


def test_logit_lens_grid_names_top_class():
    cfg = HookedViTConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=16, n_classes=3, img_size=8, patch_size=4,
                          class_names=("goldfish, Carassius auratus", "shark", "hen"))
    top = rng.integers(0, 3, (2, 5))
    fig = plot.logit_lens_grid(rng.random((2, 5)), top, token_names=plot.token_labels(cfg), classes=cfg,
                               title="lens")
    heat = fig.data[0]
    assert np.asarray(heat.z).shape == (2, 5) and list(heat.x) == plot.token_labels(cfg)
    names = ["goldfish (0)", "shark (1)", "hen (2)"]
    assert [list(r) for r in heat.text] == [[names[c] for c in row] for row in top]
    assert "top class" in heat.hovertemplate
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text == "layer"


def test_layer_curves_chance_per_run_and_one_colour_per_method():
    curves = {"A · positive": ([0, 1], [0.1, 0.2]), "A · negative": ([0, 1], [0.3, 0.4]),
              "B · positive": ([0, 1], [0.5, 0.6])}
    groups = {"A · positive": "A", "A · negative": "A", "B · positive": "B"}
    chance = {"A": chance_identifiability(10), "B": chance_identifiability(1000)}
    fig = plot.layer_curves(curves, title="t", yaxis_title="y", groups=groups, chance=chance,
                             dashes={"A · negative": "dash"})
    a_pos, a_neg, b_pos = fig.data
    assert a_pos.line.color == a_neg.line.color != b_pos.line.color
    assert a_neg.line.dash == "dash" and a_pos.line.dash == "solid"
    ys = sorted(s.y0 for s in fig.layout.shapes)
    assert ys == pytest.approx([0.5005, 0.55])
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text == "y"


def test_chance_identifiability_is_the_mean_of_uniform_ranks():
    for c in (2, 10, 1000):
        assert chance_identifiability(c) == pytest.approx(identifiability(np.arange(c), c).mean())
    with pytest.raises(ValueError):
        chance_identifiability(0)


def test_position_heatmap_labels_and_symmetric_scale():
    z = rng.normal(size=(3, 5))
    names = plot.token_labels((2, 2))
    fig = plot.position_heatmap(z, token_names=names, row_names=["block 0", "block 1", "block 2"], title="patching",
                                colorbar_title="logit difference recovered")
    heat = fig.data[0]
    assert list(heat.x) == names and heat.zmin == -heat.zmax and heat.zmax == pytest.approx(np.abs(z).max(), abs=1e-3)
    assert fig.layout.title.text == "patching" and fig.layout.xaxis.title.text == "token position"
    with pytest.raises(ValueError, match="names give"):
        plot.position_heatmap(z, token_names=names[:2], row_names=["a"] * 3, title="t", colorbar_title="c")


def test_method_colors_random_is_grey():
    colors = plot.method_colors(["rollout", "random", "gradcam", "rollout"])
    assert colors["random"] == plot.GREY and len(set(colors.values())) == 3


def test_circuit_graph_draws_each_kept_edge_with_its_sign():
    import pandas as pd

    from circuits.plot import circuit_graph

    edges = pd.DataFrame({"upstream": ["embed", "L0H1", "L1H0", "MLP0"],
                          "downstream": ["L0H1.q", "logits", "logits", "L1H0.v"],
                          "score": [0.5, -1.0, 2.0, 0.1], "in_circuit": [True, True, True, False]})
    fig = circuit_graph(edges, title="circuit", n_heads=2)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 3  # the edge outside the circuit is not drawn
    colors = {t.text.split(":")[0]: t.line.color for t in lines}
    assert colors["L0H1 -> logits"] != colors["L1H0 -> logits"]  # sign shown by colour
    widths = {t.text.split(":")[0]: t.line.width for t in lines}
    assert widths["L1H0 -> logits"] > widths["embed -> L0H1.q"]  # |score| by width
    nodes = [t for t in fig.data if t.mode == "markers+text"][0]
    xs = dict(zip(nodes.text, nodes.x))
    assert xs["embed"] < xs["L0H1"] < xs["L1H0"] < xs["logits"] and "MLP0" not in xs
    assert fig.layout.title.text == "circuit"
    with pytest.raises(ValueError, match="no edges"):
        circuit_graph(edges.assign(in_circuit=False), title="empty")
