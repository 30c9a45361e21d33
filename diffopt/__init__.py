"""diffopt: a torch.compile backend that rewrites stock diffusion-transformer code into optimized forms.

Use::

    compiled = torch.compile(model, backend="diffopt")           # no import needed once installed
    compiled = torch.compile(model, backend="diffopt", options={"mode": "max-autotune", "strict": True})
    print(diffopt.explain(model, *args))                          # what was rewritten, declined, and why

The passes (one file each in ``diffopt.fxpasses``, run in ``fxpasses.PIPELINE`` order on the post-grad
ATen graph): ``split_contiguous`` (split + contiguous -> strided views), ``dedupe``, ``fold_invariant``
(step-invariant tables computed once), ``attention`` (each SDPA call -> the fastest exact kernel,
measured while compiling), ``qk_norm_rope`` (QK RMSNorm + RoPE -> one fused kernel), ``inline_triton``
(that kernel handed to Inductor as its own), ``hoist_item`` (per-step ``.item()`` syncs), the
sequence-parallel passes ``ulysses_prefix``, ``unflatten_all_to_all``, ``pipeline_heads`` (opt-in),
``batch_all_to_all``, and the VSA passes ``padded_buffer`` and ``fold_gathers``.

Options: :mod:`diffopt.options`. Docs: ``docs/passes.md`` (what each pass matches and when it does not
fire), ``docs/benchmarks.md`` (measured numbers and their commands), ``docs/attention.md``,
``docs/ulysses.md``, ``docs/vsa.md``; the README's Troubleshooting section.
"""
import importlib.metadata

__version__ = importlib.metadata.version("diffopt")  # pyproject.toml's; cache keys use the code's digest

from .backend import diffopt_backend  # noqa: E402
from .explain import explain  # noqa: E402
from .options import Options  # noqa: E402
from .report import Report, Rewrite  # noqa: E402

__all__ = ["diffopt_backend", "explain", "Options", "Report", "Rewrite", "__version__"]
