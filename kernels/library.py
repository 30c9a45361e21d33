"""The ``diffopt`` operator library that every kernel module registers into.

A kernel module can be imported twice in one process under two module names (a source checkout on
``sys.path`` next to the installed package); each operator is defined once, by the first import.
"""
from __future__ import annotations

import torch

LIBRARY = torch.library.Library("diffopt", "FRAGMENT")


def first_definition(name: str) -> bool:
    """Whether ``torch.ops.diffopt.<name>`` is not defined yet (so this import defines and implements it)."""
    try:
        getattr(torch.ops.diffopt, name).default
    except (AttributeError, RuntimeError):
        return True
    return False
