"""``torch.ops.diffopt.qk_norm_rope``: fused QK RMSNorm + rotary embedding.

Schema::

    diffopt::qk_norm_rope(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor cos,
                          Tensor sin, Tensor? positions=None, *, str norm_over, str rope_style,
                          int rope_dim, float q_eps, float k_eps) -> (Tensor, Tensor)

Semantics: ``kernels/reference.py::qk_norm_rope_reference`` (the spec, and the CPU implementation).
CUDA runs the Triton kernel in ``qk_norm_rope_triton.py``; any other device runs the reference.

Registered with ``torch.library.custom_op`` (opaque to Inductor; the rewrite pass inserts it
post-grad, where a ``triton_op`` would be opaque too), which runs the same way on torch 2.11 and
2.13, eagerly and inside Inductor-generated code on CUDA and CPU. Functional: inputs are never
mutated, outputs are new contiguous tensors.

Accuracy: q/k, weights and tables are read in their own dtype, all math is fp32, and each output
is rounded once to its dtype. For bf16/fp16 outputs that is within 1 ulp of the output dtype of the
exact (float64) result (0.5 ulp rounding + ~1e-6 relative fp32 error); the stock eager code rounds
the normed q/k to bf16 before the rotation and then every product and sum, so its error vs float64
is larger (typically 2-3x in bf16): the op's error is never worse than stock's (tests assert this).
For fp32 outputs the result agrees with stock fp32 eager within a few fp32 ulp.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import check_qk_norm_rope_args, qk_norm_rope_reference

try:  # triton is optional: without it every device runs the reference
    from .qk_norm_rope_triton import qk_norm_rope_triton
except Exception:  # pragma: no cover - depends on the installation
    qk_norm_rope_triton = None

__all__ = ["qk_norm_rope", "QK_NORM_ROPE_SCHEMA"]

QK_NORM_ROPE_SCHEMA = (
    "(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor cos, Tensor sin, Tensor? positions=None, *, "
    "str norm_over, str rope_style, int rope_dim, float q_eps, float k_eps) -> (Tensor, Tensor)"
)


@torch.library.custom_op("diffopt::qk_norm_rope", mutates_args=(), schema=QK_NORM_ROPE_SCHEMA)
def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor], cos: Tensor,
                 sin: Tensor, positions: Optional[Tensor] = None, *, norm_over: str, rope_style: str,
                 rope_dim: int, q_eps: float, k_eps: float) -> tuple[Tensor, Tensor]:
    """Fused RMSNorm(q), RMSNorm(k) + RoPE; see the module docstring and ``qk_norm_rope_reference``."""
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, positions, norm_over=norm_over,
                                  rope_style=rope_style, rope_dim=rope_dim, q_eps=q_eps, k_eps=k_eps)


@qk_norm_rope.register_kernel("cuda")
def _qk_norm_rope_cuda(q, k, q_weight, k_weight, cos, sin, positions=None, *, norm_over, rope_style, rope_dim,
                       q_eps, k_eps):
    fn = qk_norm_rope_triton if qk_norm_rope_triton is not None else qk_norm_rope_reference
    return fn(q, k, q_weight, k_weight, cos, sin, positions, norm_over=norm_over, rope_style=rope_style,
              rope_dim=rope_dim, q_eps=q_eps, k_eps=k_eps)


@qk_norm_rope.register_fake
def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, positions=None, *, norm_over, rope_style, rope_dim,
                       q_eps, k_eps):
    check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin, positions, norm_over, rope_style, rope_dim)
    return q.new_empty(q.shape), k.new_empty(k.shape)
