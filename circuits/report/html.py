"""HTML pieces of the report: a figure's div, a table, the self-contained page."""

from __future__ import annotations

import html
import json
import re

import plotly.graph_objects as go
import plotly.io as pio


def figure_html(fig: go.Figure) -> str:
    """A figure's div; the page embeds plotly.js, the plotly template and the thumbnails once.

    The template (~7 kB of styling per figure) is left out here and applied by ``hvPlot`` in the
    page's head, which is ``Plotly.newPlot`` with that template as the layout's default."""
    fig = go.Figure(fig)
    title = fig.layout.title.text or ""
    fig.layout.template = None
    div = fig.to_html(full_html=False, include_plotlyjs=False, default_height=420)
    div = div.replace("Plotly.newPlot(", "hvPlot(", 1)
    return f"<div class='figure' data-title='{html.escape(title, quote=True)}'>{div}</div>"


def table_html(rows: list[dict], caption: str = "") -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def page(title: str, body: list[str]) -> str:
    """The whole HTML document, plotly.js inlined so the file opens offline."""
    from plotly.offline import get_plotlyjs

    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}caption{font-weight:600;text-align:left}h2{border-bottom:1px solid #ddd}")
    shared, body_html = share_images("".join(body))
    template = json.dumps(pio.templates[pio.templates.default].to_plotly_json(), separators=(",", ":"))
    plot = ("const HV_TEMPLATE=" + template + ";function hvPlot(id,data,layout,config){"
            "return Plotly.newPlot(id,data,Object.assign({template:HV_TEMPLATE},layout),config);}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style><script>{get_plotlyjs()}</script><script>{plot}{shared}</script></head>"
            f"<body><h1>{html.escape(title)}</h1>{body_html}</body></html>")


# plotly's to_html writes "/" as \u002f inside its script (safe JSON for HTML)
IMAGE_URI = re.compile(r'"(data:image(?:/|\\u002f)(?:png|jpeg);base64,(?:[A-Za-z0-9+=/]|\\u002f)+)"')


def share_images(body: str) -> tuple[str, str]:
    """Embed every thumbnail once: the figures' image data URIs (JS string literals in their
    Plotly.newPlot calls) become references into one array defined in the page's head.

    Returns (the script defining the array, the body with references)."""
    uris: dict[str, int] = {}

    def ref(match: re.Match) -> str:
        uri = match.group(1).replace("\\u002f", "/")
        return f"HV_IMAGES[{uris.setdefault(uri, len(uris))}]"

    body = IMAGE_URI.sub(ref, body)
    return "const HV_IMAGES=" + json.dumps(list(uris)) + ";", body


def figure_sizes(report_html: str) -> list[tuple[str, int]]:
    """(title, bytes) of every figure's div in a report: what it costs beside plotly.js and the
    shared thumbnails (``shared_size``)."""
    sizes = []
    for div in re.finditer(r"<div class='figure' data-title='([^']*)'>.*?</script>", report_html, flags=re.S):
        sizes.append((html.unescape(div.group(1)), len(div.group(0).encode())))
    return sizes


def shared_size(report_html: str) -> int:
    """Bytes of the page's shared template and thumbnails (one script in its head)."""
    match = re.search(r"<script>(const HV_TEMPLATE=.*?)</script>", report_html, flags=re.S)
    return len(match.group(1).encode()) if match else 0
