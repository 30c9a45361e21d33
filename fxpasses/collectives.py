"""FX helpers shared by the all-to-all passes (``ulysses_prefix``, ``unflatten_all_to_all``,
``pipeline_heads``, ``batch_all_to_all``).

Post-grad, a functional all-to-all reads::

    a = torch.ops._c10d_functional.all_to_all_single.default(x, output_split_sizes, input_split_sizes, group_name)
    y = torch.ops._c10d_functional.wait_tensor.default(a)

``x`` is split along dim 0 into ``input_split_sizes`` rows, chunk j going to rank j of
the group; ``y`` stacks along dim 0 what every rank j sent to this one, in rank order.
These passes only touch the equal-split form (what ``funcol.all_to_all_single(x, None,
None, group)`` produces): every split is ``x.shape[0] / world_size`` rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from diffopt import compat

from .fx_utils import concrete, fake_value

A2A = torch.ops._c10d_functional.all_to_all_single.default
WAIT = torch.ops._c10d_functional.wait_tensor.default

aten = torch.ops.aten
_patterns = compat.pattern_matcher()
# An all-to-all whose only user is its wait (the arguments are read by hand: ``group_name`` may be
# passed by keyword, which a positional pattern would not match).
A2A_WAIT = _patterns.CallFunction(WAIT, _patterns.CallFunctionVarArgs(A2A))
# ATen's fused attention ops -> positions of (query, key, value, mask, dropout_p) in the schema
# (an int: positional; a str: keyword-only; None: the op has no such argument).
ATTENTION_ARGS = {
    aten._scaled_dot_product_flash_attention.default: (0, 1, 2, None, 3),
    aten._scaled_dot_product_efficient_attention.default: (0, 1, 2, 3, 5),
    aten._scaled_dot_product_cudnn_attention.default: (0, 1, 2, 3, 5),
    aten._scaled_dot_product_flash_attention_for_cpu.default: (0, 1, 2, "attn_mask", 3),
}
_LONG_RUNNING = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.convolution.default,
    *ATTENTION_ARGS,
}


def is_long_running(node: fx.Node) -> bool:
    """Whether ``node`` is work a collective can run under, or be stuck behind: a matmul, a
    convolution, fused attention, or another collective (pointwise and layout work is short
    and fuses away)."""
    if node.op != "call_function":
        return False
    target = node.target
    if target in _LONG_RUNNING:
        return True
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "_c10d_functional" and target is not WAIT


@dataclasses.dataclass
class AllToAll:
    node: fx.Node  # all_to_all_single
    wait: fx.Node  # its wait_tensor, the only user
    input: fx.Node
    group_name: str
    world_size: int
    rows: int  # rows of dim 0 per rank (the equal split)
    value: torch.Tensor  # fake input

    @property
    def bytes(self) -> int:
        """Bytes this rank sends to the other ranks (its own chunk stays local)."""
        return self.value.numel() * self.value.element_size() * (self.world_size - 1) // self.world_size


def all_to_alls(graph: fx.Graph) -> list[AllToAll]:
    """Every equal-split all-to-all + wait of ``graph`` (:data:`A2A_WAIT` where :func:`equal_split`
    holds), in graph order."""
    found: list[AllToAll] = []
    matcher = _patterns.PatternMatcherPass()

    def collect(match: Any, *args: Any, **kwargs: Any) -> None:
        found.append(equal_split(match.output_node().args[0]))

    def check(match: Any) -> bool:
        return equal_split(match.output_node().args[0]) is not None

    _patterns.register_graph_pattern(A2A_WAIT, pass_dict=matcher, extra_check=check)(collect)
    matcher.apply(graph)
    position = {node: index for index, node in enumerate(graph.nodes)}
    return sorted(found, key=lambda collective: position[collective.node])


def match_all_to_all(node: fx.Node) -> AllToAll | None:
    """``node`` as an equal-split all-to-all with static sizes whose only user is its wait, else None."""
    if node.op != "call_function" or node.target is not A2A or len(node.users) != 1:
        return None
    wait = next(iter(node.users))
    return equal_split(node) if _patterns.is_match(A2A_WAIT.match(wait)) else None


def equal_split(node: fx.Node) -> AllToAll | None:
    """The all-to-all ``node`` (whose only user is its wait) where its splits are equal and its sizes
    static, else None."""
    wait = next(iter(node.users))
    args = list(node.args) + [None] * 4
    source, out_splits, in_splits, group_name = args[:4]
    group_name = node.kwargs.get("group_name", group_name)
    value = fake_value(source)
    if not isinstance(source, fx.Node) or not isinstance(value, torch.Tensor) or not isinstance(group_name, str):
        return None
    if any(concrete(size) is None for size in value.shape) or value.dim() == 0:
        return None
    splits = [concrete(s) for s in list(out_splits or []) + list(in_splits or [])]
    world_size = len(out_splits or [])
    if world_size == 0 or len(splits) != 2 * world_size or None in splits or len(set(splits)) != 1:
        return None
    rows = splits[0]
    if rows * world_size != value.shape[0]:
        return None
    return AllToAll(node, wait, source, group_name, world_size, rows, value)


def group_rank(group_name: str, world_size: int) -> int | None:
    """This process's rank in the process group ``group_name`` (as the collective names it), or None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    group = compat.resolve_process_group(group_name)
    if group is None:
        return None
    try:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
    except Exception:
        return None
    if size != world_size or not 0 <= rank < size:
        return None
    return rank


def topology() -> str:
    """Every process group this process belongs to, with its rank in it (for cache keys).

    A pass that bakes a rank into the graph must key Inductor's FX graph cache on it:
    every rank compiles the same graph, and the cache is shared by the processes of a host.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return "no process group"
    parts = []
    for group, name, ranks in compat.process_groups():
        try:
            rank = dist.get_rank(group)
        except Exception:
            rank = -1
        parts.append(f"{name}:{rank}:{ranks}")
    return f"rank {dist.get_rank()}; " + "; ".join(sorted(parts))


def ancestors(node: fx.Node, stop: int, position: dict[fx.Node, int]) -> set[fx.Node]:
    """Every node ``node`` depends on, not looking at nodes placed before ``position == stop``."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen and position[arg] >= stop:
                seen.add(arg)
                stack.append(arg)
    return seen
