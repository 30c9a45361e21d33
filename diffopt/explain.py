"""``diffopt.explain``: compile a model with the backend and say what was rewritten."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from .backend import diffopt_backend
from .report import Report, collecting


def explain(model: Any, *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Report:
    """Compile ``model`` with ``backend="diffopt"``, run it once on ``args``/``kwargs``, return the report.

    ``options`` are the backend's options (see :mod:`diffopt.options`). Inductor's
    FX graph and AOT autograd caches are bypassed for this call, so every pass
    really runs and is counted (a cache hit would skip them). The model's output
    is in ``report.output``.
    """
    report = Report()
    backend = functools.partial(diffopt_backend, options=options)
    compiled = torch.compile(model, backend=backend)
    with collecting(report), torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False
    ):
        report.output = compiled(*args, **kwargs)
    return report
