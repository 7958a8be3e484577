"""A self-contained HTML report with plotly figures, built from run directories.

Each run directory carries a manifest naming its analysis; the section module that owns the
analysis (`circuits.report.<section>`: `ANALYSES` and `report_section(runs)`) turns its
runs into HTML fragments. plotly.js is embedded once, so the file opens offline.
"""

from __future__ import annotations

from html import escape  # (the name `html` is the circuits.report.html submodule here)
from pathlib import Path
from typing import Callable, Iterable

from tqdm.auto import tqdm

from circuits.report import circuit, decompose, explain, identify, memories, perturb, sae, textspan
from circuits.report.html import figure_html, page, table_html
from circuits.runs.results import atomic_write_text, has_results, read_manifest
from hooked_vit.errors import UserError

Section = Callable[..., list[str]]  # report_section(runs: dict[str, Path], images: int) -> list[str]
SECTIONS = (identify, perturb, memories, decompose, textspan, explain, circuit, sae)  # the report's order

__all__ = ["build_report", "find_runs", "sections", "figure_html", "table_html"]


def sections() -> dict[str, Section]:
    """analysis name -> renderer, in the report's order."""
    return {a: m.report_section for m in SECTIONS for a in m.ANALYSES}


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


def build_report(paths: Iterable[str | Path], out: str | Path, title: str = "hooked-vit report",
                 images: int = 8, progress: bool = True) -> Path:
    """One self-contained HTML file over the runs under ``paths``.

    images: how many images each per-image figure draws (a sample; the rest enter the summaries
    only), which bounds the report's size whatever the number of images in the runs.
    """
    if images < 1:
        raise UserError(f"images must be >= 1 (images drawn per per-image figure), got {images}")
    out = check_report_path(out)  # before the work, not after it
    runs = find_runs(paths)
    by_analysis: dict[str, dict[str, Path]] = {}
    empty = []
    for label, run in runs.items():
        manifest = read_manifest(run)
        if not manifest["done"] and not manifest["skipped"] and not has_results(run):
            empty.append(label)  # stopped before its first batch: nothing to show
            continue
        analysis = manifest["settings"].get("analysis", "unknown")
        by_analysis.setdefault(analysis, {})[label] = run
    body: list[str] = []
    todo = [(section, {label: run for a in section.ANALYSES for label, run in by_analysis.get(a, {}).items()})
            for section in SECTIONS]  # once per section, with the runs of all its analyses
    todo = [(section, mine) for section, mine in todo if mine]
    for section, mine in tqdm(todo, desc=f"report -> {out}", unit="section", disable=not progress):
        body += section.report_section(mine, images=images)
    if empty:
        body.append(f"<p>Runs without results yet (not shown): {escape(', '.join(empty))}.</p>")
    for analysis in set(by_analysis) - set(sections()):
        body.append(f"<p>No renderer for analysis {escape(analysis)} ({', '.join(by_analysis[analysis])}).</p>")
    atomic_write_text(out, page(title, body))
    return out


def check_report_path(out: str | Path) -> Path:
    """The report's file path, refused when it cannot be written: a folder (name the file in
    it), or a path whose parent is a file."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the report's file name, e.g. --out {out / 'report.html'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a folder; choose another path for the report")
            break
    return out
