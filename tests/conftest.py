"""Fixtures only (shared helpers live in tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import FAMILIES


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: CPU intra-op threads cost more than they save, badly so when
    other processes share the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
