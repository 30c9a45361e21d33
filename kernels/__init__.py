"""diffopt's kernels. Importing this package registers the ``torch.ops.diffopt`` ops.

- ``torch.ops.diffopt.qk_norm_rope``: fused QK RMSNorm + RoPE (``kernels/qk_norm_rope.py``);
  reference ``diffopt.kernels.reference.qk_norm_rope_reference``; Triton launcher
  ``diffopt.kernels.qk_norm_rope_triton.qk_norm_rope_triton``.
- ``torch.ops.diffopt.attention``: scaled dot-product attention by a named kernel (ATen's SDPA
  kernels, FlashInfer's fa3/fa2) in the replaced SDPA call's output layout
  (``kernels/attention.py``, with its reference ``attention_reference``).
"""
from . import attention  # noqa: F401  registers torch.ops.diffopt.attention
from . import qk_norm_rope  # noqa: F401  registers torch.ops.diffopt.qk_norm_rope
from . import reference  # noqa: F401
