import gc

import pytest
import torch

from kandinsky.testing import load_original_fixture


@pytest.fixture(autouse=True)
def _free_memory():
    """Full-size models are several GiB: collect them as soon as each test ends."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def original_fixture():
    """``original_fixture("movq") -> (tensors, meta)`` with caching across the session."""
    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = load_original_fixture(name)
        return cache[name]

    return load


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models: intra-op threads cost more in synchronisation than they give (about 40x on a loaded
    2-core machine). The full-size tier keeps every core."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
