"""diffopt: a torch.compile backend that rewrites stock diffusion-transformer code into optimized forms.

``torch.compile(model, backend="diffopt")`` works once the package is installed
(entry point ``torch_dynamo_backends``); :func:`explain` says what was rewritten.
"""
__version__ = "0.1.0"

from .backend import diffopt_backend  # noqa: E402
from .explain import explain  # noqa: E402
from .options import Options  # noqa: E402
from .report import Report, Rewrite  # noqa: E402

__all__ = ["diffopt_backend", "explain", "Options", "Report", "Rewrite", "__version__"]
