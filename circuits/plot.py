"""Figures of the analyses: plain functions returning plotly figures, shared by the report and
the notebooks (https://plotly.com/python/reference/).

Token maps are drawn over their image: the image is a compact PNG thumbnail (``go.Image``
with a ``source`` data URI, https://plotly.com/python/reference/image/#image-source), the
map a translucent heatmap with one square cell per patch, on axes locked to a 1:1 aspect
(``scaleanchor``, https://plotly.com/python/reference/layout/yaxis/#layout-yaxis-scaleanchor).
Values are rounded before they are embedded, so a figure carries no float64 noise digits.
"""

from __future__ import annotations

import base64
import io
from typing import Mapping, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int, UInt8
from plotly.subplots import make_subplots

from circuits.data.classes import class_name
from hooked_vit.tokens import token_grid, token_labels
from hooked_vit.errors import UserError

DECIMALS = 3  # digits kept in embedded maps: a colour scale cannot show more
THUMB_SIDE = 96  # longest side of an embedded thumbnail, in pixels
# One colour per method / run (plotly's qualitative "Plotly" palette); line style carries direction.
PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880",
           "#ff97ff", "#fecb52")
GREY = "#7f7f7f"


# ------------------------------------------------------------------ shared pieces
def quantise(values, decimals: int = DECIMALS) -> np.ndarray:
    """Values rounded to ``decimals`` digits (float32 for smaller JSON); NaN stays NaN."""
    return np.round(np.asarray(values, dtype=np.float64), decimals).astype(np.float32)


def image_source(rgb: UInt8[np.ndarray, "h w 3"], max_side: int = THUMB_SIDE) -> str:
    """A uint8 RGB image as a downsampled PNG / JPEG data URI (what ``go.Image(source=...)`` takes)."""
    return _thumbnail(rgb, max_side)[0]


def _thumbnail(rgb, max_side: int) -> tuple[str, tuple[int, int]]:
    """Data URI of the downsampled image (PNG up to 64 x 64 pixels, JPEG above), and its (width, height)."""
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise UserError(f"image must be uint8 [height, width, 3], got {rgb.dtype} {list(rgb.shape)}; "
                         "convert with (x * 255).round().astype(np.uint8)")
    img = Image.fromarray(rgb)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), getattr(Image, "Resampling", Image).LANCZOS)  # Pillow < 9.1: no enum
    buf = io.BytesIO()
    if img.size[0] * img.size[1] <= 64 * 64:  # small images: lossless, and PNG is as small as JPEG
        img.save(buf, format="PNG", optimize=True)
        kind = "png"
    else:  # photographs: JPEG is ~5x smaller than PNG at no visible cost under a map
        img.save(buf, format="JPEG", quality=85)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.size


def display_rgb(model, images: Float[torch.Tensor, "batch 3 height width"]) -> UInt8[np.ndarray, "batch height width 3"]:
    """Preprocessed images back to uint8 RGB for display, the model's normalisation undone
    (its ``data_config`` mean / std; ImageNet's when it has none)."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from circuits.data import denormalize

    dc = getattr(getattr(model, "cfg", model), "data_config", None) or {}
    rgb = denormalize(images.detach().float().cpu(), dc.get("mean", IMAGENET_DEFAULT_MEAN),
                      dc.get("std", IMAGENET_DEFAULT_STD))
    return (rgb.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def method_colors(names: Sequence[str]) -> dict[str, str]:
    """One colour per name, stable in order; names starting with "random" are grey (a baseline)."""
    colors, i = {}, 0
    for name in dict.fromkeys(names):
        if str(name).startswith("random"):
            colors[name] = GREY
        else:
            colors[name] = PALETTE[i % len(PALETTE)]
            i += 1
    return colors


def class_label(classes, class_id: int) -> str:
    """"name (id)" when the model has class names, else the id."""
    name = class_name(classes, class_id)
    return str(class_id) if name == str(int(class_id)) else f"{name} ({int(class_id)})"


def _square_axes(fig: go.Figure, row: int | None = None, col: int | None = None) -> None:
    """Lock one subplot's axes to 1:1 (square patches), image orientation (row 0 on top), no ticks."""
    xaxis = fig.get_subplot(row, col).xaxis if row is not None else fig.layout.xaxis
    anchor = xaxis.plotly_name.replace("axis", "")  # "x", "x2", ...
    kw = dict(row=row, col=col) if row is not None else {}
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain", **kw)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, scaleanchor=anchor, scaleratio=1,
                     autorange="reversed", constrain="domain", **kw)


# ------------------------------------------------------------------ token maps
def add_token_map(fig: go.Figure, values: Float[np.ndarray, "n_patches"], image=None, *, row=None, col=None,
                  grid=None, zmin=None, zmax=None, colorscale="Viridis", colorbar_title: str = "",
                  showscale: bool = True, outline: Optional[Bool[np.ndarray, "n_patches"]] = None,
                  opacity: float = 0.6, hover: str = "value", max_side: int = THUMB_SIDE) -> None:
    """Draw one token map (its image under it when given) into a figure or one of its subplots.

    The map spans the image: cell (r, c) covers patch (r, c) whatever the thumbnail's resolution.
    ``outline``: per-patch flags (e.g. object tokens) drawn as open squares.
    """
    values = np.asarray(values)
    rows, cols = token_grid(values.size, grid)
    z = quantise(values.reshape(rows, cols))
    kw = dict(row=row, col=col) if row is not None else {}
    if image is not None:
        src, (w, h) = _thumbnail(image, max_side)
        # Stretched over the grid's extent: one patch = one unit on both axes; x0 is a pixel's centre.
        dx, dy = cols / w, rows / h
        fig.add_trace(go.Image(source=src, x0=dx / 2, y0=dy / 2, dx=dx, dy=dy, hoverinfo="skip"), **kw)
    cb = dict(title=dict(text=colorbar_title, side="right"), thickness=12)
    fig.add_trace(go.Heatmap(z=z, x0=0.5, dx=1, y0=0.5, dy=1, zmin=zmin, zmax=zmax, colorscale=colorscale,
                             opacity=opacity if image is not None else 1.0, showscale=showscale, colorbar=cb,
                             hovertemplate=f"patch (%{{y}}, %{{x}})<br>{hover} %{{z}}<extra></extra>"), **kw)
    if outline is not None:
        r, c = np.nonzero(np.asarray(outline).reshape(rows, cols))
        fig.add_trace(go.Scatter(x=c + 0.5, y=r + 0.5, mode="markers", hoverinfo="skip", showlegend=False,
                                 marker=dict(symbol="square-open", color="red", size=8, line=dict(width=1.5))), **kw)
    _square_axes(fig, row, col)
    fig.update_xaxes(range=[0, cols], **kw)
    fig.update_yaxes(range=[rows, 0], **kw)


def token_map(values: Float[np.ndarray, "n_patches"], image=None, *, title: str, grid=None, zmin=None, zmax=None,
              colorscale="Viridis", colorbar_title: str = "", outline=None, opacity: float = 0.6,
              size: int = 360) -> go.Figure:
    """One token map over its image, square patches, with a colour bar."""
    fig = go.Figure()
    add_token_map(fig, values, image, grid=grid, zmin=zmin, zmax=zmax, colorscale=colorscale,
                  colorbar_title=colorbar_title, outline=outline, opacity=opacity)
    fig.update_layout(title=title, height=size, width=size + 80, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def token_maps(maps: Sequence[np.ndarray], images: Optional[Sequence] = None, *, titles: Sequence[str], title: str,
               grid=None, zmin=None, zmax=None, colorscale="Viridis", colorbar_title: str = "",
               outlines: Optional[Sequence] = None, cols: int = 4, cell: int = 200, opacity: float = 0.6,
               symmetric: bool = False, max_width: int = 1150) -> go.Figure:
    """Several token maps in a grid of subplots, each over its image; one shared colour bar.

    symmetric: a diverging scale centred on 0 (zmin = -zmax = the largest |value|).
    """
    n = len(maps)
    if n == 0:
        raise UserError("token_maps needs at least one map")
    if len(titles) != n or (images is not None and len(images) != n):
        raise UserError(f"{n} maps need {n} titles and {n} images (got {len(titles)}, "
                         f"{'none' if images is None else len(images)})")
    if symmetric:
        lim = float(np.nanmax([np.nanmax(np.abs(m)) for m in maps])) or 1.0
        zmin, zmax = -lim, lim
    elif zmin is None or zmax is None:
        zmin = float(np.nanmin([np.nanmin(m) for m in maps])) if zmin is None else zmin
        zmax = float(np.nanmax([np.nanmax(m) for m in maps])) if zmax is None else zmax
    cols = min(cols, n)
    rows = -(-n // cols)
    cell = min(cell, (max_width - 140) // cols)  # the report's column: nothing cut on the right
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles), horizontal_spacing=0.03,
                        vertical_spacing=0.08 / max(rows, 1) + 0.04)
    for i, m in enumerate(maps):
        add_token_map(fig, m, None if images is None else images[i], row=i // cols + 1, col=i % cols + 1, grid=grid,
                      zmin=zmin, zmax=zmax, colorscale=colorscale, colorbar_title=colorbar_title,
                      showscale=i == 0, outline=None if outlines is None else outlines[i], opacity=opacity)
    fig.update_annotations(font_size=11)
    top = 80 + 25 * title.count("<br>")  # a subtitle must not run into the first row's titles
    fig.update_layout(title=title, height=cell * rows + top + 10, width=cell * cols + 140,
                      margin=dict(l=10, r=10, t=top, b=10))
    return fig


# ------------------------------------------------------------------ attention
def attention_view(pattern: Float[np.ndarray, "heads query key"], query: int, image=None, *, n_prefix: int,
                   grid=None, head: Optional[int] = None, title: str = "", labels: Optional[Sequence[str]] = None
                   ) -> go.Figure:
    """Attention of one query token over the image patches, for one head or averaged over heads.

    ``pattern``: one image's attention probabilities of one layer (``blocks.{l}.attn.hook_pattern``
    without the batch axis). The share of attention on the prefix tokens is given in the title.
    """
    pattern = np.asarray(pattern)
    if pattern.ndim != 3 or pattern.shape[1] != pattern.shape[2]:
        raise UserError(f"pattern must be [heads, query, key], got {list(pattern.shape)}")
    if not 0 <= query < pattern.shape[1]:
        raise UserError(f"query {query} is outside the {pattern.shape[1]} tokens")
    if head is not None and not 0 <= head < pattern.shape[0]:
        raise UserError(f"head {head} is outside the {pattern.shape[0]} heads")
    row = pattern[:, query].mean(0) if head is None else pattern[head, query]
    names = labels or token_labels(token_grid(row.size - n_prefix, grid), n_prefix > 0, max(n_prefix - 1, 0))
    who = "mean over heads" if head is None else f"head {head}"
    prefix = ", ".join(f"{names[i]} {row[i]:.2f}" for i in range(n_prefix))
    title = title or f"Attention of {names[query]} over the image ({who})"
    fig = token_map(row[n_prefix:], image, title=f"{title}<br><sup>on prefix tokens: {prefix or 'none'}</sup>",
                    grid=grid, zmin=0, zmax=float(row[n_prefix:].max()) or 1.0, colorscale="Inferno",
                    colorbar_title="attention")
    return fig


# ------------------------------------------------------------------ video: maps over a clip's frames
def split_frames(frames, n: int, num_frames: Optional[int] = None) -> list[np.ndarray]:
    """A clip's frames as a list of ``n`` uint8 RGB images, one per time position: ``frames`` is
    [F, H, W, 3] or a strip of F frames left to right [H, F * W, 3] (a video run's thumbnail;
    ``num_frames`` = F, by default width // height: square frames). With F > n (tubelets) time
    position t shows the first frame of its tubelet, frame t * F // n."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        h, w, _ = frames.shape
        count = int(num_frames) if num_frames is not None else max(w // h, 1)
        if w % count:
            raise UserError(f"a strip of width {w} does not hold {count} equal frames; give num_frames")
        frames = np.stack(np.split(frames, count, axis=1))
    if frames.ndim != 4 or frames.shape[0] % n:
        raise UserError(f"frames must be [F, H, W, 3] or a strip [H, F * W, 3] with F a multiple of the {n} time "
                         f"positions, got {list(frames.shape)}")
    step = frames.shape[0] // n
    return [frames[t * step] for t in range(n)]


def frame_strip(values: Float[np.ndarray, "... time rows cols"], frames=None, *, title: str,
                time_names: Optional[Sequence[str]] = None, clip_names: Optional[Sequence[str]] = None,
                zmin=None, zmax=None, colorscale="Viridis", colorbar_title: str = "",
                outlines: Optional[np.ndarray] = None, symmetric: bool = False, cell: int = 160,
                opacity: float = 0.6, num_frames: Optional[int] = None) -> go.Figure:
    """Token maps of a clip over its time positions: one row of panels (small multiples), each
    map over its frame, one shared colour scale; several clips [n, T, rows, cols] give one row each.

    values: per patch token [T, rows, cols] (or [n, T, rows, cols]); a video model's patch
    tokens reshape to it as ``values[n_prefix:].reshape(T, rows, cols)`` (time slowest).
    frames: per clip [F, H, W, 3] uint8, or the strip [H, F * W, 3] a video run keeps
    (`split_frames`: time position t over frame t * F // T, ``num_frames`` = F for a strip of
    frames that are not square); a list with one per clip.
    outlines: per patch flags of the same shape as ``values`` (e.g. object tokens).
    """
    values = np.asarray(values)
    if values.ndim == 3:
        values, frames = values[None], None if frames is None else [frames]
        outlines = None if outlines is None else np.asarray(outlines)[None]
    if values.ndim != 4:
        raise UserError(f"values must be [time, rows, cols] or [clips, time, rows, cols], got {list(values.shape)}")
    n, t, rows, cols = values.shape
    if frames is not None and len(frames) != n:
        raise UserError(f"{n} clips need {n} frame sets, got {len(frames)}")
    names = list(time_names or [f"t{i}" for i in range(t)])
    clips = list(clip_names or ([""] * n))
    if len(names) != t or len(clips) != n:
        raise UserError(f"{t} time positions and {n} clips need as many names (got {len(names)}, {len(clips)})")
    images = None if frames is None else [img for clip in frames for img in split_frames(clip, t, num_frames)]
    titles = [f"{c} · {name}" if c else name for c in clips for name in names]
    flat = [values[i, j].ravel() for i in range(n) for j in range(t)]
    lines = None if outlines is None else [np.asarray(outlines)[i, j].ravel() for i in range(n) for j in range(t)]
    return token_maps(flat, images, titles=titles, title=title, grid=(rows, cols), zmin=zmin, zmax=zmax,
                      colorscale=colorscale, colorbar_title=colorbar_title, outlines=lines, cols=t, cell=cell,
                      opacity=opacity, symmetric=symmetric)


def attention_across_frames(pattern: Float[np.ndarray, "heads query key"] | Float[np.ndarray, "key"], query: int,
                            frames=None, *, n_prefix: int, n_time: int, grid: tuple[int, int],
                            head: Optional[int] = None, labels: Optional[Sequence[str]] = None, title: str = "",
                            num_frames: Optional[int] = None) -> go.Figure:
    """Attention of one query token over every frame's patches (a joint space-time model), one
    panel per time position with the share of attention each frame gets in its title.

    pattern: one clip's attention of one layer (``blocks.{l}.attn.hook_pattern[i]``, [heads,
    P, P]), or the query's row [P] already taken (one head or the head mean; a video identify
    run's attention table). A divided space-time model attends within a frame in ``attn`` and
    over time in ``attn_time`` (docs/video.md); its grouped patterns are not this layout and are refused.
    """
    pattern = np.asarray(pattern)
    rows, cols = int(grid[0]), int(grid[1])
    size = n_prefix + n_time * rows * cols
    if not ((pattern.ndim == 3 and pattern.shape[1:] == (size, size)) or pattern.shape == (size,)):
        raise UserError(f"pattern must be one clip's joint attention [heads, {size}, {size}] or one query's row "
                         f"[{size}] ({n_prefix} prefix + {n_time} x {rows} x {cols} patch tokens), got "
                         f"{list(pattern.shape)}; a divided space-time model's patterns are grouped by frame / position")
    if not 0 <= query < size:
        raise UserError(f"query {query} is outside the {size} tokens")
    if pattern.ndim == 1:
        if head is not None:
            raise UserError("head selects a head of a [heads, query, key] pattern; this is one query's row")
        row, who = pattern, "one row"
    else:
        if head is not None and not 0 <= head < pattern.shape[0]:
            raise UserError(f"head {head} is outside the {pattern.shape[0]} heads")
        row = pattern[:, query].mean(0) if head is None else pattern[head, query]
        who = "mean over heads" if head is None else f"head {head}"
    per_time = row[n_prefix:].reshape(n_time, rows, cols)
    names = list(labels) if labels is not None else [str(i) for i in range(size)]
    prefix = ", ".join(f"{names[i]} {row[i]:.2f}" for i in range(n_prefix))
    title = title or f"Attention of {names[query]} across the frames ({who})"
    shares = per_time.reshape(n_time, -1).sum(1)
    return frame_strip(per_time, frames, title=f"{title}<br><sup>on prefix tokens: {prefix or 'none'}</sup>",
                       time_names=[f"t{t}: {shares[t]:.2f}" for t in range(n_time)], zmin=0,
                       zmax=float(per_time.max()) or 1.0, colorscale="Inferno", colorbar_title="attention",
                       num_frames=num_frames)


def per_time_curves(values: Float[np.ndarray, "layers time"], *, title: str, yaxis_title: str = "mean identifiability",
                    layer_names: Optional[Sequence] = None, chance: Optional[float] = None,
                    yaxis_range=None) -> go.Figure:
    """Per-frame curves: a value per time position (e.g. identifiability of its patch tokens,
    `circuits.video.per_time`) over the layers, one line per time position, early frames light."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise UserError(f"values must be [layers, time], got {list(values.shape)}")
    layers, t = values.shape
    x = list(layer_names) if layer_names is not None else list(range(layers))
    if len(x) != layers:
        raise UserError(f"{layers} layers need {layers} layer names, got {len(x)}")
    from plotly.colors import sample_colorscale

    shades = sample_colorscale("Viridis", [0.85 * i / max(t - 1, 1) for i in range(t)])
    curves = {f"t{i}": (x, values[:, i]) for i in range(t)}
    return layer_curves(curves, title=title, xaxis_title="block", yaxis_title=yaxis_title, chance=chance,
                        colors={name: shades[i] for i, name in enumerate(curves)}, yaxis_range=yaxis_range)


# ------------------------------------------------------------------ logit lens
def logit_lens_grid(score: Float[np.ndarray, "layers tokens"], top_class: Int[np.ndarray, "layers tokens"], *,
                    token_names: Sequence[str], classes=None, title: str, colorbar_title: str = "identifiability",
                    zmin=0.0, zmax=1.0, layer_names: Optional[Sequence[str]] = None) -> go.Figure:
    """Layers x tokens heatmap of a score (e.g. identifiability); hover names each cell's top class.

    ``classes``: a HookedViT, its config or ``ModelClasses`` for class names (ids otherwise).
    """
    score, top_class = np.asarray(score), np.asarray(top_class)
    if score.shape != top_class.shape or score.shape[1] != len(token_names):
        raise UserError(f"score {list(score.shape)}, top_class {list(top_class.shape)} and "
                         f"{len(token_names)} token names must agree as [layers, tokens]")
    names = {int(c): class_label(classes, int(c)) for c in np.unique(top_class)}
    text = [[names[int(c)] for c in row] for row in top_class]
    layers = list(layer_names or [f"block {i}" for i in range(score.shape[0])])
    fig = go.Figure(go.Heatmap(z=quantise(score), x=list(token_names), y=layers, text=text, zmin=zmin, zmax=zmax,
                               colorscale="Viridis", colorbar=dict(title=dict(text=colorbar_title, side="right")),
                               hovertemplate="%{y} · %{x}<br>top class: %{text}<br>"
                                             f"{colorbar_title} %{{z}}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="token position", yaxis_title="layer", height=230 + 24 * len(layers),
                      margin=dict(b=110))
    fig.update_yaxes(dtick=1)  # every layer named
    fig.update_xaxes(tickangle=-60, automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


# ------------------------------------------------------------------ curves
def layer_curves(curves: Mapping[str, tuple[Sequence, Sequence]], *, title: str, xaxis_title: str = "layer",
                 yaxis_title: str, chance: Optional[float | Mapping[str, float]] = None,
                 colors: Optional[Mapping[str, str]] = None, dashes: Optional[Mapping[str, str]] = None,
                 groups: Optional[Mapping[str, str]] = None, yaxis_range=None) -> go.Figure:
    """Per-layer curves, one trace per name; ``chance``: one line, or one per group (each run's own).

    ``groups`` maps a curve to its run / method (its colour, and its chance line); ``dashes`` gives
    the line style (e.g. direction or token kind).
    """
    groups = dict(groups or {name: name for name in curves})
    colors = dict(colors or method_colors(list(dict.fromkeys(groups.values()))))
    fig = go.Figure()
    for name, (x, y) in curves.items():
        g = groups.get(name, name)
        fig.add_scatter(x=list(x), y=quantise(y).tolist(), name=name, mode="lines+markers", legendgroup=g,
                        line=dict(color=colors.get(g), dash=(dashes or {}).get(name, "solid")))
    lines = {"": chance} if isinstance(chance, (int, float)) else dict(chance or {})
    for g, value in lines.items():
        label = f"chance {g} ({value:.3g})".replace("  ", " ") if g else f"chance ({value:.3g})"
        fig.add_hline(y=value, line=dict(color=colors.get(g, GREY), dash="dot", width=1),
                      annotation_text=label, annotation_position="bottom right")
    fig.update_layout(title=title, xaxis_title=xaxis_title, yaxis_title=yaxis_title, legend=dict(font_size=11),
                      margin=dict(r=20))
    if yaxis_range is not None:
        fig.update_yaxes(range=yaxis_range)
    return fig


# ------------------------------------------------------------------ patching / attribution
def position_heatmap(z: Float[np.ndarray, "rows tokens"], *, token_names: Sequence[str], row_names: Sequence[str],
                     title: str, colorbar_title: str, yaxis_title: str = "layer", symmetric: bool = True
                     ) -> go.Figure:
    """A rows (layers, heads, ...) x token positions heatmap (activation patching, attribution).

    symmetric: a diverging red-blue scale centred on 0 (patching effects have a sign).
    """
    z = np.asarray(z)
    if z.shape != (len(row_names), len(token_names)):
        raise UserError(f"z is {list(z.shape)}, names give [{len(row_names)}, {len(token_names)}]")
    kw = {}
    if symmetric:
        lim = float(np.nanmax(np.abs(z))) or 1.0
        kw = dict(zmin=-lim, zmax=lim, colorscale="RdBu", reversescale=True)
    fig = go.Figure(go.Heatmap(z=quantise(z), x=list(token_names), y=list(row_names),
                               colorbar=dict(title=dict(text=colorbar_title, side="right")),
                               hovertemplate="%{y} · %{x}<br>" + colorbar_title + " %{z}<extra></extra>", **kw))
    fig.update_layout(title=title, xaxis_title="token position", yaxis_title=yaxis_title,
                      height=160 + 22 * len(row_names), margin=dict(b=110))
    fig.update_xaxes(tickangle=-60, automargin=True)
    fig.update_yaxes(automargin=True, autorange="reversed")
    return fig


def _circuit_node_xy(name: str, n_heads: int) -> tuple[float, float]:
    """Where a circuit-graph node sits: x runs with the layers (heads, then the MLP), y is the
    head index (MLPs above the heads; embedding and logits centred)."""
    base = name.split(".")[0]  # a head's q/k/v input is drawn at the head
    if base == "embed":
        return 0.0, (n_heads - 1) / 2
    if base == "logits":
        return -1.0, (n_heads - 1) / 2  # placed after the last layer by the caller
    if base.startswith("MLP"):
        return 2.0 * int(base[3:]) + 2, float(n_heads)
    layer, head = base[1:].split("H")
    return 2.0 * int(layer) + 1, float(head)


def circuit_graph(edges, *, title: str, n_heads: Optional[int] = None) -> go.Figure:
    """The kept edges of a circuit (`circuits.runs.circuit`'s edge table: upstream, downstream,
    score, in_circuit) as a layered graph: nodes by layer and head, one line per edge, width by
    |score|, red for edges that raise the metric and blue for those that lower it."""
    kept = edges[edges["in_circuit"]] if "in_circuit" in edges else edges
    if len(kept) == 0:
        raise UserError("the circuit keeps no edges: nothing to draw")
    names = [*kept["upstream"], *kept["downstream"]]
    if n_heads is None:
        heads = [int(n.split(".")[0].split("H")[1]) for n in names if n.startswith("L") and "H" in n]
        n_heads = max(heads, default=0) + 1
    last_x = max([_circuit_node_xy(n, n_heads)[0] for n in names] + [0.0]) + 1
    xy = {}
    for n in names:
        x, y = _circuit_node_xy(n, n_heads)
        xy[n.split(".")[0]] = (last_x if x < 0 else x, y)
    lim = float(np.abs(kept["score"]).max()) or 1.0
    fig = go.Figure()
    for u, d, s in zip(kept["upstream"], kept["downstream"], kept["score"]):
        (x0, y0), (x1, y1) = xy[u.split(".")[0]], xy[d.split(".")[0]]
        fig.add_scatter(x=[x0, x1], y=[y0, y1], mode="lines", showlegend=False, hoverinfo="text",
                        text=f"{u} -> {d}: {s:.3g}", line=dict(width=1 + 5 * abs(s) / lim,
                                                               color="#c0392b" if s > 0 else "#2e6fba"))
    nodes = sorted(xy, key=lambda n: xy[n])
    # Labels alternate above and below their node, so neighbours in a column do not overlap.
    positions = ["top center" if i % 2 == 0 else "bottom center" for i in range(len(nodes))]
    fig.add_scatter(x=[xy[n][0] for n in nodes], y=[xy[n][1] for n in nodes], mode="markers+text", text=nodes,
                    textposition=positions, marker=dict(size=10, color="#444"), showlegend=False,
                    hovertemplate="%{text}<extra></extra>", cliponaxis=False)
    layers = sorted({int((x - 1) // 2) for x, _ in xy.values() if 0 < x < last_x})  # head 2l+1, MLP 2l+2
    fig.update_layout(
        title=title, height=300 + 36 * n_heads, margin=dict(l=70, r=40, t=60, b=60),
        xaxis=dict(title="layer (heads, then its MLP)", tickvals=[2 * l + 1.5 for l in layers],
                   ticktext=[f"L{l}" for l in layers], zeroline=False, range=[-0.6, last_x + 0.6]),
        yaxis=dict(title="", tickvals=[*range(n_heads), n_heads], ticktext=[*(f"head {h}" for h in range(n_heads)), "MLP"],
                   zeroline=False, range=[-0.8, n_heads + 0.8]))
    return fig
