"""The exposed-communication arithmetic of ``benchmarks/bench_ulysses.py`` (the benchmark
itself runs under torchrun; ``benchmarks/`` is not a package, so the file is loaded by path)."""
import pytest
from conftest import load_script

bench_ulysses = load_script("benchmarks/bench_ulysses.py")
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
