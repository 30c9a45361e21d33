"""diffopt.compat: every private torch API diffopt uses resolves on this torch, and does what its callers expect."""
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from diffopt import compat


def test_every_private_api_resolves():
    assert compat.missing() == []
    assert compat.CustomGraphPass is not None
    assert issubclass(compat.ConstantFolder, torch.fx.Interpreter)
    assert compat.BackendCompilerFailed is torch._dynamo.exc.BackendCompilerFailed


def dense_reference(tensor):
    """Non-overlapping and dense, by definition: its elements sit at distinct offsets that fill a range."""
    offsets = [
        sum(i * s for i, s in zip(index, tensor.stride()))
        for index in itertools.product(*(range(n) for n in tensor.shape))
    ]
    return len(set(offsets)) == len(offsets) and (not offsets or max(offsets) - min(offsets) + 1 == len(offsets))


def strided_cases():
    base = torch.randn(4, 6, 5)
    yield base
    yield base.transpose(0, 2)
    yield base.permute(1, 2, 0)
    yield base[:, ::2]  # gaps
    yield base[:, :3]  # gaps between rows
    yield base[1:3]  # offset, still dense
    yield base[:1, :, 2:3]
    yield torch.randn(3, 1).expand(3, 4)  # overlapping
    yield torch.randn(7).as_strided((3, 3), (2, 1))  # overlapping
    yield torch.randn(5)[::2]
    yield torch.randn(1, 1, 1)
    yield torch.randn(0, 3)
    yield torch.randn(2, 3, 4).transpose(1, 2)
    yield torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    yield torch.randn(6).as_strided((2, 3), (1, 2))  # column-major


@pytest.fixture(params=["torch", "fallback"])
def lookups(request, monkeypatch):
    """The private APIs as this torch has them, or as a torch that lacks them all (the fallbacks)."""
    if request.param == "fallback":
        monkeypatch.setattr(compat, "PRIVATE", {entry: (("no.such.module", "x"),) for entry in compat.PRIVATE})
    return request.param


@pytest.mark.parametrize("case", range(len(list(strided_cases()))))
def test_non_overlapping_and_dense(case, lookups):
    tensor = list(strided_cases())[case]
    assert compat.is_non_overlapping_and_dense(tensor) == dense_reference(tensor)
    with FakeTensorMode() as mode:  # the way fold_invariant asks: about a graph's fake value
        fake = mode.from_tensor(tensor)
        assert compat.is_non_overlapping_and_dense(fake) == dense_reference(tensor)


def test_real_mode_leaves_fake_mode_and_autocast():
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2, 2))
        assert compat.detect_fake_mode([fake]) is mode
        with torch.autocast("cpu", dtype=torch.bfloat16), compat.real_mode():
            real = torch.randn(3, 4)
            assert not isinstance(real, FakeTensor)
            assert (real @ real.t()).dtype == torch.float32  # autocast off
            assert not torch.is_grad_enabled()
        assert isinstance(torch.ones(1), FakeTensor)


def test_fallbacks(monkeypatch):
    monkeypatch.setattr(compat, "PRIVATE", {entry: (("no.such.module", "x"),) for entry in compat.PRIVATE})
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2, 2))
        assert compat.detect_fake_mode([fake]) is mode
        with pytest.raises(RuntimeError, match="diffopt.compat"):  # no way to leave the fake mode
            with compat.real_mode():
                pass
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), compat.autocast_disabled():
        assert (x @ x.t()).dtype == torch.float32
    assert compat.tracing_context() is None and compat.dynamo_graph() is None
    assert compat.resolve_process_group("any") is None and compat.process_groups() == []
    assert not compat.wrap_backend_lookup(lambda requested, backend: None)
    assert not compat.intercept_frame_conversion(lambda backend: True, lambda code, convert: convert())


def test_clear_graph_keeps_everything_but_the_nodes():
    # Every attribute of a Graph is either a setting clear_graph keeps or part of the node list
    # it makes anew; a torch that adds one fails here, before a rollback mishandles it.
    assert set(vars(fx.Graph())) == set(compat.GRAPH_SETTINGS) | set(compat.GRAPH_NODE_LIST)

    gm = fx.symbolic_trace(lambda x, y: (x.sin() + y, x * 2))
    graph = gm.graph
    codegen, tracer_cls, owner = graph._codegen, graph._tracer_cls, graph.owning_module
    before = graph.python_code("self").src
    copy = fx.Graph()
    out = copy.graph_copy(graph, {})
    copy.output(out)
    # Break a link the way a bad rewrite does: erase_node on this graph now fails.
    sin = next(n for n in graph.nodes if n.op == "call_method" and n.target == "sin")
    sin.users.clear()
    compat.clear_graph(graph)
    assert len(graph.nodes) == 0
    assert (graph._codegen, graph._tracer_cls, graph.owning_module) == (codegen, tracer_cls, owner)
    graph.output(graph.graph_copy(copy, {}))
    graph.lint()
    assert graph.python_code("self").src == before
    gm.recompile()
    x, y = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(gm(x, y), (x.sin() + y, x * 2))


def test_dynamo_state_during_a_compile():
    seen = {}

    def backend(gm, example_inputs):
        seen["context"] = compat.tracing_context()
        graph = compat.dynamo_graph()
        seen["sources"] = [n.meta["grapharg"].source.name for n in graph.nodes if n.op == "placeholder"]
        return gm.forward

    torch.compile(lambda x, y: x + y, backend=backend)(torch.randn(2), torch.randn(2))
    assert seen["context"] is not None and seen["context"].fake_mode is not None
    assert [str(s() if callable(s) else s) for s in seen["sources"]] == ["L['x']", "L['y']"]
    assert compat.tracing_context() is None and compat.dynamo_graph() is None


def test_process_groups(tmp_path):
    assert compat.resolve_process_group("no such group") is None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        [(found, name, ranks)] = compat.process_groups()
        assert found is group and ranks == [0]
        assert compat.resolve_process_group(group.group_name) is group
    finally:
        dist.destroy_process_group()
    assert compat.process_groups() == []
