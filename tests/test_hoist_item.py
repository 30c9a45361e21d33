""".item() timestep reads: no graph break with backend="diffopt", one read per step at most, none
where only tensor math uses the number, and a 30-step loop that never recompiles."""
import functools
import subprocess
import sys
import textwrap

import pytest
import torch

from diffopt.backend import diffopt_backend
from diffopt.models.configs import get_config
from diffopt.models.loop import DenoiseStep, denoise, loop_example_inputs
from diffopt.testing import count_ops, only, trace

READ = "aten._local_scalar_dense.default"


def run_time_reads(fn, *args):
    """Output of ``fn(*args)`` and how many ``_local_scalar_dense`` ran (device-to-host reads on GPU).

    The profiler sees compiled code, ATen graphs and Inductor's generated ``.item()`` alike
    (a TorchDispatchMode would make Dynamo fall back to eager)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, sum(event.name == "aten::_local_scalar_dense" for event in prof.events())


def graph_breaks():
    return sum(torch._dynamo.utils.counters["graph_break"].values())


# --- the stock forms -----------------------------------------------------------------


def flatten_form(x, t, table):
    return x * table[int(t.flatten()[0].item())]


def item_form(x, t, table):
    return x[: t.item()].sum() + table[t.item()]


def cpu_form(x, t, table):
    return x * t.cpu().item() + table[int(t.cpu().item())]


FORMS = [flatten_form, item_form, cpu_form]


@pytest.fixture
def step_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=g), torch.tensor([3, 3]), torch.randn(10, 4, generator=g)


def _inputs_for(form, step_inputs):
    x, t, table = step_inputs
    return (x, t[:1], table) if form is not flatten_form else (x, t, table)


BACKENDS = {
    "name+options": dict(backend="diffopt", options={"inductor": False}),
    "partial": dict(backend=functools.partial(diffopt_backend, options={"inductor": False})),
    "name": dict(backend="diffopt"),
    "name+mode": dict(backend="diffopt", mode="reduce-overhead"),
    "callable": dict(backend=diffopt_backend),
}
# Every form through the quick (ATen) path; the Inductor paths with one form.
CASES = [(form, name) for form in FORMS for name in ("name+options", "partial")] + [
    (flatten_form, name) for name in ("name", "name+mode", "callable")
]


@torch.no_grad()
@pytest.mark.parametrize("form, backend", CASES, ids=[f"{f.__name__}-{b}" for f, b in CASES])
def test_no_graph_break(form, backend, step_inputs):
    args = _inputs_for(form, step_inputs)
    before = torch._dynamo.config.capture_scalar_outputs
    torch._dynamo.utils.counters.clear()
    out = torch.compile(form, **BACKENDS[backend])(*args)
    assert graph_breaks() == 0, dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(out, form(*args))
    # The config is set around diffopt's compiles only, not process-wide.
    assert torch._dynamo.config.capture_scalar_outputs == before


@torch.no_grad()
def test_other_backends_still_break(step_inputs):
    # The check above can see a break: the same code under another backend has one.
    torch._dynamo.utils.counters.clear()
    torch.compile(flatten_form, backend="eager")(*step_inputs)
    assert graph_breaks() == 1


def test_no_graph_break_by_name_in_a_fresh_process():
    # The entry point imports diffopt inside torch.compile(): the first use by name must work too.
    code = textwrap.dedent(
        """
        import torch
        def f(x, t):
            return x * int(t.flatten()[0].item()) + x[: t.cpu().item()].sum()
        x, t = torch.randn(3), torch.tensor([2])
        for kwargs in ({}, {"options": {"inductor": False}}, {"mode": "default"}):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            out = torch.compile(f, backend="diffopt", **kwargs)(x, t)
            torch.testing.assert_close(out, f(x, t))
            assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        assert not torch._dynamo.config.capture_scalar_outputs
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ok" in run.stdout


# --- one read per element --------------------------------------------------------------


def cfg_step(x, t):
    # Two CFG branches read the same timestep element through different view chains; the
    # number decides a slice (a host decision), so one read must stay.
    cond = (x * 2).sin()[: int(t.flatten()[0].item())].sum()
    uncond = (x * 3).cos()[: int(t.reshape(1, 2)[0, 0].item())].sum()
    again = x[: int(t.unsqueeze(0).expand(3, 2)[2, 0].item())].sum()
    return cond + uncond + again


@torch.no_grad()
def test_cfg_reads_of_the_same_timestep_become_one():
    x, t = torch.randn(8, 4), torch.tensor([5, 5])
    result = trace(cfg_step, x, t, options=only("hoist_item"))
    assert count_ops(result.before("hoist_item"))[READ] == 3
    assert count_ops(result.after("hoist_item"))[READ] == 1
    assert sum("second .item() read" in r.replaced for r in result.report.rewrites) == 2
    torch.testing.assert_close(result.output, cfg_step(x, t))

    compiled = torch.compile(cfg_step, backend="diffopt", options={"inductor": False, **only("hoist_item")})
    compiled(x, t)
    out, reads = run_time_reads(compiled, x, torch.tensor([6, 6]))
    assert reads == 1
    torch.testing.assert_close(out, cfg_step(x, torch.tensor([6, 6])))


@torch.no_grad()
def test_cfg_inductor_path_reads_once():
    x, t = torch.randn(8, 4), torch.tensor([5, 5])
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(cfg_step, backend="diffopt", options=only("hoist_item"))
    out, code = run_and_get_code(compiled, x, t)
    assert sum(source.count(".item()") for source in code) == 1
    torch.testing.assert_close(out, cfg_step(x, t))
    out, reads = run_time_reads(compiled, x, torch.tensor([2, 2]))
    assert reads == 1
    torch.testing.assert_close(out, cfg_step(x, torch.tensor([2, 2])))


def different_tensors(x, a, b):
    # a[0] and b hold the same value, a[0] and a[1] come from the same tensor: three reads.
    return x[: int(a[0].item())].sum() + x[: int(b.item())].sum() + x[: int(a[1].item())].sum()


@torch.no_grad()
def test_reads_of_different_tensors_or_elements_are_not_merged():
    x, a, b = torch.randn(8), torch.tensor([3, 4]), torch.tensor([3])
    result = trace(different_tensors, x, a, b, options=only("hoist_item"))
    assert count_ops(result.after("hoist_item"))[READ] == 3
    assert not any("second" in r.replaced for r in result.report.rewrites)
    torch.testing.assert_close(result.output, different_tensors(x, a, b))


def mutated_between(x, t):
    first = x[: int(t.item())].sum()
    t.add_(1)
    return first + x[: int(t.item())].sum()


@torch.no_grad()
def test_reads_around_a_mutation_stay_apart():
    x = torch.randn(8)
    t_eager, t_compiled = torch.tensor(2), torch.tensor(2)
    result = trace(mutated_between, x, t_compiled, options=only("hoist_item"))
    assert count_ops(result.after("hoist_item"))[READ] == 2
    torch.testing.assert_close(result.output, mutated_between(x, t_eager))
    assert t_compiled.item() == t_eager.item() == 3


# --- where the read sits ------------------------------------------------------------------


def heavy_then_read(x, w, t):
    y = torch.relu(x @ w) @ w.t()
    return y[: int(t.flatten()[0].item())].sum(0)


@torch.no_grad()
def test_read_moves_before_the_step_kernels():
    x, w, t = torch.randn(8, 16), torch.randn(16, 16), torch.tensor([5])
    result = trace(heavy_then_read, x, w, t, options=only("hoist_item"))
    names = [n.target for n in result.after("hoist_item").nodes if n.op == "call_function"]
    read_at = names.index(torch.ops.aten._local_scalar_dense.default)
    before = [str(n.target) for n in result.before("hoist_item").nodes if n.op == "call_function"]
    assert before.index("aten._local_scalar_dense.default") > before.index("aten.mm.default")
    assert all("mm" not in str(target) for target in names[:read_at])
    assert any("hoisted" in r.by for r in result.report.rewrites)
    torch.testing.assert_close(result.output, heavy_then_read(x, w, t))


def late_producer(x, w):
    y = torch.relu(x @ w)
    n = int(y.sum().abs().long().item()) % 8
    return (y @ w.t())[:n].sum(0)


@torch.no_grad()
def test_read_of_a_late_value_stays_after_its_producer():
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    result = trace(late_producer, x, w, options=only("hoist_item"))
    nodes = [n for n in result.after("hoist_item").nodes]
    read = next(n for n in nodes if n.target is torch.ops.aten._local_scalar_dense.default)
    producers = {n for n in nodes if n.target is torch.ops.aten.mm.default}
    first_mm = min(nodes.index(n) for n in producers)
    assert nodes.index(read) > first_mm and nodes.index(read) > nodes.index(read.args[0])
    torch.testing.assert_close(result.output, late_producer(x, w))


# --- no read where only tensor math uses the number ----------------------------------------


def tensor_math_only(x, t, table):
    s = t.item()
    u = t.cpu().item()
    return (
        x * torch.full((), s)
        + torch.scalar_tensor(s)
        + torch.full((4,), u, dtype=torch.float64)
        + x * s
        - x * u
        + table[int(t.flatten()[0].item())]
    )


@torch.no_grad()
def test_tensor_math_only_leaves_no_read(inductor):
    x, table = torch.randn(4), torch.randn(10, 4)
    t = torch.tensor(7)
    options = {"inductor": inductor, **only("hoist_item")}
    result = trace(tensor_math_only, x, t, table, options=options)
    assert count_ops(result.before("hoist_item"))[READ] >= 1
    assert count_ops(result.after("hoist_item"))[READ] == 0
    assert any("no sync" in r.by for r in result.report.rewrites)
    assert torch.equal(result.output, tensor_math_only(x, t, table))

    compiled = torch.compile(tensor_math_only, backend="diffopt", options=options)
    compiled(x, t, table)
    out, reads = run_time_reads(compiled, x, torch.tensor(3), table)
    assert reads == 0
    assert torch.equal(out, tensor_math_only(x, torch.tensor(3), table))


def test_a_device_copy_on_the_way_is_skipped():
    # On a GPU, t.cpu() is a device-to-host copy (_to_copy to cpu). On the CPU Dynamo drops it, so
    # build the ATen graph with make_fx: the element is then taken from t where it lives.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from diffopt.fxpasses.hoist_item import HoistItem
    from diffopt.graph_pass import RewriteLog

    def f(x, t):
        return x * torch.full((), t.to("cpu", copy=True)[1].item())

    x, t = torch.randn(3), torch.tensor([2, 5])
    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        gm = make_fx(f)(mode.from_tensor(x, static_shapes=True), mode.from_tensor(t, static_shapes=True))
    assert count_ops(gm.graph)["aten._to_copy.default"] == 1
    log = RewriteLog()
    HoistItem().apply(gm.graph, log)
    gm.graph.lint()
    gm.recompile()
    ops = count_ops(gm.graph)
    assert ops[READ] == 0 and ops["aten._to_copy.default"] == 0 and len(log) == 1
    assert torch.equal(gm(x, t), f(x, t))


def test_a_timestep_on_another_device_keeps_its_read():
    # A CPU timestep feeding a model on another device ("meta" stands in for a GPU here): its
    # read is no device sync, copying it over would be one, so it stays; on the model's device
    # it goes.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from diffopt.fxpasses.hoist_item import HoistItem
    from diffopt.graph_pass import RewriteLog

    def f(x, t, table):
        s = t[0].item()
        return x * torch.full((), s, device=x.device) + table.select(0, s)

    reads = {}
    with FakeTensorMode(shape_env=ShapeEnv()):
        x, table = torch.empty(4, device="meta"), torch.empty(10, 4, device="meta")
        for device in ("cpu", "meta"):
            gm = make_fx(f)(x, torch.empty(2, dtype=torch.long, device=device), table)
            HoistItem().apply(gm.graph, RewriteLog())
            reads[device] = count_ops(gm.graph)[READ]
    assert reads == {"cpu": 1, "meta": 0}


@torch.no_grad()
def test_indexing_keeps_one_read_when_select_on_device_is_off():
    x, t, table = torch.randn(4), torch.tensor([3]), torch.randn(10, 4)
    on = trace(flatten_form, x, t, table, options=only("hoist_item"))
    off = trace(flatten_form, x, t, table, options=only("hoist_item", select_on_device=False))
    assert count_ops(on.after("hoist_item"))[READ] == 0
    assert count_ops(off.after("hoist_item"))[READ] == 1
    assert torch.equal(on.output, flatten_form(x, t, table)) and torch.equal(off.output, flatten_form(x, t, table))


def not_exact(x16, t, table):
    # bf16 math with a number rounds it differently from a tensor; int8 full() checks overflow;
    # a row returned as it is must stay a view of the table.
    return x16 * t.item(), torch.full((2,), t.item(), dtype=torch.int8), table[t.item()]


@torch.no_grad()
def test_near_misses_keep_their_read():
    x16, t, table = torch.randn(4, dtype=torch.bfloat16), torch.tensor(3), torch.randn(10, 4)
    result = trace(not_exact, x16, t, table, options=only("hoist_item"))
    assert count_ops(result.after("hoist_item"))[READ] == 1
    for got, want in zip(result.output, not_exact(x16, t, table)):
        assert torch.equal(got, want)


# --- the reference denoising loop ------------------------------------------------------------


@torch.no_grad()
def test_denoise_loop_30_steps_no_recompile_no_sync():
    config = get_config("wan-tiny")
    torch.manual_seed(0)
    step = DenoiseStep(config).eval()
    latents, timesteps, context = loop_example_inputs(config, num_steps=30)
    expected = denoise(step, latents, timesteps, context)

    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, backend="diffopt", options={"inductor": False})
    compiled(latents, timesteps[0].expand(1), context)  # the first step compiles (as denoise calls it)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, reads = run_time_reads(denoise, compiled, latents, timesteps, context)
    assert graph_breaks() == 0
    assert reads == 0  # the timestep-table lookup became an on-device gather
    torch.testing.assert_close(out, expected)

    # With the lookup kept as a host index: one read per step, still no recompile.
    torch._dynamo.reset()
    compiled = torch.compile(
        step, backend="diffopt", options={"inductor": False, "passes": {"hoist_item": {"select_on_device": False}}}
    )
    compiled(latents, timesteps[0].expand(1), context)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, reads = run_time_reads(denoise, compiled, latents, timesteps[:5], context)
    assert reads == 5
    torch.testing.assert_close(out, denoise(step, latents, timesteps[:5], context))


@torch.no_grad()
def test_denoise_step_inductor_code_has_no_item():
    from torch._inductor.utils import run_and_get_code

    config = get_config("wan-tiny")
    torch.manual_seed(0)
    step = DenoiseStep(config).eval()
    latents, timesteps, context = loop_example_inputs(config, num_steps=3)
    compiled = torch.compile(step, backend="diffopt", options=only("hoist_item"))
    _, code = run_and_get_code(compiled, latents, timesteps[0].expand(1), context)
    assert sum(source.count(".item()") for source in code) == 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, reads = run_time_reads(denoise, compiled, latents, timesteps, context)
    assert reads == 0
    torch.testing.assert_close(out, denoise(step, latents, timesteps, context))
