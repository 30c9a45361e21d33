"""ATen SDPA -> the fastest exact attention kernel for the call, chosen by measuring.

Stock form: ``F.scaled_dot_product_attention(q, k, v)`` (self- or cross-attention, grouped-query
attention, any ``scale``). Post-grad it is one of ATen's fused SDPA ops, picked by SDPA's fixed
rules while tracing: ``_scaled_dot_product_cudnn_attention`` (bf16 on Hopper),
``_scaled_dot_product_flash_attention``, ``_scaled_dot_product_efficient_attention``, or
``_scaled_dot_product_flash_attention_for_cpu``; the graph uses its output 0 only. (Plain
``aten.scaled_dot_product_attention`` never reaches a post-grad graph: AOT dispatch decomposes it
into one of these, or into matmuls and softmax where SDPA takes its math path, e.g. with dropout.)

Optimized form: ``torch.ops.diffopt.attention(q, k, v, scale=..., backend=..., out_layout=...)``
(``kernels/attention.py``), the same inputs and exactly the stock output's sizes and strides,
computed by the backend that was fastest on this call's own shapes, dtypes and strides: ATen's
other SDPA kernels, FlashInfer's fa3 (Hopper) and fa2 when FlashInfer is installed. Each candidate
runs and is timed against the stock call while compiling (``diffopt.autotune``: real tensors on the
device, random values, medians by ``triton.testing.do_bench``'s method); one that fails to build or
run, or disagrees with the stock call beyond rounding, is never chosen; the stock call stays unless
a candidate beats it by more than 1%. The choice is cached on disk (``$DIFFOPT_CACHE_DIR``, default
``diffopt/`` in Inductor's cache dir), keyed by shapes, strides, dtype, scale, device name and the
torch/CUDA/cuDNN/FlashInfer/diffopt versions: a second compile does not measure again. ``explain``
shows, per attention call, the candidates' times and the choice (with the rewrite), or why the call
stayed stock (with the declines).

FlashInfer's first use on a machine builds each kernel variant (one per dtype and head dim and
fa2/fa3: 20-100 s), inside the first compile that measures it unless ``python -m diffopt.prebuild``
built it before; the ``diffopt`` logger warns before the build. Later compiles load it from
FlashInfer's disk cache in about a second.

Preconditions (else the call stays stock, with the reason in ``explain``):

- No dropout, no mask or bias, not causal (FlashInfer aligns a causal mask bottom-right where SDPA
  aligns it top-left when Sq != Skv; causal is not handled), no debug mask, and only the attention
  output used (an inference graph; training graphs use the logsumexp).
- q, k, v are 4-D ``[B, H, S, D]`` of one dtype; head counts and head dims are static; key/value
  heads divide query heads. Batch and sequence may be symbolic: the choice is measured at the
  sizes the graph was traced with.
- The tensors are on a device in the option ``devices`` (default CUDA only: elsewhere the op runs
  its plain-torch reference, slower than the stock kernel; tests add "cpu" with a timer).
- Some candidate is available (installed, this GPU), takes the dtype and head dim, runs, agrees
  with the stock call and beats it, or is forced by the option ``backend``.
- The op's output has the stock output's sizes and strides (it is built to; checked).

Options: ``backend`` forces one backend (no timing; still run once and checked), e.g.
``{"attention": {"backend": "flashinfer_fa3"}}``; ``False`` turns the pass off; ``devices``;
``timer`` (``(fn, name) -> ms``; default ``autotune.cuda_timer``) for tests that drive the choice.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from diffopt import autotune
from diffopt.graph_pass import GraphPass, RewriteLog, Stage
from diffopt.kernels import attention as kernels
from diffopt.compat import real_mode

from .fx_utils import call_arguments, elements_spanned, fake_value, insert_call, op_name, same_layout, storage_of

aten = torch.ops.aten

# stock op -> (the op's out_layout, the backend that is the stock kernel itself)
_STOCK = {
    aten._scaled_dot_product_flash_attention.default: ("flash", "sdpa_flash"),
    aten._scaled_dot_product_efficient_attention.default: ("efficient", "sdpa_efficient"),
    aten._scaled_dot_product_cudnn_attention.default: ("cudnn", "sdpa_cudnn"),
    aten._scaled_dot_product_flash_attention_for_cpu.default: ("flash_cpu", None),
}


@dataclasses.dataclass
class _Call:
    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    out_layout: str
    own_kernel: str | None

    @property
    def fakes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return fake_value(self.q), fake_value(self.k), fake_value(self.v)


class Attention(GraphPass):
    name = "attention"
    stage = Stage.POST_GRAD
    after = ("pipeline_heads", "batch_all_to_all")  # they match ATen's SDPA ops, which this pass replaces
    defaults = {"devices": ("cuda",), "backend": None, "timer": None}

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        backend = self.config["backend"]
        if backend is not None and backend not in kernels.BACKENDS:
            raise ValueError(f"diffopt: attention backend {backend!r} is not one of {kernels.BACKENDS}")

    def fingerprint(self) -> str:
        # Inductor's FX graph cache must not hand back a graph that calls FlashInfer to a process
        # without it, or one chosen on another GPU.
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        extra = f"{kernels.flashinfer_version()}|{device}"
        return hashlib.sha256(f"{super().fingerprint()}|{extra}".encode()).hexdigest()

    def apply(self, graph: fx.Graph, log: RewriteLog) -> None:
        decided: dict[str, tuple[str | None, str]] = {}  # calls of one key in this graph measure once
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _STOCK:
                continue
            call = _match(node)
            if isinstance(call, str):
                log.decline(node, call)
                continue
            device = call.fakes[0].device
            if device.type not in self.config["devices"]:
                log.decline(node, f"on {device.type}; the pass acts on {tuple(self.config['devices'])} (option devices)")
                continue
            backend, text = self._choose(call, device, decided)
            if backend is None:
                log.decline(node, text)
            elif not _rewrite(graph, call, backend):
                log.decline(node, f"{text}; but the op's output layout differs from the stock call's")
            else:
                log.add(node, op_name(node.target), f"diffopt.attention[{backend}]; {text}")

    def _choose(self, call: _Call, device: torch.device, decided: dict) -> tuple[str | None, str]:
        """The backend for ``call`` (None: stay stock) and what to say about it."""
        q, k, v = call.fakes
        shapes = f"q {_dims(q)} k {_dims(k)} v {_dims(v)} {str(q.dtype).removeprefix('torch.')}"
        forced = self.config["backend"]
        names = [forced] if forced else [name for name in kernels.BACKENDS if name != call.own_kernel]
        candidates, not_candidates = _candidates(names, call, device)
        if not candidates:
            return None, f"{shapes}: no candidate ({not_candidates})"
        if forced:
            with real_mode(), autotune.on_device(device):
                _, failures = autotune.check(*_runs(call, candidates))
            if failures:
                return None, f"{shapes}: forced {forced} did not run: {'; '.join(failures.values())}"
            return forced, f"{shapes}: forced {forced}"
        timer = self.config["timer"] or (autotune.cuda_timer if device.type == "cuda" else None)
        if timer is None:
            return None, f"{shapes}: no timer for {device.type} (option timer)"
        key = _key(call, candidates, device)
        digest = json.dumps(key, sort_keys=True, default=str)
        if digest not in decided:
            with real_mode():
                selection = autotune.select(key, lambda: _runs(call, candidates), timer, f"attention {shapes}", device)
            text = f"{shapes}: {selection.summary()}" + (f"; not candidates ({not_candidates})" if not_candidates else "")
            decided[digest] = (selection.choice, text)
        return decided[digest]


def _candidates(names: list[str], call: _Call, device: torch.device) -> tuple[list[str], str]:
    """The backends among ``names`` that may run ``call``, and why the others may not."""
    q, k, v = call.fakes
    candidates, why_not = [], {}
    for name in names:
        why = kernels.backend_unavailable(name, device) or kernels.backend_unsupported(
            name, q.dtype, int(q.shape[-1]), int(v.shape[-1]), grouped=q.shape[1] != k.shape[1]
        )
        if why:
            why_not.setdefault(why, []).append(name)
        else:
            candidates.append(name)
    return candidates, "; ".join(f"{', '.join(group)}: {why}" for why, group in why_not.items())


# --- the match -------------------------------------------------------------------------


def _match(node: fx.Node) -> _Call | str:
    """The call, or why it stays stock."""
    args = call_arguments(node)
    if args.get("dropout_p", 0.0) != 0.0:
        return "dropout"
    if args.get("is_causal", False):
        return "causal (not handled)"
    if args.get("attn_bias", args.get("attn_mask")) is not None:
        return "attention mask"
    if args.get("return_debug_mask", False):
        return "debug mask requested"
    used = sorted({user.args[1] if user.target is operator.getitem else "all" for user in node.users}, key=str)
    if used != [0]:
        return f"outputs {used} used (the logsumexp: a training graph)" if used else "output unused"
    q, k, v = (fake_value(args[name]) for name in ("query", "key", "value"))
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v)):
        return "q, k, v are not 4-D tensors"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    static = (q.shape[1], k.shape[1], v.shape[1], q.shape[3], k.shape[3], v.shape[3])
    if not all(is_concrete_int(size) for size in static):
        return "head counts or head dims are symbolic"
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] or q.shape[3] != k.shape[3]:
        return f"heads or head dims do not match: q {_dims(q)} k {_dims(k)} v {_dims(v)}"
    if any(_hint(size) is None for x in (q, k, v) for size in (*x.shape, *x.stride(), x.storage_offset())):
        return "data-dependent sizes"
    scale = args.get("scale")
    out_layout, own_kernel = _STOCK[node.target]
    return _Call(node, args["query"], args["key"], args["value"],
                 1.0 / math.sqrt(int(q.shape[3])) if scale is None else float(scale), out_layout, own_kernel)


def _hint(size: Any) -> int | None:
    if isinstance(size, int):
        return size
    return size.node.hint if size.node.has_hint() else None


def _dims(x: torch.Tensor) -> list[int]:
    return [_hint(size) for size in x.shape]


# --- measuring -------------------------------------------------------------------------


@functools.cache
def _code_version() -> str:
    """Changes when the kernels or the choosing change (a cached choice may no longer hold)."""
    sources = "".join(inspect.getsource(module) for module in (kernels, autotune))
    return hashlib.sha256(sources.encode()).hexdigest()[:16]


def _layout(x: torch.Tensor) -> dict[str, Any]:
    return {"shape": _dims(x), "stride": [_hint(s) for s in x.stride()], "offset": _hint(x.storage_offset())}


def _key(call: _Call, candidates: list[str], device: torch.device) -> dict[str, Any]:
    q, k, v = call.fakes
    return {
        "op": "attention",
        "stock": op_name(call.node.target),
        "q": _layout(q),
        "k": _layout(k),
        "v": _layout(v),
        "dtype": str(q.dtype),
        "scale": call.scale,
        "candidates": candidates,
        "flashinfer": kernels.flashinfer_version(),
        "code": _code_version(),
        **autotune.environment(device),
    }


def _real(nodes: list[fx.Node], generator: torch.Generator) -> dict[fx.Node, torch.Tensor]:
    """Per node, a tensor with its value's sizes, strides and storage offset (so its alignment) and
    random values. Values that view one storage in the graph (q, k and v as head slices of one packed
    projection) view one real storage here too: the call's own aliasing, and its inputs' memory once,
    not once per view."""
    fakes = {node: fake_value(node) for node in nodes}
    storage_key = {node: storage_of(fake) or node for node, fake in fakes.items()}
    layouts = {node: (_dims(fake), [_hint(s) for s in fake.stride()], _hint(fake.storage_offset()))
               for node, fake in fakes.items()}
    elements: dict[Any, int] = {}  # storage -> elements its views reach
    for node, (shape, stride, offset) in layouts.items():
        reach = offset + elements_spanned(shape, stride)
        elements[storage_key[node]] = max(elements.get(storage_key[node], 0), reach)
    storages = {}
    for node, fake in fakes.items():
        key = storage_key[node]
        if key not in storages:
            storages[key] = torch.randn(elements[key], generator=generator, dtype=fake.dtype, device=fake.device)
    return {node: storages[storage_key[node]].as_strided(*layouts[node]) for node in nodes}


def _runs(call: _Call, candidates: list[str]) -> tuple[autotune.Run, dict[str, autotune.Run]]:
    """The stock call and each candidate on real tensors like the call's (run under real_mode)."""
    device = call.fakes[0].device
    generator = torch.Generator(device).manual_seed(0)
    real = _real([call.q, call.k, call.v], generator)
    args, kwargs = fx.node.map_arg((call.node.args, call.node.kwargs), real.__getitem__)
    q, k, v = real[call.q], real[call.k], real[call.v]

    def stock() -> torch.Tensor:
        return call.node.target(*args, **kwargs)[0]

    def candidate(backend: str) -> autotune.Run:
        return lambda: kernels.attention(q, k, v, scale=call.scale, backend=backend, out_layout=call.out_layout)

    return stock, {name: candidate(name) for name in candidates}


# --- the rewrite -----------------------------------------------------------------------


def _rewrite(graph: fx.Graph, call: _Call, backend: str) -> bool:
    node = call.node
    with graph.inserting_before(node):
        new = insert_call(
            graph, torch.ops.diffopt.attention.default, (call.q, call.k, call.v), node,
            {"scale": call.scale, "backend": backend, "out_layout": call.out_layout},
        )
    if not same_layout(new, fake_value(node)[0]):
        graph.erase_node(new)
        return False
    for user in list(node.users):
        user.replace_all_uses_with(new)
        graph.erase_node(user)
    graph.erase_node(node)
    return True
