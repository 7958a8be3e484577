"""Execute every notebook in notebooks/ top to bottom; a cell that raises fails the test.

Each notebook runs in memory (nothing is written back) with a temporary working
directory, on a Jupyter kernel that uses this interpreter: a `python3` kernelspec
pointing at `sys.executable` is installed into a temporary prefix that JUPYTER_PATH puts
first, so a system-wide `python3` kernel for another Python is never picked up.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 600  # per cell
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in IPython tracebacks


@pytest.fixture(scope="module")
def jupyter_env(tmp_path_factory):
    """A `python3` kernelspec for this interpreter, found before any other."""
    prefix = tmp_path_factory.mktemp("jupyter")
    data_dir = prefix / "share" / "jupyter"
    env = {
        "JUPYTER_PATH": str(data_dir),
        "JUPYTER_RUNTIME_DIR": str(prefix / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "MPLBACKEND": "Agg",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        kernelspec.install(kernel_name="python3", prefix=str(prefix))
        assert (data_dir / "kernels" / "python3" / "kernel.json").is_file()
        yield data_dir
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, jupyter_env, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    failure = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        failure = ANSI.sub("", str(err))
    if failure is not None:
        pytest.fail(f"{path.name}: a cell raised\n{failure}", pytrace=False)
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def test_kernel_uses_this_interpreter(jupyter_env):
    """The kernelspec the notebooks run on launches sys.executable."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()
