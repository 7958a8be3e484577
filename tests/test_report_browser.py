"""The demo report: its size (no figure over 1 MB, figure data under 2 MB, thumbnails under every
token map), and rendered in headless Chromium without console errors, one screenshot per section.

Chromium: ``apt-get install -y chromium`` (the project's setup). Screenshots go to
$HOOKED_VIT_SCREENSHOTS if set, else to the test's temporary directory.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from circuits.report import build_report
from circuits.report.html import figure_sizes, shared_size

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
TOKEN_MAPS = ("identifiability of every image token", "relevance maps", "head x token terms")
# Collect uncaught errors and console.error calls; written into the DOM once the page has loaded.
CATCH = ("<script>window.__hv=[];addEventListener('error',e=>__hv.push(String(e.message)));"
         "const __ce=console.error;console.error=(...a)=>{__hv.push(a.map(String).join(' '));__ce(...a)};"
         "addEventListener('load',()=>setTimeout(()=>{const p=document.createElement('pre');p.id='hv-errors';"
         "p.textContent=JSON.stringify(__hv);document.body.appendChild(p)},500));</script>")
SECTIONS = {"identify": ["identify"], "perturb": ["perturb"], "memories": ["memories", "probes"],
            "decompose": ["decompose"], "explain": ["explain"], "circuit": ["circuit"], "sae": ["sae"],
            "textspan": ["textspan"]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from circuits.report.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out, n=96, batch_size=48)
    return out, report


def test_demo_report_is_compact_and_maps_show_their_images(demo):
    out, report = demo
    text = report.read_text()
    sizes = figure_sizes(text)
    assert len(sizes) >= 15 and all(title for title, _ in sizes), sizes
    assert max(b for _, b in sizes) < 1_000_000
    assert sum(b for _, b in sizes) + shared_size(text) < 2_000_000
    divs = re.findall(r"<div class='figure' data-title='([^']*)'>(.*?)</script>", text, flags=re.S)
    maps = [(t, d) for t, d in divs if any(k in t for k in TOKEN_MAPS)]
    assert len(maps) >= 4, [t for t, _ in divs]
    for title, div in maps:
        n_images, n_heat = div.count("HV_IMAGES["), div.count('"type":"heatmap"')
        assert n_images == n_heat > 0, (title, n_images, n_heat)
    assert "red squares" not in text.lower() or "object tokens (from the dataset" in text  # only with masks
    assert "chance 0.55" in text  # 10 classes: 0.5 + 1 / 20, not 0.5


def _render(html_path: Path, shot: Path) -> tuple[str, str]:
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=8000", "--window-size=1300,5000"]
    dom = subprocess.run(base + ["--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120)
    subprocess.run(base + [f"--screenshot={shot}", html_path.as_uri()], capture_output=True, text=True, timeout=120)
    return dom.stdout, dom.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
def test_demo_report_renders_in_chromium_without_errors(demo, tmp_path):
    out, _ = demo
    shots = Path(os.environ.get("HOOKED_VIT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    for section, dirs in SECTIONS.items():
        page = build_report([out / d for d in dirs], tmp_path / f"{section}.html", title=f"demo: {section}")
        page.write_text(page.read_text().replace("<head>", "<head>" + CATCH, 1))
        dom, stderr = _render(page, shots / f"{section}.png")
        match = re.search(r'<pre id="hv-errors">(.*?)</pre>', dom, flags=re.S)
        assert match, f"{section}: the page did not finish loading: {stderr[-500:]}"
        errors = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        assert errors == [], f"{section}: console errors {errors}"
        n_figures = len(figure_sizes(page.read_text()))
        assert dom.count('class="main-svg"') >= n_figures > 0, f"{section}: not every figure was drawn"
        assert (shots / f"{section}.png").stat().st_size > 10_000
