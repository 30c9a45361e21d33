"""The base class of every rewrite and the log it reports to.

A pass lives in one file in ``fxpasses/``: a subclass of :class:`GraphPass` whose
docstring gives the stock form, the optimized form and the preconditions, and
whose :meth:`GraphPass.apply` matches and rewrites. It reports each rewrite to
the :class:`RewriteLog` it is given, and it never changes what the graph
computes: a precondition it cannot prove means it does not fire. The FX helpers
passes share are in ``fxpasses/fx_utils.py``.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import pathlib
import re
import sys
from typing import Any, ClassVar

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


class Stage(enum.Enum):
    """Where a pass runs.

    BEFORE_AUTOGRAD: on a graph that needs gradients, the functional ATen
    forward graph before AOT autograd differentiates it (``diffopt.training``),
    for the passes whose optimized forms have autograd formulas
    (``GraphPass.differentiable``); they run post-grad too.
    POST_GRAD: on the functional ATen graph after Inductor's decompositions,
    installed as Inductor's ``post_grad_custom_post_pass``.
    """

    BEFORE_AUTOGRAD = "before_autograd"
    POST_GRAD = "post_grad"


class RewriteLog:
    """Collects what one pass rewrote in one graph."""

    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []
        self.declines: list[dict[str, str]] = []

    def add(self, anchor: fx.Node, replaced: str, by: str) -> None:
        """Record one rewrite; ``anchor`` is a node of the stock code it replaced."""
        self.entries.append(
            {"module": module_path(anchor), "source": source_line(anchor), "replaced": replaced, "by": by}
        )

    def decline(self, anchor: fx.Node, reason: str) -> None:
        """Record a stock form that was found but left as it is, and why (shown by ``explain``)."""
        self.declines.append({"module": module_path(anchor), "source": source_line(anchor), "reason": reason})

    def __len__(self) -> int:
        return len(self.entries)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of every Python file of the ``diffopt`` package and its ``fxpasses`` and ``kernels``."""
    import diffopt.fxpasses
    import diffopt.kernels

    digest = hashlib.sha256()
    for package in (sys.modules["diffopt"], diffopt.fxpasses, diffopt.kernels):
        for path in sorted(pathlib.Path(list(package.__path__)[0]).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class GraphPass:
    """A rewrite of one stock form into its optimized form.

    Subclasses set ``name`` and ``stage``, may declare ``defaults`` (the pass's
    options and their default values) and ``after`` (the passes it must follow),
    and implement :meth:`apply`. A pass whose
    payoff depends on the machine (measured not to pay on every one we have) sets
    ``on_by_default = False``: it runs when named in the options.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage]
    # Passes that must run before this one when both are enabled (it matches what they leave, or they
    # match what it would rewrite away); the pipeline checks its order against these.
    after: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    on_by_default: ClassVar[bool] = True
    # Rewrites of collectives: on a graph without any they cannot match, and the report says so.
    needs_collectives: ClassVar[bool] = False
    # A post-grad pass whose inserted ops have autograd formulas: on graphs that need gradients it also
    # runs before AOT autograd (Stage.BEFORE_AUTOGRAD), so that the backward graph gets their backward.
    differentiable: ClassVar[bool] = False
    # Names of ops one of which every match contains (in Dynamo's torch-level graphs and in ATen graphs):
    # a graph with none of them is not applicable, and is not traced before autograd for this pass.
    anchors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **config: Any) -> None:
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise ValueError(f"diffopt: pass {self.name!r} has no option(s) {unknown}; it has {sorted(self.defaults)}")
        self.config = {**self.defaults, **config}

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes when diffopt's code or the pass's options change (for Inductor's FX graph cache).

        The code is all of diffopt's, not the pass's module alone: a pass's result also depends on the
        shared helpers it calls and on the kernels it inserts (whose Triton source Inductor's cached
        artifact carries)."""
        return hashlib.sha256(f"{code_digest()}{type(self).__name__}{sorted(self.config.items())!r}".encode()).hexdigest()


# --- where a node came from (for reports) ---------------------------------------

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def source_line(node: fx.Node) -> str:
    """``file.py:123 code`` of the innermost user frame that produced the node."""
    trace = node.meta.get("stack_trace") or ""
    lines = trace.rstrip().splitlines()
    for index in range(len(lines) - 1, -1, -1):
        match = _FRAME.search(lines[index])
        if match:
            code = lines[index + 1].strip() if index + 1 < len(lines) else ""
            filename = match.group(1).rsplit("/", 1)[-1]
            return f"{filename}:{match.group(2)} {code}".strip()
    return ""


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost ``nn.Module`` the node came from (``""`` at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Dynamo spells paths as L['self'].layers[0].attn or L__self___layers_0_attn.
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"(__dict__\.)?_modules\.", "", path)  # L['self'].__dict__['_modules']['blocks']
    return path.lstrip(".")
