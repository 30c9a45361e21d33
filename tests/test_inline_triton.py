"""inline_triton: the fused QK-norm + RoPE op becomes its Triton launch in Inductor's graph (buffers planned
by Inductor, launched from its generated code); on CPU it declines quietly."""
import pytest
import torch
import torch.nn.functional as F

from diffopt import compat
from diffopt.testing import ON_CPU, Compiled, trace

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def front(q, k, wq, wk, cos, sin):
    q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), wk, 1e-5)
    # fp32 tables promote the rotation; the result goes back to the input's dtype, as models do
    q_out = (q * cos + rotate_half(q) * sin).to(q.dtype)
    k_out = (k * cos + rotate_half(k) * sin).to(k.dtype)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def inputs(device, dtype, B=2, S=40, H=8, Hk=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, S, Hk, D, generator=g).to(device, dtype)
    wq, wk = (torch.rand(D, generator=g) + 0.5).to(device, dtype), (torch.rand(D, generator=g) + 0.5).to(device, dtype)
    ang = torch.rand(S, D // 2, generator=g) * 6.28
    ang = torch.cat([ang, ang], -1).view(1, S, 1, D)
    return q, k, wq, wk, ang.cos().to(device), ang.sin().to(device)


def test_declines_off_cuda():
    result = trace(front, *inputs("cpu", torch.float32), options={**ON_CPU, "inductor": False})
    assert result.report.matches("qk_norm_rope") == 1 and result.report.matches("inline_triton") == 0
    assert any(d.reason == "inputs are not on CUDA" for d in result.report.declines if d.pass_name == "inline_triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_inductor_plans_and_launches_the_kernel(dtype):
    from torch._inductor.utils import run_and_get_code

    args = inputs("cuda", dtype)
    eager = front(*args)
    result = {}

    def run():
        result["trace"] = trace(front, *args, options={"inductor": True})
        return result["trace"].output

    outputs, codes = run_and_get_code(run)
    report = result["trace"].report
    assert report.matches("qk_norm_rope") == 1 and report.matches("inline_triton") == 1, report
    code = "\n".join(codes)
    assert "torch.ops.diffopt.qk_norm_rope" not in code and "_qk_norm_rope_kernel" in code
    for got, want in zip(outputs, eager):
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


@pytest.mark.gpu
@needs_cuda
def test_under_cuda_graphs():
    args = inputs("cuda", torch.bfloat16)
    eager = front(*args)
    compiled = torch.compile(front, backend="diffopt", mode="reduce-overhead")
    for _ in range(3):
        outputs = [o.clone() for o in compiled(*args)]
    for got, want in zip(outputs, eager):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("norm", ["head", "hidden", "no weights"])
def test_inlined_launch_computes_what_the_op_computes(norm):
    """Bit for bit: the inlined launch is the op's own kernel with the same fp32 math (Inductor types a
    Python float argument fp64, which once made eps, the statistic and its rsqrt fp64)."""
    op = torch.ops.diffopt.qk_norm_rope
    q, k, wq, wk, cos, sin = inputs("cuda", torch.bfloat16, S=257, H=8, Hk=8)
    hidden = norm == "hidden"
    if hidden:
        wq, wk = wq.repeat(8), wk.repeat(8)
    if norm == "no weights":
        wq = wk = None
    kwargs = dict(norm_over="hidden" if hidden else "head", rope_style="neox", rope_dim=-1, q_eps=1e-6, k_eps=1e-5)

    def call(q, k, wq, wk, cos, sin):
        return op(q, k, wq, wk, cos, sin, None, **kwargs)

    compiled = Compiled(call)
    got = compiled(q, k, wq, wk, cos, sin)
    assert compiled.report.matches("inline_triton") == 1, compiled.report
    for g, want in zip(got, call(q, k, wq, wk, cos, sin)):
        assert torch.equal(g, want)


def test_absent_weights_and_positions_reach_the_kernel_as_none(monkeypatch):
    """A tensor standing in for a pointer the kernel never reads is realized by Inductor as an argument
    of its own: a table passed for it was computed into a second buffer, in every layer."""
    def unweighted(q, k, cos, sin):
        q, k = F.rms_norm(q, (q.shape[-1],), None, 1e-6), F.rms_norm(k, (k.shape[-1],), None, 1e-6)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    q, k, _, _, _, cos, sin = prefix_inputs("cpu", torch.float32)
    _, launch = _rewritten_on_fake_cpu(monkeypatch, unweighted, (q, k, cos, sin))
    params = launch.kwargs["kwargs"]
    # (a None argument is a constant of the launch, kept out of its tensor arguments)
    assert {"q_ptr", "k_ptr", "cos_ptr", "sin_ptr"} <= set(params)
    assert all(params.get(name) is None for name in ("qw_ptr", "kw_ptr", "pos_ptr"))
    tables = [name for name, value in params.items() if value is params["cos_ptr"] or value is params["sin_ptr"]]
    assert sorted(tables) == ["cos_ptr", "sin_ptr"], tables


# --- tables many launches read: computed once -------------------------------------------------------------


def layers_sharing_tables(q1, k1, q2, k2, wq, wk, freqs, tables_from_inputs=None):
    """Two attention layers rotating with one set of tables, computed in the graph (Cosmos3's and Wan's
    models compute them once per forward and slice them in every layer) or given as inputs."""
    if tables_from_inputs is None:
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    else:
        cos, sin = tables_from_inputs
    outputs = []
    for q, k in ((q1, k1), (q2, k2)):
        q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
        k = F.rms_norm(k, (k.shape[-1],), wk, 1e-6)
        outputs += [q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin]
    return outputs


def layers_inputs(device, dtype, S=24, H=4, Hk=2, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = [torch.randn(1, S, h, D, generator=g).to(device, dtype) for h in (H, Hk, H, Hk)]
    wq, wk = (torch.rand(D, generator=g) + 0.5).to(device, dtype), (torch.rand(D, generator=g) + 0.5).to(device, dtype)
    return (*qk, wq, wk, (torch.rand(S, D // 2, generator=g) * 6.28).to(device, dtype))


def _launches(result):
    graph = result.graphs[-1][3]
    return [n for n in graph.nodes if "triton_kernel_wrapper_functional" in str(n.target)]


def test_tables_read_by_several_launches_are_computed_once(monkeypatch):
    result = _traced_on_fake_cpu(monkeypatch, layers_sharing_tables, layers_inputs("cpu", torch.float32))
    launches = _launches(result)
    assert len(launches) == 2
    for name in ("cos_ptr", "sin_ptr"):
        tables = {launch.kwargs["kwargs"][name] for launch in launches}
        assert len(tables) == 1, name
        (table,) = tables
        # one contiguous copy, its strides forced: Inductor realizes it once (a clone alone, it inlines, and
        # every launch makes its own copy)
        assert table.target is compat.force_stride_order() and table.meta["val"].is_contiguous()
        assert table.args[0].target is torch.ops.aten.clone.default
    assert result.report.matches("inline_triton") == 2  # the launches (the tables are part of their rewrite)
    assert sum("tables computed once for 2 launches" in r.by for r in result.report.rewrites) == 2


def test_tables_that_are_graph_inputs_are_not_copied(monkeypatch):
    args = layers_inputs("cpu", torch.float32)
    ang = torch.cat([args[-1], args[-1]], -1)[None, :, None, :]

    def layers(q1, k1, q2, k2, wq, wk, cos, sin):
        return layers_sharing_tables(q1, k1, q2, k2, wq, wk, None, tables_from_inputs=(cos, sin))

    result = _traced_on_fake_cpu(monkeypatch, layers, (*args[:-1], ang.cos(), ang.sin()))
    launches = _launches(result)
    assert len(launches) == 2
    graph = result.graphs[-1][3]
    assert not any(n.target in (torch.ops.aten.clone.default, compat.force_stride_order()) for n in graph.nodes)
    assert not any("tables computed once" in r.by for r in result.report.rewrites)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("inductor", [True, False], ids=["inductor", "aten"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_shared_tables_numerics(dtype, inductor):
    from torch._inductor.utils import run_and_get_code

    args = layers_inputs("cuda", dtype, S=300, H=8, Hk=4, D=128)
    compiled = Compiled(layers_sharing_tables, {"inductor": inductor})
    got, codes = run_and_get_code(compiled, *args)
    assert any("tables computed once" in r.by for r in compiled.report.rewrites), compiled.report
    if inductor:  # one buffer per table (cos, sin) for both launches
        assert "\n".join(codes).count("empty_strided_cuda((1, 300, 1, 128)") == 2, codes
    for g, want in zip(got, layers_sharing_tables(*args)):
        assert g.stride() == want.stride()
        torch.testing.assert_close(g, want, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


_FIXED_STRIDES = None


def _fixed_stride_op():
    """A stand-in for a launch on CPU: a custom op that needs fixed strides, as a user-defined Triton kernel
    does in Inductor."""
    global _FIXED_STRIDES
    if _FIXED_STRIDES is None:
        _FIXED_STRIDES = torch.library.Library("diffopt_inline_test", "DEF")
        _FIXED_STRIDES.define("scale(Tensor x, Tensor table) -> Tensor", tags=[torch.Tag.needs_fixed_stride_order])
        _FIXED_STRIDES.impl("scale", lambda x, table: x * table.sum(), "CompositeExplicitAutograd")
        _FIXED_STRIDES.impl("scale", lambda x, table: torch.empty_like(x), "Meta")
    return torch.ops.diffopt_inline_test.scale.default


class _ShareTable(compat.CustomGraphPass):
    """Every stand-in launch made to read one copy of its table: ``_materialize_once``, or a plain clone."""

    def __init__(self, forced):
        self.forced = forced

    def __call__(self, graph):
        from diffopt.fxpasses import inline_triton

        readers = [node for node in graph.nodes if node.target is _fixed_stride_op()]
        table = readers[0].args[1]
        if self.forced:
            inline_triton._materialize_once(graph, table, [(node, 1) for node in readers])
            return
        with graph.inserting_after(table):
            copy = graph.call_function(torch.ops.aten.clone.default, (table,), {"memory_format": torch.contiguous_format})
        copy.meta["val"] = table.meta["val"].clone()
        for node in readers:
            node.update_arg(1, copy)

    def uuid(self):
        return f"test_inline_triton._ShareTable({self.forced})"


@pytest.mark.parametrize("forced", [True, False], ids=["materialize_once", "clone only"])
def test_a_shared_table_is_one_buffer_in_inductors_code(forced):
    from torch._inductor.utils import run_and_get_code

    scale = _fixed_stride_op()

    def two_launches(x, base):
        table = (base.cos() * 2)[3:].unsqueeze(0)
        return scale(scale(x, table), table)

    x, base = torch.randn(4, 8), torch.randn(int(torch.randint(5, 30, ())), 8)
    torch.compiler.reset()
    with torch._inductor.config.patch(fx_graph_cache=False, post_grad_custom_post_pass=_ShareTable(forced)):
        out, codes = run_and_get_code(torch.compile(two_launches), x, base)
    # a clone alone is inlined, and each consumer that needs fixed strides makes its own copy
    assert "\n".join(codes).count(f"empty_strided_cpu((1, {base.shape[0] - 3}, 8)") == (1 if forced else 2)
    torch.testing.assert_close(out, two_launches(x, base))


# --- an output read only by a cat: the kernel writes into the cat's buffer -----------------------------


def prefix_layer(q, k, k_prefix, wq, wk, cos, sin, cat_dim=0):
    """Cosmos3's generation attention: the rotated K goes after the understanding tokens' K."""
    q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
    k = F.rms_norm(k, (k.shape[-1],), wk, 1e-6)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q, torch.cat([k_prefix, k], dim=cat_dim)


def prefix_inputs(device, dtype, S=24, H=4, Hk=2, D=32, P=5, batch=(), prefix_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, S, H, D, generator=g).to(device, dtype)
    k = torch.randn(*batch, S, Hk, D, generator=g).to(device, dtype)
    k_prefix = torch.randn(*batch, P, Hk, D, generator=g).to(device, prefix_dtype or dtype)
    wq, wk = (torch.rand(D, generator=g) + 0.5).to(device, dtype), (torch.rand(D, generator=g) + 0.5).to(device, dtype)
    ang = torch.rand(S, D // 2, generator=g) * 6.28
    ang = torch.cat([ang, ang], -1)[:, None]
    # tables in the activations' dtype: the rotation computes in it, as Cosmos3's does
    return q, k, k_prefix, wq, wk, ang.cos().to(device, dtype), ang.sin().to(device, dtype)


def _traced_on_fake_cpu(monkeypatch, fn, args):
    """The trace of the graph inline_triton leaves, from CPU stand-ins (the launch is traced, never run:
    Triton runs on CUDA)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffopt.fxpasses import inline_triton

    monkeypatch.setattr(inline_triton, "_not_inlinable", lambda node: None)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return trace(fn, *[mode.from_tensor(a) for a in args], options={**ON_CPU, "inductor": False})


@pytest.mark.parametrize("why", ["other rows of one table", "a view of a graph input through unbind", "expanded"])
def test_tables_that_are_not_one_computed_value_are_not_shared(monkeypatch, why):
    q1, k1, q2, k2, wq, wk, freqs = layers_inputs("cpu", torch.float32)
    S = q1.shape[1]

    def two_layers(q1, k1, q2, k2, wq, wk, table):
        if why == "other rows of one table":  # one computation, each layer its own rows
            emb = torch.cat([table, table], -1).repeat(2, 1)
            cos, sin = emb.cos(), emb.sin()
            tables = [(cos[i * S:(i + 1) * S][None, :, None], sin[i * S:(i + 1) * S][None, :, None]) for i in (0, 1)]
        elif why == "a view of a graph input through unbind":  # cos and sin stacked in one input
            cos, sin = (t[None, :, None] for t in table.unbind(0))
            tables = [(cos, sin)] * 2
        else:  # computed, then expanded over a batch of 2: a copy would be twice the table
            emb = torch.cat([table, table], -1)
            cos, sin = (t[None, :, None].expand(2, S, 1, emb.shape[-1]) for t in (emb.cos(), emb.sin()))
            tables = [(cos, sin)] * 2
        outputs = []
        for (q, k), (cos, sin) in zip(((q1, k1), (q2, k2)), tables):
            q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
            k = F.rms_norm(k, (k.shape[-1],), wk, 1e-6)
            outputs += [q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin]
        return outputs

    if why == "a view of a graph input through unbind":
        ang = torch.cat([freqs, freqs], -1)
        table = torch.stack([ang.cos(), ang.sin()])
    else:
        table = freqs
    if why == "expanded":
        q1, k1, q2, k2 = (x.expand(2, *x.shape[1:]).contiguous() for x in (q1, k1, q2, k2))
    result = _traced_on_fake_cpu(monkeypatch, two_layers, (q1, k1, q2, k2, wq, wk, table))
    launches = _launches(result)
    assert len(launches) == 2, why
    for launch in launches:
        for name in ("cos_ptr", "sin_ptr"):
            assert launch.kwargs["kwargs"][name].target is not compat.force_stride_order(), (why, name)
    assert not any("tables computed once" in r.by for r in result.report.rewrites), why


def _rewritten_on_fake_cpu(monkeypatch, fn, args):
    """The trace and its one launch."""
    result = _traced_on_fake_cpu(monkeypatch, fn, args)
    (launch,) = _launches(result)
    return result, launch


def test_output_read_by_a_cat_is_written_into_it(monkeypatch):
    S, Hk, D, P = 24, 2, 32, 5
    result, launch = _rewritten_on_fake_cpu(monkeypatch, prefix_layer, prefix_inputs("cpu", torch.float32, S=S, Hk=Hk, D=D, P=P))
    assert result.report.matches("inline_triton") == 1
    assert any("written into the cat" in r.by for r in result.report.rewrites if r.pass_name == "inline_triton")
    params = launch.kwargs["kwargs"]
    buffer = params["ko_ptr"]
    # the buffer is the cat with zeros where the kernel writes, after the P prefix rows
    assert buffer.target is torch.ops.aten.cat.default and buffer.args[0][1].target is torch.ops.aten.full.default
    assert (params["ko_off"], params["qo_off"]) == (P * Hk * D, 0)
    assert tuple(buffer.meta["val"].shape) == (P + S, Hk, D)
    graph = result.graphs[-1][3]
    output = next(n for n in graph.nodes if n.op == "output")
    assert output.args[0][1].args == (launch, "ko_ptr")  # the model's cat is the filled buffer
    assert sum(n.target is torch.ops.aten.cat.default for n in graph.nodes) == 1


@pytest.mark.parametrize(
    "why, kwargs, cat_dim",
    [
        ("the block is not dense: a batch dim comes before the cat's", dict(batch=(2,)), 1),
        ("the cat promotes to another dtype", dict(prefix_dtype=torch.float64), 0),
    ],
)
def test_output_read_by_a_cat_keeps_its_buffer_otherwise(monkeypatch, why, kwargs, cat_dim):
    args = prefix_inputs("cpu", torch.float32, **kwargs)
    result, launch = _rewritten_on_fake_cpu(monkeypatch, lambda *a: prefix_layer(*a, cat_dim=cat_dim), args)
    assert result.report.matches("inline_triton") == 1, why
    params = launch.kwargs["kwargs"]
    assert params["ko_off"] == 0 and params["ko_ptr"].target is not torch.ops.aten.cat.default, why
    assert any(n.target is torch.ops.aten.cat.default and launch in _ancestors(n) for n in result.graphs[-1][3].nodes)


def _ancestors(node):
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("inductor", [True, False], ids=["inductor", "aten"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_into_the_cat_numerics(inductor, dtype):
    args = prefix_inputs("cuda", dtype, S=300, H=8, Hk=4, D=128, P=17)
    eager = prefix_layer(*args)
    result = trace(prefix_layer, *args, options={"inductor": inductor})
    assert result.report.matches("inline_triton") == 1, result.report
    assert any("written into the cat" in r.by for r in result.report.rewrites if r.pass_name == "inline_triton")
    for got, want in zip(result.output, eager):
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)
    # the prefix rows are the prefix itself, bit for bit
    assert torch.equal(result.output[1][:17], args[2])


@pytest.mark.gpu
@needs_cuda
def test_inductor_off_numerics():
    args = inputs("cuda", torch.bfloat16)
    eager = front(*args)
    result = trace(front, *args, options={"inductor": False})
    assert result.report.matches("inline_triton") == 1, result.report
    for got, want in zip(result.output, eager):
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "why, tail",
    [
        ("the cat's other operand is computed from the op's other output", lambda q, k: torch.cat([torch.tanh(q), k], 0)),
        ("both outputs go into one cat", lambda q, k: torch.cat([q, k], 0)),
    ],
)
def test_a_cat_that_needs_the_launch_keeps_the_outputs_buffers(monkeypatch, why, tail):
    def layer(q, k, wq, wk, cos, sin):  # both rotated, then the tail's cat
        q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
        k = F.rms_norm(k, (k.shape[-1],), wk, 1e-6)
        return tail(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)

    q, k, _, wq, wk, cos, sin = prefix_inputs("cpu", torch.float32, H=2, Hk=2)
    result, launch = _rewritten_on_fake_cpu(monkeypatch, layer, (q, k, wq, wk, cos, sin))  # strict: raising fails
    assert result.report.matches("inline_triton") == 1, why
    params = launch.kwargs["kwargs"]
    assert params["qo_off"] == params["ko_off"] == 0, why
    assert not any("written into the cat" in r.by for r in result.report.rewrites), why


def test_a_view_of_a_graph_input_is_never_written_over(monkeypatch):
    def bhsd(q, k, wq, wk, cos, sin):  # [B, H, S, D] inputs, rotated as [B, S, H, D] views of them
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = F.rms_norm(q, (q.shape[-1],), wq, 1e-6)
        k = F.rms_norm(k, (k.shape[-1],), wk, 1e-6)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    q, k, _, wq, wk, cos, sin = prefix_inputs("cpu", torch.float32, batch=(1,), H=4, Hk=4)
    result, launch = _rewritten_on_fake_cpu(monkeypatch, bhsd, (q.transpose(1, 2), k.transpose(1, 2), wq, wk, cos, sin))
    params = launch.kwargs["kwargs"]
    for out, inp in (("qo_ptr", "q_ptr"), ("ko_ptr", "k_ptr")):
        assert params[out] is not params[inp], "the op's output must not alias a graph input"


def front_at_timestep(q, k, wq, wk, cos, sin, t):
    """A rotation, and one timestep read on the host twice (a denoising step's ``t.item()`` deciding
    a slice, for each half of a CFG batch), which hoist_item merges."""
    q_out, k_out = front(q, k, wq, wk, cos, sin)
    return q_out[:, : int(t[0].item())], k_out[:, : int(t.flatten()[0].item())]


def test_a_launch_nodes_dict_value_does_not_stop_the_passes_after_it(monkeypatch):
    """A launch's value is a dict of its tensors. hoist_item, which reads every node's value for
    unbacked symbols when it merges reads, raised on it under torch 2.11 (on the GPU, in every
    denoising step): its ``free_unbacked_symbols`` rejects a dict, which torch 2.13's accepts."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    from torch.fx.experimental import symbolic_shapes

    from diffopt.fxpasses import inline_triton
    from diffopt.pipeline import observing

    iterate_exprs = symbolic_shapes._iterate_exprs

    def as_torch_2_11(value):
        if isinstance(value, dict):
            raise AssertionError(f"cannot extract sympy expressions from {value} {type(value)}")
        return iterate_exprs(value)

    monkeypatch.setattr(symbolic_shapes, "_iterate_exprs", as_torch_2_11)
    monkeypatch.setattr(inline_triton, "_not_inlinable", lambda node: None)
    args = (*inputs("cpu", torch.float32, B=1, S=8, H=2, Hk=2, D=32), torch.tensor([5, 5]))
    graphs = []
    torch.compiler.reset()
    compiled = torch.compile(front_at_timestep, backend="diffopt", fullgraph=True,
                             options={**ON_CPU, "inductor": False, "strict": True})  # strict: a pass that raises fails
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, observing(lambda *record: graphs.append(record)):
        # the passes run on the trace; the compiled graph then reads the fake timestep and stops there
        with pytest.raises(DataDependentOutputException):
            compiled(*[mode.from_tensor(a) for a in args])
    (after,) = [after for name, _, _, after in graphs if name == "hoist_item"]
    assert sum("triton_kernel_wrapper_functional" in str(n.target) for n in after.nodes) == 1
    assert sum(n.target is torch.ops.aten._local_scalar_dense.default for n in after.nodes) == 1
