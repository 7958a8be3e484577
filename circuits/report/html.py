"""HTML pieces of the report: a figure's div, a table, the self-contained page."""

from __future__ import annotations

import html

import plotly.graph_objects as go


def figure_html(fig: go.Figure) -> str:
    """A figure's div; the page embeds plotly.js once, in its head."""
    return fig.to_html(full_html=False, include_plotlyjs=False, default_height=420)


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
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style><script>{get_plotlyjs()}</script></head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>")
