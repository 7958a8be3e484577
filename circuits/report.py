"""A self-contained HTML report with plotly figures, built from run directories.

Each run directory carries a manifest naming its analysis; the command module that owns
the analysis (`circuits.commands.*`, `ANALYSES` and `report_section`) turns its runs into
HTML fragments. plotly.js is embedded once, so the file opens offline.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Iterable

import plotly.graph_objects as go

from circuits.results import atomic_write_text, read_manifest

Section = Callable[[dict[str, Path]], list[str]]


def sections() -> dict[str, Section]:
    """analysis name -> renderer, from every command module, in the modules' order."""
    from circuits.commands import command_modules

    return {a: m.report_section for m in command_modules() if hasattr(m, "report_section") for a in m.ANALYSES}


def find_runs(paths: Iterable[str | Path]) -> dict[str, Path]:
    """Run directories under the given paths (a path may be a run or hold runs), by label."""
    runs: dict[str, Path] = {}
    for path in map(Path, paths):
        manifests = [path / "manifest.json"] if (path / "manifest.json").exists() else sorted(path.rglob("manifest.json"))
        for manifest in manifests:
            run = manifest.parent
            label = str(run.relative_to(path)) if run != path else run.name
            runs[label] = run
    if not runs:
        raise FileNotFoundError(f"no results (manifest.json) under {[str(p) for p in paths]}")
    return runs


def build_report(paths: Iterable[str | Path], out: str | Path, title: str = "hooked-vit report") -> Path:
    runs = find_runs(paths)
    by_analysis: dict[str, dict[str, Path]] = {}
    for label, run in runs.items():
        analysis = read_manifest(run)["settings"].get("analysis", "unknown")
        by_analysis.setdefault(analysis, {})[label] = run
    body: list[str] = []
    renderers = sections()
    for analysis, render in renderers.items():
        if analysis in by_analysis:
            body += render(by_analysis[analysis])
    for analysis in set(by_analysis) - set(renderers):
        body.append(f"<p>No renderer for analysis {html.escape(analysis)} ({', '.join(by_analysis[analysis])}).</p>")
    out = Path(out)
    atomic_write_text(out, _page(title, body))
    return out


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


def _page(title: str, body: list[str]) -> str:
    from plotly.offline import get_plotlyjs

    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}caption{font-weight:600;text-align:left}h2{border-bottom:1px solid #ddd}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style><script>{get_plotlyjs()}</script></head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>")
