"""The rewrites, one file each. ``PIPELINE`` is the order they run in (within a stage).

Adding a pass: a new file here with a ``GraphPass`` subclass, plus its line below.
"""
from .dedupe import Dedupe
from .qk_norm_rope import QKNormRope
from .hoist_item import HoistItem
from .split_contiguous import SplitContiguous

PIPELINE = [
    SplitContiguous,
    Dedupe,
    QKNormRope,
    HoistItem,
]
