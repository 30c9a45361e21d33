"""The rewrites, one file each. ``PIPELINE`` is the order they run in (within a stage); a pass that must
follow others says so in its ``after``, and the pipeline is checked against it (``docs/passes.md``).

Adding a pass: a new file here with a ``GraphPass`` subclass, plus its line below.
"""
from .dedupe import Dedupe
from .fold_invariant import FoldInvariant
from .qk_norm_rope import QKNormRope
from .inline_triton import InlineTriton
from .hoist_item import HoistItem
from .split_contiguous import SplitContiguous
from .ulysses_prefix import UlyssesPrefix
from .unflatten_all_to_all import UnflattenAllToAll
from .pipeline_heads import PipelineHeads
from .batch_all_to_all import BatchAllToAll
from .padded_buffer import PaddedBuffer
from .fold_gathers import FoldGathers
from .attention import Attention
from .recompute_upcasts import RecomputeUpcasts

PIPELINE = [
    UlyssesPrefix,
    SplitContiguous,
    Dedupe,
    FoldInvariant,
    QKNormRope,
    InlineTriton,
    HoistItem,
    PaddedBuffer,
    FoldGathers,
    UnflattenAllToAll,
    PipelineHeads,
    BatchAllToAll,
    Attention,
    RecomputeUpcasts,
]
