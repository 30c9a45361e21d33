"""benchmarks/replay_memory.py: its replay of a generated call() against the allocations the same
code really makes when it runs (CPU: every ``empty_strided_cpu`` the module calls is counted, and
uncounted when its storage dies), on random programs compiled by Inductor and by diffopt."""
import gzip
import re
import weakref
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import load_script
from torch._inductor.utils import run_and_get_code

import diffopt  # noqa: F401  (registers the backend)

replay_memory = load_script("benchmarks/replay_memory.py")

ORIGINAL_EMPTY_STRIDED = torch._C._dynamo.guards._empty_strided_cpu


class AllocationCounter:
    """Live and peak bytes of the storages a generated module allocates. One instance for the
    whole file: a module that the code cache hands out again keeps the function it bound at import."""

    def __init__(self):
        self.live = self.peak = 0

    def reset(self):
        self.live = self.peak = 0

    def empty_strided(self, size, stride, dtype, *args, **kwargs):
        tensor = ORIGINAL_EMPTY_STRIDED(size, stride, dtype, *args, **kwargs)
        storage = tensor.untyped_storage()  # one Python object per storage while it lives
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, nbytes)
        return tensor

    def _free(self, nbytes):
        self.live -= nbytes


COUNTER = AllocationCounter()
STEPS = ("linear", "relu", "cat", "softmax", "scale_transposed", "residual")


def _program(steps, width, weights):
    def forward(x, *ws):
        skip = x
        for step, w in zip(steps, ws):
            if step == "linear":
                x = x @ w
            elif step == "relu":
                x = torch.relu(x) + 0.5
            elif step == "cat":
                x = torch.cat([x, x * 2.0], dim=1)
            elif step == "softmax":
                x = x.softmax(-1)
            elif step == "scale_transposed":
                x = (x.t() * 3.0).contiguous().t()
            else:
                x = x + skip[:, :1]
        return x, skip.sum()
    return forward


@st.composite
def programs(draw):
    rows = draw(st.integers(3, 70))
    width = draw(st.integers(2, 40))
    steps = draw(st.lists(st.sampled_from(STEPS), min_size=2, max_size=7))
    x = torch.randn(rows, width) + 0.1
    weights, columns = [], width
    for step in steps:
        if step == "linear":
            out = draw(st.integers(2, 48))
            weights.append(torch.randn(columns, out))
            columns = out
        else:
            weights.append(torch.randn(1))
            if step == "cat":
                columns *= 2
    return steps, x, weights


@pytest.mark.parametrize("backend", ["inductor", "diffopt"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), dynamic_rows=st.booleans())
def test_the_replay_finds_the_peak_the_code_really_reaches(backend, program, dynamic_rows):
    steps, x, weights = program
    torch._dynamo.reset()
    if dynamic_rows:
        torch._dynamo.mark_dynamic(x, 0)
    compiled = torch.compile(_program(steps, x.shape[1], weights), backend=backend)
    with mock.patch.object(torch._C._dynamo.guards, "_empty_strided_cpu", COUNTER.empty_strided):
        _, codes = run_and_get_code(compiled, x, *weights)  # compiles: the module binds the counter
        COUNTER.reset()
        outputs = compiled(x, *weights)
    bodies = [body for code in codes for body in replay_memory.call_bodies(code)]
    assert len(bodies) == 1, codes
    symbols = {line.split(" = ")[0]: x.shape[0] for line in bodies[0] if re.fullmatch(r"s\d+ = arg\d+_1", line)}
    assert bool(symbols) == dynamic_rows  # the rows' size symbol is the only one
    if dynamic_rows:
        with pytest.raises(replay_memory.SymbolicSize):
            replay_memory.replay(bodies[0])
    result = replay_memory.replay(bodies[0], symbols=symbols)
    assert COUNTER.peak > 0
    assert result.peak == COUNTER.peak, "\n".join(bodies[0])
    assert result.live[-1] == COUNTER.live  # what the outputs hold
    assert sum(size for size, _ in result.peak_alive) == result.peak
    del outputs


def test_a_logged_module_reads_as_the_module_itself():
    def forward(x, w):
        return torch.relu(x @ w).sum(0)
    _, codes = run_and_get_code(torch.compile(forward), torch.randn(37, 11), torch.randn(11, 23))
    prefix = "V1202 02:51:05.082000 541 torch/_inductor/graph.py:2552] [0/0] [__output_code] "
    logged = "\n".join(["unrelated line", *(prefix + line for line in codes[0].split("\n")), "W1202 later"])
    assert replay_memory.call_bodies(logged) == replay_memory.call_bodies(codes[0])
    assert len(replay_memory.call_bodies(logged)) == 1


def test_a_tensor_an_op_returns_is_sized_by_its_assert_at_the_given_item_size():
    body = [
        "buf0 = torch.ops.aten.some_op.default(arg0_1)",
        "buf1 = buf0[0]",
        "assert_size_stride(buf1, (2, 3, 5), (15, 5, 1), 'torch.ops.aten.some_op.default')",
        "del buf0",
        "buf2 = empty_strided_cuda((7, 4), (1, 7), torch.float32)",
        "buf3 = reinterpret_tensor(buf1, (30, ), (1, ), 0); del buf1  # reuse",
        "del buf3",
        "del buf2",
    ]
    for itemsize in (2, 4):
        result = replay_memory.replay(body, extern_itemsize=itemsize)
        assert result.live == [0, 0, 30 * itemsize, 30 * itemsize, 30 * itemsize + 112, 30 * itemsize + 112, 112, 0]
        assert result.peak_line == 4
        assert result.peak_alive == sorted([(112, ["buf2"]), (30 * itemsize, ["buf1"])], reverse=True)
        assert result.sized_from_asserts == [("buf0", "torch.ops.aten.some_op.default")]


def test_the_command_prints_each_graphs_peak(tmp_path, capsys):
    def forward(x, w):
        return torch.cat([x @ w, x], dim=1).softmax(-1)
    _, codes = run_and_get_code(torch.compile(forward), torch.randn(29, 13), torch.randn(13, 17))
    path = tmp_path / "code.py"
    path.write_text(codes[0])
    assert replay_memory.main([str(path), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("graph 0: peak ")
    assert "buf" in printed.split("\n")[1]
    with gzip.open(tmp_path / "code.log.gz", "wt") as gzipped:
        gzipped.write(codes[0])
    assert replay_memory.main([str(tmp_path / "code.log.gz"), "--top", "3"]) == 0
    assert capsys.readouterr().out == printed
    x = torch.randn(31, 13)
    torch._dynamo.mark_dynamic(x, 0)
    _, dynamic_codes = run_and_get_code(torch.compile(forward, dynamic=None), x, torch.randn(13, 17))
    (tmp_path / "dynamic.py").write_text(dynamic_codes[0])
    symbol = re.search(r"\b(s\d+) = arg\d+_1", dynamic_codes[0])[1]
    assert replay_memory.main([str(tmp_path / "dynamic.py")]) == 0
    assert f"depends on {symbol}: give --symbol {symbol}=VALUE" in capsys.readouterr().out
    assert replay_memory.main([str(tmp_path / "dynamic.py"), "--symbol", f"{symbol}=31"]) == 0
    assert capsys.readouterr().out.startswith("graph 0: peak ")
    (tmp_path / "empty.log").write_text("nothing compiled here\n")
    assert replay_memory.main([str(tmp_path / "empty.log")]) == 1


@given(symbol=st.integers(1, 10_000), width=st.integers(1, 512))
def test_printed_size_expressions_evaluate_as_python_would(symbol, width):
    printed = f"((-1) + 2*s77, {width}, s77//3 + (s77 - 1)*s77, max(1, {width} - s77))"
    assert replay_memory._ints(printed, {"s77": symbol}) == (
        2 * symbol - 1, width, symbol // 3 + (symbol - 1) * symbol, max(1, width - symbol))
    with pytest.raises(replay_memory.SymbolicSize):
        replay_memory._ints(printed, {})
    with pytest.raises(ValueError):
        replay_memory._ints("(s77 ** 2, 1)", {"s77": symbol})
