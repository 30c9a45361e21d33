import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Keep CPU compile times predictable on small CI machines.
torch.set_num_threads(min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=[True, False], ids=["inductor", "aten"])
def inductor(request):
    """Both ways a pass test compiles: through Inductor's real ``compile_fx`` (the post-grad graph
    as Inductor orders it), and the faster ATen-only path (``{"inductor": False}``)."""
    return request.param


ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str | None = None):
    """A script of the repository (``benchmarks/`` and ``examples/`` are not packages), loaded by path
    and registered in ``sys.modules`` under ``name`` (default: its file's stem), where dataclasses
    look their module up."""
    path = ROOT / relative
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
