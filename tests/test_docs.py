"""Every ```python block of README.md and docs/*.md runs, page by page, on the embedded default.

Blocks of one page share a namespace (a page reads like a notebook) and run in a fresh
process in a temporary folder, so a page cannot lean on another page's state or on files
left by the test suite. The numbers a page quotes are checked by `assert` lines in its own
blocks, so a drifting figure fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return [textwrap.dedent(b) for b in BLOCK.findall(page.read_text())]


def test_block_extraction_finds_blocks():
    page = "text\n```python\nx = 1\n```\nmore\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    assert BLOCK.findall(page) == ["x = 1\n", "y = x + 1\n"]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_docs_page_runs(page: Path, tmp_path: Path):
    blocks = python_blocks(page)
    script = ["import torch", "torch.set_num_threads(2)", "torch.manual_seed(0)"]
    for i, block in enumerate(blocks):
        script.append(f"# --- block {i + 1} of {page.name}")
        script.append(block)
    (tmp_path / "page.py").write_text("\n".join(script))
    proc = subprocess.run([sys.executable, "page.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"{page.name}: a python block failed\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
