"""Imports point one way: commands -> report -> runs -> analyses -> hooked_vit (docs/architecture.md).

Every module's imports are read with `ast` (module level and inside functions alike).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = ("circuits.cli", "circuits.commands")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, runtime_only: bool = False) -> set[str]:
    """Modules a file imports; `runtime_only`: leaving out `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules(package: str) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted((ROOT / package).rglob("*.py"))}


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def offenders(mods: dict[str, set[str]], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    return {m: sorted(i for i in imps if under(i, *forbidden)) for m, imps in mods.items()
            if any(under(i, *forbidden) for i in imps)}


ALL = {**modules("hooked_vit"), **modules("circuits")}
LAYERS = ("circuits.runs", "circuits.report", *CLI)


def is_analysis(name: str) -> bool:
    return under(name, "circuits") and not under(name, *LAYERS) and name != "circuits"


def test_model_imports_nothing_from_circuits():
    assert offenders(modules("hooked_vit"), ("circuits",)) == {}


def test_only_the_command_line_imports_the_command_line():
    library = {m: i for m, i in ALL.items() if not under(m, *CLI)}
    assert offenders(library, CLI) == {}


def test_analyses_import_no_runs_report_or_commands():
    analyses = {m: i for m, i in ALL.items() if is_analysis(m)}
    assert len(analyses) > 20  # the walk found the analyses
    assert offenders(analyses, LAYERS) == {}


def test_runs_do_not_import_the_report():
    runs = {m: i for m, i in ALL.items() if under(m, "circuits.runs")}
    assert runs and offenders(runs, ("circuits.report", *CLI)) == {}


def test_report_does_not_import_commands():
    report = {m: i for m, i in ALL.items() if under(m, "circuits.report")}
    assert report and offenders(report, CLI) == {}


@pytest.mark.parametrize("source,expected", [
    ("from circuits.cli import main", {"circuits.cli", "circuits.cli.main"}),
    ("def f():\n    import circuits.commands.demo", {"circuits.commands.demo"}),
])
def test_imports_of_reads_nested_imports(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imports_of(path) == expected


def test_tests_take_helpers_from_the_helpers_module():
    """conftest.py holds fixtures only; shared helpers live in tests/helpers.py."""
    importers = [p.name for p in sorted((ROOT / "tests").glob("*.py"))
                 if any(under(i, "conftest", "tests.conftest") for i in imports_of(p))]
    assert importers == []


def _import_graph(package: str) -> dict[str, set[str]]:
    mods = {module_name(p): imports_of(p, runtime_only=True) for p in sorted((ROOT / package).rglob("*.py"))}
    return {m: {i for i in imps if i in mods} | {i.rsplit(".", 1)[0] for i in imps if i.rsplit(".", 1)[0] in mods}
            for m, imps in mods.items()}


def test_the_model_layer_has_no_import_cycles():
    """model.py and its loaders do not import each other (not even inside functions): the
    loaders convert, `HookedViT.from_converted` builds (docs/architecture.md)."""
    graph = _import_graph("hooked_vit")
    assert "hooked_vit.loading" in graph["hooked_vit.model"]  # the walk sees the imports
    cycles = []
    for start in graph:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()] - {"hooked_vit"}:
                if nxt == start:
                    cycles.append(start)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    assert sorted(set(cycles)) == []


def test_model_specs_are_resolved_in_the_model_layer_only():
    """circuits.runs.sources adds the embedded models and hands every other spec to
    `HookedViT.from_pretrained` (hooked_vit/specs.py): no timm or loader calls of its own."""
    imports = imports_of(ROOT / "circuits" / "runs" / "sources.py")
    assert not [i for i in imports if under(i, "timm", "hooked_vit.loading", "hooked_vit.loading_hf",
                                            "hooked_vit.loading_open_clip", "open_clip", "transformers")]
