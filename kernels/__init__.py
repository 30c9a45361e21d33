"""diffopt's kernels. Importing this package registers the ``torch.ops.diffopt`` ops."""
from . import qk_norm_rope  # noqa: F401  registers torch.ops.diffopt.qk_norm_rope
from .qk_norm_rope import qk_norm_rope_triton  # noqa: F401
from .reference import qk_norm_rope_reference  # noqa: F401
