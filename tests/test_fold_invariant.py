"""fold_invariant: step-invariant tables computed once while compiling, never anything that
depends on weights, buffers or inputs; invalidation through new graphs only."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diffopt
from diffopt.models.configs import get_config
from diffopt.models.loop import DenoiseStep, loop_example_inputs
from diffopt.models.rope import wan_rope_tables
from diffopt.report import Report, collecting
from diffopt.testing import Compiled, count_ops, only, trace

PASS = "fold_invariant"
ATEN = {"inductor": False}


def constants(graph):
    """``{name: tensor}`` of the constants fold_invariant put into ``graph``."""
    return {
        n.target: getattr(graph.owning_module, n.target)
        for n in graph.nodes
        if n.op == "get_attr" and n.target.startswith("_diffopt_folded_")
    }


def rope_table(x):
    # A half-split RoPE table built from the shape on every call (the stock form).
    S, D = x.shape
    pos = torch.arange(S, dtype=torch.float32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = torch.outer(pos, inv_freq)
    return x * torch.cat([angles.cos(), angles.sin()], dim=-1)


# --- the reference denoising step ------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_step():
    config = get_config("wan-tiny")
    torch.manual_seed(0)
    step = DenoiseStep(config).eval()
    latents, timesteps, context = loop_example_inputs(config)
    return step, (latents, timesteps[:1], context)


@torch.no_grad()
def test_denoise_step_rope_tables_are_folded(wan_step):
    step, args = wan_step
    result = trace(step, *args, options={"passes": {"qk_norm_rope": {"devices": ["cpu"]}}})
    before, after = count_ops(result.before(PASS)), count_ops(result.after(PASS))
    for op in ("aten.cos.default", "aten.sin.default", "prims.iota.default", "aten.pow.Scalar"):
        assert before[op] >= 1 and after[op] == 0, (op, before[op], after[op])
    assert result.report.matches(PASS) == 2
    # The constants are the tables eager code builds, bit for bit, stored once (not per block).
    cos, sin = wan_rope_tables(step.config.head_dim, step.config.rope_grid, step.config.rope_theta)
    folded = constants(result.after(PASS))
    assert len(folded) == 2
    assert any(torch.equal(t.reshape(cos.shape), cos) for t in folded.values())
    assert any(torch.equal(t.reshape(sin.shape), sin) for t in folded.values())
    # The rest of the pipeline still recognizes the rotation, now reading the constants.
    assert result.report.matches("qk_norm_rope") == 2
    torch.testing.assert_close(result.output, step(*args))
    # Folding changes no bit of the compiled step.
    unfolded = trace(step, *args, options={"passes": {PASS: False}})
    assert torch.equal(result.output, unfolded.output)


@torch.no_grad()
def test_weight_and_buffer_changes_are_seen(wan_step):
    step, args = wan_step
    step = DenoiseStep(step.config).eval()
    step.load_state_dict(wan_step[0].state_dict())
    compiled = Compiled(step, ATEN)
    torch.testing.assert_close(compiled(*args), step(*args))
    assert compiled.report.matches(PASS) == 2
    outputs = [compiled(*args)]

    step.proj_in.weight.copy_(torch.randn_like(step.proj_in.weight))  # in place
    outputs.append(compiled(*args))
    torch.testing.assert_close(outputs[-1], step(*args))

    to_q = step.blocks.blocks[0].attn1.to_q  # LoRA-style swap: a new weight tensor
    lora_a, lora_b = torch.randn(4, to_q.in_features), torch.randn(to_q.out_features, 4)
    to_q.weight = nn.Parameter(to_q.weight + 0.1 * lora_b @ lora_a)
    outputs.append(compiled(*args))
    torch.testing.assert_close(outputs[-1], step(*args))

    step.timestep_table.mul_(0.5)  # a buffer, in place
    outputs.append(compiled(*args))
    torch.testing.assert_close(outputs[-1], step(*args))
    assert all(not torch.allclose(a, b) for a, b in zip(outputs, outputs[1:]))
    assert len(compiled.report.graphs) == 1  # none of this needed a new graph

    # A new batch size: a new graph (batch now symbolic), its tables folded again.
    latents, timestep, context = args
    batch2 = (torch.cat([latents, -latents]), timestep.repeat(2), torch.cat([context, context]))
    torch.testing.assert_close(compiled(*batch2), step(*batch2))
    assert len(compiled.report.graphs) == 2 and compiled.report.matches(PASS) == 2 * 2


@torch.no_grad()
def test_inductor_folds_and_sees_weight_changes(wan_step):
    step, args = wan_step
    step = DenoiseStep(step.config).eval()
    step.load_state_dict(wan_step[0].state_dict())
    compiled = Compiled(step, {})  # one Inductor compile, as diffopt.explain does it
    torch.testing.assert_close(compiled(*args), step(*args))
    assert compiled.report.matches(PASS) == 2
    text = str(compiled.report)
    assert "fold_invariant" in text and "rope.py" in text and "computed once while compiling" in text
    step.proj_out.weight.copy_(torch.randn_like(step.proj_out.weight))
    to_k = step.blocks.blocks[1].attn1.to_k
    to_k.weight = nn.Parameter(to_k.weight * 1.5)
    torch.testing.assert_close(compiled(*args), step(*args))


# --- shapes: a new graph, never a stale table --------------------------------------------------


@torch.no_grad()
def test_a_new_shape_compiles_a_new_graph_with_its_own_table():
    compiled = Compiled(rope_table, ATEN, dynamic=False)
    for shape in ((16, 8), (24, 8), (16, 12)):
        x = torch.randn(shape)
        assert torch.equal(compiled(x), rope_table(x))
    assert len(compiled.report.graphs) == 3
    assert compiled.report.matches(PASS) == 3  # the cat(cos, sin) table of each graph


@torch.no_grad()
def test_a_dynamic_length_is_not_folded_but_its_static_part_is():
    compiled = Compiled(rope_table, ATEN)
    for length in (16, 24, 40):  # the second length recompiles with a symbolic length
        x = torch.randn(length, 8)
        assert torch.equal(compiled(x), rope_table(x))
    assert len(compiled.report.graphs) == 2
    dynamic_folds = [r for r in compiled.report.rewrites if r.pass_name == PASS and r.graph == compiled.report.graphs[1]]
    assert [r.replaced.split(" (")[0] for r in dynamic_folds] == ["step-invariant table float32[4]"]  # inv_freq only


# --- near misses -------------------------------------------------------------------------------


def rope_from_positions(x, positions):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    angles = positions[:, None].float() * inv_freq
    return x * torch.cat([angles.cos(), angles.sin()], dim=-1)


class BufferPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("positions", torch.arange(16, dtype=torch.float32))

    def forward(self, x):
        return rope_from_positions(x, self.positions)


class ParameterFreqs(nn.Module):
    def __init__(self):
        super().__init__()
        self.freqs = nn.Parameter(torch.rand(8))

    def forward(self, x):
        return x * torch.cos(torch.arange(16, dtype=torch.float32)[:, None] * self.freqs)


@torch.no_grad()
def test_a_table_of_input_positions_is_not_folded():
    x = torch.randn(16, 8)
    compiled = Compiled(rope_from_positions, only("dedupe", PASS))
    for offset in (0, 5):
        positions = torch.arange(16) * 2 + offset
        torch.testing.assert_close(compiled(x, positions), rope_from_positions(x, positions))
    result = trace(rope_from_positions, x, torch.arange(16), options=only(PASS))
    after = count_ops(result.after(PASS))
    assert after["aten.cos.default"] == 1 and after["aten.sin.default"] == 1
    # Only the position-independent inverse frequencies became a constant.
    assert [tuple(t.shape) for t in constants(result.after(PASS)).values()] == [(4,)]


@torch.no_grad()
def test_tables_of_buffers_and_parameters_are_not_folded():
    x = torch.randn(16, 8)
    for module, update in (
        (BufferPositions(), lambda m: m.positions.add_(3)),
        (ParameterFreqs(), lambda m: m.freqs.mul_(2)),
    ):
        torch._dynamo.reset()
        compiled = Compiled(module, only(PASS))
        torch.testing.assert_close(compiled(x), module(x))
        update(module)
        torch.testing.assert_close(compiled(x), module(x))
        result = trace(module, x, options=only(PASS))
        assert count_ops(result.after(PASS))["aten.cos.default"] == 1


def random_table(x):
    return x + torch.randn(4).cos()


def uninitialized_table(x):
    return x + torch.empty(4).cos()


def index_table(x):
    return x * (torch.arange(4, dtype=torch.float32) * 2 + 1)


@torch.no_grad()
@pytest.mark.parametrize("fn", [random_table, uninitialized_table, index_table])
def test_random_uninitialized_and_index_only_tables_stay(fn):
    result = trace(fn, torch.randn(4), options=only(PASS))
    assert result.report.matches(PASS) == 0
    assert count_ops(result.after(PASS)) == count_ops(result.before(PASS))


@torch.no_grad()
def test_random_table_is_drawn_every_call():
    compiled = Compiled(random_table, only(PASS))
    x = torch.zeros(4)
    assert not torch.equal(compiled(x), compiled(x))


def returns_its_table(x):
    angles = torch.outer(torch.arange(4.0), torch.arange(4.0) * 0.1)
    table = torch.cat([angles.cos(), angles.sin()], -1)
    return x * table, table


@torch.no_grad()
def test_a_table_returned_to_the_caller_is_never_the_constant():
    x = torch.randn(4, 8)
    compiled = Compiled(returns_its_table, only(PASS))
    _, table = compiled(x)
    table.add_(100.0)  # the caller owns what it gets back
    out, table = compiled(x)
    expected = returns_its_table(x)
    torch.testing.assert_close((out, table), expected)
    # cos and sin became constants; the cat making the returned tensor stays in the graph.
    result = trace(returns_its_table, x, options=only(PASS))
    assert result.report.matches(PASS) == 2 and count_ops(result.after(PASS))["aten.cat.default"] == 1


def lifted_literal(x):
    return x * torch.tensor([1.0, 2.0, 3.0, 4.0]).exp()


@torch.no_grad()
def test_a_lifted_literal_pushed_through_math_is_folded():
    x = torch.randn(4)
    result = trace(lifted_literal, x, options=only(PASS))
    assert result.report.matches(PASS) == 1
    assert count_ops(result.after(PASS)) == {"aten.mul.Tensor": 1}
    torch.testing.assert_close(result.output, lifted_literal(x))


# --- memory --------------------------------------------------------------------------------


def broadcast_tables(x):
    table = torch.arange(16, dtype=torch.float32).cos()
    return x * table.expand(8, 16), x * table.repeat(8, 1)


@torch.no_grad()
def test_broadcasts_fold_the_small_tensor():
    x = torch.randn(8, 16)
    result = trace(broadcast_tables, x, options=only(PASS))
    assert [tuple(t.shape) for t in constants(result.after(PASS)).values()] == [(16,)]
    after = count_ops(result.after(PASS))
    assert after["aten.expand.default"] == 1 and after["aten.repeat.default"] == 1
    torch.testing.assert_close(result.output, broadcast_tables(x))


@torch.no_grad()
def test_a_table_over_the_size_limit_stays_and_its_small_inputs_fold():
    x = torch.randn(16, 32)
    result = trace(rope_table, x, options=only(PASS, max_bytes=512))  # angles, cos, sin: 1 KiB each
    after = count_ops(result.after(PASS))
    assert after["aten.cos.default"] == 1 and after["aten.sin.default"] == 1
    assert [tuple(t.shape) for t in constants(result.after(PASS)).values()] == [(16,)]  # inv_freq
    torch.testing.assert_close(result.output, rope_table(x))
    # A budget for all constants of the graph together: nothing fits in 32 bytes.
    result = trace(rope_table, x, options=only(PASS, max_total_bytes=32))
    assert result.report.matches(PASS) == 0
    torch.testing.assert_close(result.output, rope_table(x))


# --- with dedupe: one time embedding for both CFG branches ------------------------------------------


def sinusoidal(t, dim=32):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def cfg_time_embedding(x, t, w1, w2):
    cond = F.linear(F.silu(F.linear(sinusoidal(t), w1)), w2)
    uncond = F.linear(F.silu(F.linear(sinusoidal(t), w1)), w2)  # the same embedding again
    return x * cond + 0.5 * x * uncond


@torch.no_grad()
def test_with_dedupe_the_time_embedding_is_computed_once():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 16, generator=g), torch.tensor([999, 999]), torch.randn(16, 32, generator=g), torch.randn(16, 16, generator=g))
    result = trace(cfg_time_embedding, *args, options=only("dedupe", PASS))
    before, after = count_ops(result.before("dedupe")), count_ops(result.after(PASS))
    assert before["aten.mm.default"] == 4 and after["aten.mm.default"] == 2
    assert before["aten.cos.default"] == 2 and after["aten.cos.default"] == 1
    # exp: two frequency tables and two silu; after: silu once, the frequency table a constant.
    assert before["aten.exp.default"] == 4 and after["aten.exp.default"] == 1
    assert result.report.matches(PASS) == 1
    assert [tuple(t.shape) for t in constants(result.after(PASS)).values()] == [(16,)]
    torch.testing.assert_close(result.output, cfg_time_embedding(*args))


# --- Inductor: explain, and the FX graph cache ---------------------------------------------------


@torch.no_grad()
def test_explain_lists_what_was_cached_and_a_cache_hit_keeps_the_constants(tmp_path, monkeypatch):
    x = torch.randn(16, 8)
    report = diffopt.explain(rope_table, x)
    assert report.matches(PASS) == 1
    assert "_diffopt_folded_" in str(report) and "cos" in str(report)
    torch.testing.assert_close(report.output, rope_table(x))

    # Inductor's cache stores the constants with the compiled graph: a hit (no pass runs) has them.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    counters = torch._dynamo.utils.counters
    for expect_hit in (False, True):
        torch._dynamo.reset()
        counters.clear()
        run = Report()
        with collecting(run), torch._inductor.config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
            out = torch.compile(rope_table, backend="diffopt")(x)
        hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
        assert bool(hits) == expect_hit and run.matches(PASS) == (0 if expect_hit else 1)
        torch.testing.assert_close(out, rope_table(x))


def biased_attention(q, k, v):
    S = q.shape[-2]
    positions = torch.arange(S, dtype=torch.float32)
    bias = torch.outer(positions, positions * 0.1).cos()  # the constant itself is the mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@torch.no_grad()
def test_inductor_fallback_kernel_reads_a_constant():
    # SDPA on CPU is a fallback kernel: Inductor hands it the constant itself while compiling.
    q, k, v = torch.randn(3, 1, 2, 8, 16).unbind(0)
    report = diffopt.explain(biased_attention, q, k, v, options={"strict": True})
    assert report.matches(PASS) == 1
    torch.testing.assert_close(report.output, biased_attention(q, k, v))


def test_a_folded_value_takes_the_strides_the_graph_recorded():
    # A dense value evaluated with other strides than the graph's is copied into the graph's
    # layout. (This is the call that raised on torch 2.13, which has no
    # torch._prims_common.is_non_overlapping_and_dense: the pass was skipped.)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffopt.fxpasses.step_invariant import _with_recorded_layout

    value = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    with FakeTensorMode() as mode:
        column_major = mode.from_tensor(torch.empty(4, 3).t())
        broadcast = mode.from_tensor(torch.empty(3, 1).expand(3, 4))
    out = _with_recorded_layout(value, column_major)
    assert out.stride() == (1, 3) and torch.equal(out, value)
    assert _with_recorded_layout(value, broadcast) is None  # an overlapping layout is no tensor of its own
