"""The exposed-communication arithmetic of ``benchmarks/bench_ulysses.py`` (the benchmark
itself runs under torchrun; ``benchmarks/`` is not a package, so the file is loaded by path)."""
import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_ulysses", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ulysses.py"
)
bench_ulysses = sys.modules["bench_ulysses"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(bench_ulysses)
comm_exposure = bench_ulysses.comm_exposure


def test_comm_exposure():
    # No compute: all communication is exposed; overlapping comm intervals count once.
    assert comm_exposure([(0, 4), (2, 6), (10, 11)], []) == (7, 7)
    # Compute covering part of one interval, all of another, and reaching across a gap into a third.
    comm = [(0, 10), (20, 30), (40, 50)]
    compute = [(5, 8), (7, 12), (18, 45)]
    assert comm_exposure(comm, compute) == (30, 5 + 0 + 5)
    # Unsorted input, compute only outside the communication, touching endpoints.
    assert comm_exposure([(5, 7), (1, 3)], [(3, 5), (7, 9), (0, 1)]) == (4, 4)
    assert comm_exposure([], [(0, 1)]) == (0, 0)


@pytest.mark.parametrize("compute", [[(0, 100)], [(-5, 3), (2, 11)]])
def test_comm_fully_hidden(compute):
    assert comm_exposure([(1, 4), (6, 9)], compute) == (6, 0)
