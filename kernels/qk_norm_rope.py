"""``torch.ops.diffopt.qk_norm_rope``: fused QK RMSNorm + rotary embedding.

Schema::

    diffopt::qk_norm_rope(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor cos,
                          Tensor sin, Tensor? positions=None, *, str norm_over, str rope_style,
                          int rope_dim, float q_eps, float k_eps) -> (Tensor, Tensor)

Semantics: ``kernels/reference.py::qk_norm_rope_reference`` (the spec, and the CPU implementation).
CUDA runs the Triton kernel in ``qk_norm_rope_triton.py``; any other device runs the reference.

Registered with ``torch.library.Library`` (opaque to Inductor; the rewrite pass inserts it
post-grad, where a ``triton_op`` would be opaque too), which runs the same way on torch 2.11 and
2.13, eagerly and inside Inductor-generated code on CUDA and CPU. Functional: inputs are never
mutated; outputs are new tensors in ``out_dtype`` (default: the input's), laid out like the inputs
(``reference.output_like``: the layout stock elementwise code on them produces).

Autograd: a recomputing backward (``reference.qk_norm_rope_backward_reference``: plain torch ops,
fp32, each gradient rounded once to its input's dtype) for q, k, the weights and the tables, so the
rewrite pass also fires in training compiles (``docs/passes.md``, Training).

Accuracy: q/k, weights and tables are read in their own dtype (a bf16 table's values are the bf16
values), all math is fp32, and each output is rounded once to its dtype. For bf16/fp16 outputs that
is within 1 ulp of the output dtype of the exact (float64) result (1/2 ulp of rounding plus ~1e-6
relative fp32 error; the tests bound it by 1/2 ulp + 4e-6 x max|out|). The stock eager code rounds
the normed q/k to bf16 before the rotation and then every product and sum, so its error vs float64
is larger (1.4-1.7x in relative norm on the H200 anchor shapes, ~3x in max error on small ones);
the op's error is never worse than stock's (the tests assert it, max and mean, per case). fp32
outputs agree with the float64 result within ~4e-6 x max|out|, like stock fp32 eager.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .library import LIBRARY, first_definition
from .reference import check_qk_norm_rope_args, output_like, qk_norm_rope_backward_reference, qk_norm_rope_reference

try:  # triton is optional: without it every device runs the reference
    from .qk_norm_rope_triton import qk_norm_rope_triton
except Exception:  # pragma: no cover - depends on the installation
    qk_norm_rope_triton = None

__all__ = ["qk_norm_rope", "QK_NORM_ROPE_SCHEMA"]

QK_NORM_ROPE_SCHEMA = (
    "(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor cos, Tensor sin, Tensor? positions=None, *, "
    "str norm_over, str rope_style, int rope_dim, float q_eps, float k_eps, ScalarType? out_dtype=None) "
    "-> (Tensor, Tensor)"
)


# Registered with the low-level ``torch.library.Library`` API rather than ``custom_op``: the
# dispatcher calls the device function directly, without custom_op's Python autograd and
# aliasing-check wrappers, which cost a few hundred microseconds of host time per call on the
# GPU machines (benchmarks/profile_qk_norm_rope.py). Its autograd formula (below) is registered
# the same way, on the op's Autograd key.
_REGISTER = first_definition("qk_norm_rope")
_library = LIBRARY
if _REGISTER:
    _library.define("qk_norm_rope" + QK_NORM_ROPE_SCHEMA)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor], cos: Tensor,
                 sin: Tensor, positions: Optional[Tensor] = None, *, norm_over: str, rope_style: str,
                 rope_dim: int, q_eps: float, k_eps: float,
                 out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Fused RMSNorm(q), RMSNorm(k), then RoPE on the first rope_dim channels of each head.

    q [B,S,Hq,D], k [B,S,Hk,D] (fp32/bf16/fp16, any strides, any Hq:Hk); norm_over "head" (RMS over
    D, weight [D]) or "hidden" (RMS over H*D per token, weight [H*D]); weights may be None; q_eps and
    k_eps used as given. rope_style "neox" (half split; cos/sin last dim rope_dim = per channel or
    rope_dim/2 = per pair) or "interleaved" (pairs (2j, 2j+1); last dim rope_dim/2 = per pair or
    rope_dim = per channel); rope_dim=-1
    means D. cos/sin broadcast to [B,S,1,L] in fp32/bf16/fp16 with any strides, or are [P, L] caches
    indexed by positions ([B,S] or [S]). Returns new (q_out, k_out) in out_dtype (default q's/k's
    dtype), laid out like q and k (``reference.output_like``).
    Exact definition: ``qk_norm_rope_reference``.

    Accuracy: all math in fp32, rounded once: within 1 ulp of the output dtype of the float64 result,
    and never worse than the stock eager code (which rounds the normed q/k to bf16 before rotating).
    """
    return torch.ops.diffopt.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, positions, norm_over=norm_over,
                                          rope_style=rope_style, rope_dim=rope_dim, q_eps=q_eps, k_eps=k_eps,
                                          out_dtype=out_dtype)


def _qk_norm_rope_cpu(q, k, q_weight, k_weight, cos, sin, positions=None, *, norm_over, rope_style, rope_dim,
                      q_eps, k_eps, out_dtype=None):
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, positions, norm_over=norm_over,
                                  rope_style=rope_style, rope_dim=rope_dim, q_eps=q_eps, k_eps=k_eps,
                                  out_dtype=out_dtype)


def _qk_norm_rope_cuda(q, k, q_weight, k_weight, cos, sin, positions=None, *, norm_over, rope_style, rope_dim,
                       q_eps, k_eps, out_dtype=None):
    fn = qk_norm_rope_triton if qk_norm_rope_triton is not None else qk_norm_rope_reference
    return fn(q, k, q_weight, k_weight, cos, sin, positions, norm_over=norm_over, rope_style=rope_style,
              rope_dim=rope_dim, q_eps=q_eps, k_eps=k_eps, out_dtype=out_dtype)


if _REGISTER:
    _library.impl("qk_norm_rope", _qk_norm_rope_cpu, "CPU")
    _library.impl("qk_norm_rope", _qk_norm_rope_cuda, "CUDA")


def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, positions=None, *, norm_over, rope_style, rope_dim,
                       q_eps, k_eps, out_dtype=None):
    check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin, positions, norm_over, rope_style, rope_dim, out_dtype)
    return output_like(q, out_dtype), output_like(k, out_dtype)


if _REGISTER:
    torch.library.register_fake("diffopt::qk_norm_rope", _qk_norm_rope_fake, lib=_library)


# Autograd: a recomputing backward in plain torch ops (``qk_norm_rope_backward_reference``). The op saves
# only its inputs; the backward recomputes the norm statistics. Traced by AOT autograd into the backward
# graph, Inductor fuses it like the stock code's backward.
def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.options = {name: keyword_only_inputs[name] for name in ("norm_over", "rope_style", "rope_dim", "q_eps", "k_eps")}


def _backward(ctx, grad_q, grad_k):
    q, k, q_weight, k_weight, cos, sin, positions = ctx.saved_tensors
    grads = qk_norm_rope_backward_reference(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, positions,
                                            needs_input_grad=tuple(ctx.needs_input_grad[:6]), **ctx.options)
    return (*grads, None)


if _REGISTER:
    torch.library.register_autograd("diffopt::qk_norm_rope", _backward, setup_context=_setup_context, lib=_library)
