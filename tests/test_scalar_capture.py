"""Captured scalars never turn a program Inductor compiles into one that crashes or does not compile.

Float timesteps read as integers (``int(t.item())`` and the other roundings) become integer
reads; a frame that does not trace with captured scalars (``.tolist()`` of a slice whose length
is a captured number) compiles as Inductor compiles it, with a warning; other frames keep
capturing."""
import logging
import math

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

import diffopt
import diffopt.backend
import diffopt.fxpasses
from diffopt import scalar_capture
from diffopt.graph_pass import GraphPass, Stage
from diffopt.testing import Compiled, no_caches
from test_hoist_item import cfg_step  # three reads of one timestep element through different views

READ = "aten::_local_scalar_dense"


def run_time_reads(fn, *args):
    """Output of ``fn(*args)`` and how many ``_local_scalar_dense`` ran (device-to-host reads on GPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, sum(event.name == READ for event in prof.events())


def graph_breaks():
    return sum(torch._dynamo.utils.counters["graph_break"].values())


@pytest.fixture
def tables():
    g = torch.Generator().manual_seed(13)
    return torch.randn(7, generator=g) + 2, torch.randn(1000, 7, generator=g)


# Timesteps as diffusers schedulers make them (float32, fractional, integral), negative ones
# (Python indexing from the end), and .5 cases (round() is half-to-even).
TIMESTEPS = [998.7, 0.25, 3.0, -3.7, 2.5, 3.5, 487.5]


def int_form(x, t, table):
    return x * table[int(t.flatten()[0].item())]


def trunc_form(x, t, table):
    return x * table[math.trunc(t.item())]


def floor_form(x, t, table):
    return x * table[math.floor(t.item())]


def ceil_form(x, t, table):
    return x * table[math.ceil(t.item())]


def round_form(x, t, table):
    return x * table[round(t.item())]


def narrow_form(x, t, table):
    # the number as a slice start (a host decision) and as a plain float next to it
    return table.narrow(0, int(t.item()), 2).sum(0) * t.item()


FORMS = [int_form, trunc_form, floor_form, ceil_form, round_form, narrow_form]


@torch.no_grad()
@pytest.mark.parametrize("form", FORMS, ids=[f.__name__ for f in FORMS])
def test_float_timesteps_read_as_integers(form, inductor, tables):
    # Before: NameError: name 'TruncToInt' is not defined (FloorToInt, CeilToInt, RoundToInt)
    # at the first call with Inductor, for every one of these forms.
    x, table = tables
    torch._dynamo.utils.counters.clear()
    fn = Compiled(form, {"inductor": inductor})
    for value in TIMESTEPS:
        t = torch.tensor([value])
        torch.testing.assert_close(fn(x, t, table), form(x, t, table), rtol=0, atol=0)
    assert graph_breaks() == 0  # captured: one graph for every timestep


@torch.no_grad()
@pytest.mark.parametrize(
    "passes", [{"hoist_item": {"select_on_device": False}}, {"hoist_item": False}], ids=["host-select", "no-hoist"]
)
def test_float_timesteps_without_the_on_device_gather(passes, tables):
    x, table = tables
    fn = Compiled(int_form, {"passes": passes})
    for value in TIMESTEPS:
        t = torch.tensor([value])
        torch.testing.assert_close(fn(x, t, table), int_form(x, t, table), rtol=0, atol=0)


@torch.no_grad()
def test_a_float_timestep_index_needs_no_read(tables):
    # The integer read is one hoist_item moves onto the device, as it does an integer timestep's.
    x, table = tables
    t = torch.tensor([999.7])
    fn = Compiled(int_form)
    fn(x, t, table)
    out, reads = run_time_reads(fn, x, t, table)
    torch.testing.assert_close(out, int_form(x, t, table), rtol=0, atol=0)
    assert reads == 0
    # bf16 timesteps alike (the number is the bf16 value's)
    t16 = torch.tensor([487.5], dtype=torch.bfloat16)
    torch.testing.assert_close(fn(x, t16, table), int_form(x, t16, table), rtol=0, atol=0)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("form", [int_form, round_form, narrow_form], ids=lambda f: f.__name__)
def test_float_timesteps_on_cuda(form):
    g = torch.Generator(device="cuda").manual_seed(13)
    x, table = torch.randn(7, device="cuda", generator=g), torch.randn(1000, 7, device="cuda", generator=g)
    fn = Compiled(form)
    for value in TIMESTEPS:
        t = torch.tensor([value], device="cuda")
        torch.testing.assert_close(fn(x, t, table), form(x, t, table), rtol=0, atol=0)


@torch.no_grad()
def test_float_timestep_reads_of_one_element_are_one_read(inductor):
    x = torch.randn(10, generator=torch.Generator().manual_seed(5))
    fn = Compiled(cfg_step, {"inductor": inductor})
    for value in (5.7, 2.0, 8.5):
        t = torch.tensor([value, 1.5])
        fn(x, t)
        out, reads = run_time_reads(fn, x, t)
        torch.testing.assert_close(out, cfg_step(x, t))
        assert reads == 1


def scaled_form(x, t, table):
    # The rounding of a computed float: no exact tensor form, so this frame is not captured.
    return x * table[int(t.item() * 100) // 100]


@torch.no_grad()
def test_other_float_roundings_compile_without_capture(inductor, tables, caplog):
    x, table = tables
    with caplog.at_level(logging.WARNING, logger="diffopt"):
        fn = torch.compile(scaled_form, backend="diffopt", options={"inductor": inductor})
        for value in (999.7, 3.0, -3.7):
            t = torch.tensor([value])
            torch.testing.assert_close(fn(x, t, table), scaled_form(x, t, table), rtol=0, atol=0)
    [warning] = [r.getMessage() for r in caplog.records if "scaled_form" in r.getMessage()]
    assert "ScalarCaptureUnsupported" in warning and "capture_scalar_outputs=False" in warning


# --- scalar operands torch's compile mishandles when captured -------------------------------------

SCALED_SCALAR_FORMS = {
    # AOT autograd drops alpha of a symbolic float operand; Inductor drops rsub's
    "add": lambda x, t: x.add(t.item(), alpha=3),
    "sub": lambda x, t: torch.sub(x, t.item() * 2, alpha=2.5),
    "add_": lambda x, t: x.clone().add_(t.item(), alpha=-1.5),
    "rsub": lambda x, t: torch.rsub(x, t.item(), alpha=3),
    "scalar first": lambda x, t: torch.add(t.item(), x, alpha=3),
    "keywords": lambda x, t: torch.sub(input=t.item(), other=x, alpha=2),
    "aten": lambda x, t: torch.ops.aten.add.Tensor(x, t.item(), alpha=3),
    # decomposes into a branch on the weight: a data-dependent guard while compiling
    "lerp": lambda x, t: torch.lerp(x, x * 2, t.item()),
}


def compiled_afresh_at_each_value(form, x, inductor, caplog):
    """The warning compiling ``form`` with diffopt gave, per value of ``t``, after checking its output
    against eager's. Each value compiled afresh: on a later call torch makes the float argument
    dynamic, and then plain Inductor drops the alpha too (torch's bug, see scalar_capture)."""
    warnings = []
    for value in (1000.0, -3.5):
        torch.compiler.reset()
        caplog.clear()
        t = torch.tensor(value)
        with caplog.at_level(logging.WARNING, logger="diffopt"):
            got = torch.compile(form, backend="diffopt", options={"inductor": inductor})(x, t)
        torch.testing.assert_close(got, form(x, t))  # Inductor rounds lerp and rsub its own way
        [warning] = [r.getMessage() for r in caplog.records if "does not compile with captured scalars" in r.getMessage()]
        warnings.append(warning)
    return warnings


@torch.no_grad()
@pytest.mark.parametrize("name", SCALED_SCALAR_FORMS)
def test_scalar_operands_torch_mishandles_compile_without_capture(inductor, name, caplog):
    x = torch.randn(6, generator=torch.Generator().manual_seed(8))
    cause = "GuardOnDataDependentSymNode" if name == "lerp" else "ScalarCaptureUnsupported"
    for warning in compiled_afresh_at_each_value(SCALED_SCALAR_FORMS[name], x, inductor, caplog):
        assert cause in warning and "capture_scalar_outputs=False" in warning


@torch.no_grad()
@pytest.mark.parametrize("name", [name for name in SCALED_SCALAR_FORMS if name != "lerp"])
def test_under_the_users_own_capture_a_refused_graph_compiles_without_it(inductor, name, caplog):
    # The user captures scalars themselves: Inductor compiles these graphs and drops the alpha
    # (x.add(t.item(), alpha=3) at t=1000 is off by 2000); diffopt compiles the frame uncaptured
    x = torch.randn(6, generator=torch.Generator().manual_seed(10))
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for warning in compiled_afresh_at_each_value(SCALED_SCALAR_FORMS[name], x, inductor, caplog):
            assert "ScalarCaptureUnsupported" in warning and "capture_scalar_outputs=True set aside" in warning
        assert torch._dynamo.config.capture_scalar_outputs  # the user's setting is theirs again


@torch.no_grad()
def test_under_the_users_own_capture_a_computed_rounding_compiles_without_it(tables, caplog):
    # int(t.item() * 100) has no exact tensor form: refused, so compiled uncaptured (Inductor, captured,
    # prints TruncToInt into its code and fails at the first call)
    x, table = tables
    with torch._dynamo.config.patch(capture_scalar_outputs=True), caplog.at_level(logging.WARNING, logger="diffopt"):
        torch.compiler.reset()
        fn = torch.compile(scaled_form, backend="diffopt")
        for value in (999.7, -3.7):
            t = torch.tensor([value])
            torch.testing.assert_close(fn(x, t, table), scaled_form(x, t, table), rtol=0, atol=0)
    [warning] = [r.getMessage() for r in caplog.records if "scaled_form" in r.getMessage()]
    assert "capture_scalar_outputs=True set aside" in warning


@torch.no_grad()
def test_under_the_users_own_capture_other_graphs_stay_as_under_inductor():
    # a graph that traces stays captured (no graph break); one that fails to compile captured
    # fails as it does with Inductor, not retried uncaptured
    x = torch.randn(6, generator=torch.Generator().manual_seed(11))
    t = torch.tensor(0.25)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        torch.compiler.reset()
        breaks = graph_breaks()
        fine = lambda x, t: x * t.item() + 1  # noqa: E731
        torch.testing.assert_close(torch.compile(fine, backend="diffopt")(x, t), fine(x, t))
        assert graph_breaks() == breaks
        lerp = SCALED_SCALAR_FORMS["lerp"]
        for backend in ("inductor", "diffopt"):
            torch.compiler.reset()
            with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
                torch.compile(lerp, backend=backend)(x, t)


@torch.no_grad()
def test_scalar_operands_without_alpha_stay_captured(inductor, caplog):
    def forms(x, t):  # alpha 1, a tensor operand scaled by a captured alpha, a captured scalar times x
        return x.add(t.item(), alpha=1), x.add(x, alpha=t.item()), x * t.item() - t.item()

    x = torch.randn(6, generator=torch.Generator().manual_seed(9))
    breaks = graph_breaks()
    with caplog.at_level(logging.WARNING, logger="diffopt"):
        fn = torch.compile(forms, backend="diffopt", options={"inductor": inductor})
        for value in (1000.0, 0.25):
            t = torch.tensor(value)
            torch.testing.assert_close(fn(x, t), forms(x, t), rtol=0, atol=0)
    assert not [r for r in caplog.records if "captured scalars" in r.getMessage()]
    assert graph_breaks() == breaks


# --- views at captured offsets --------------------------------------------------------------------

VIEWS_AT_CAPTURED_OFFSETS = {
    "select": lambda ts, table: (table * 2)[ts.item()] + table[ts.item()],
    "slice": lambda ts, table: (table * 2)[ts.item():ts.item() + 2] + 1,
    "narrow": lambda ts, table: (table * 2).narrow(0, ts.item(), 3) + 1,
    "after a reduction": lambda ts, table: (table + table.sum(0))[ts.item()] * 3,
}


def counting_fixes(monkeypatch):
    fixes = []
    fix = scalar_capture.fix_layouts_under_unbacked_views
    monkeypatch.setattr(scalar_capture, "fix_layouts_under_unbacked_views", lambda graph: fixes.append(fix(graph)) or fixes[-1])
    return fixes


@torch.no_grad()
@pytest.mark.parametrize("name", VIEWS_AT_CAPTURED_OFFSETS)
@settings(max_examples=4, deadline=None)
@given(rows=st.integers(5, 11), cols=st.integers(2, 9), index=st.integers(0, 2), transposed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_a_view_at_a_captured_offset_reads_what_eager_reads(name, rows, cols, index, transposed, seed):
    # Inductor lowers the view from its input's provisional strides, then lays the input out in the
    # transposed table's order: unfixed, (table * 2)[t] read other elements (off by their magnitude)
    form = VIEWS_AT_CAPTURED_OFFSETS[name]
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(cols, rows, generator=g).t() if transposed else torch.randn(rows, cols, generator=g)
    ts = torch.tensor(index)
    with pytest.MonkeyPatch.context() as patch, no_caches():  # a cached graph skips the passes
        fixes = counting_fixes(patch)
        torch.compiler.reset()
        breaks = graph_breaks()
        got = torch.compile(form, backend="diffopt")(ts, table)
    torch.testing.assert_close(got, form(ts, table))
    assert graph_breaks() == breaks  # still captured
    # one computed table fixed; of a contiguous table, hoist_item may have made table[t] a gather
    assert fixes == [1] if transposed else len(fixes) == 1 and fixes[0] <= 1


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("name", VIEWS_AT_CAPTURED_OFFSETS)
def test_a_view_at_a_captured_offset_reads_what_eager_reads_on_cuda(name):
    form = VIEWS_AT_CAPTURED_OFFSETS[name]
    table = torch.randn(6, 10, device="cuda", generator=torch.Generator("cuda").manual_seed(5)).t()
    ts = torch.tensor(2, device="cuda")
    with no_caches():
        torch.compiler.reset()
        got = torch.compile(form, backend="diffopt")(ts, table)
    torch.testing.assert_close(got, form(ts, table))


@torch.no_grad()
def test_a_view_at_a_captured_offset_of_an_input_needs_no_fix(monkeypatch):
    table, ts = torch.randn(9, 5).t(), torch.tensor(2)
    fixes = counting_fixes(monkeypatch)
    torch.compiler.reset()
    with no_caches():
        torch.testing.assert_close(torch.compile(lambda ts, t: t[ts.item()] * 2, backend="diffopt")(ts, table), table[2] * 2)
    assert fixes == [0]  # a graph input's layout is fixed already


@torch.no_grad()
def test_a_view_at_a_captured_offset_of_symbolic_strides_compiles_without_capture(caplog):
    form = VIEWS_AT_CAPTURED_OFFSETS["select"]
    torch.compiler.reset()
    fn = torch.compile(form, backend="diffopt")
    with caplog.at_level(logging.WARNING, logger="diffopt"):
        for rows in (9, 10):
            table = torch.randn(5, rows, generator=torch.Generator().manual_seed(rows)).t()
            torch._dynamo.mark_dynamic(table, 0)
            torch.testing.assert_close(fn(torch.tensor(3), table), form(torch.tensor(3), table))
    [warning] = {r.getMessage() for r in caplog.records if "does not compile with captured scalars" in r.getMessage()}
    assert "ScalarCaptureUnsupported" in warning and "symbolic strides" in warning


# --- frames that do not trace with captured scalars ---------------------------------------------


def prefix_segments(image_ids, prefix_len):
    # diffusers' QwenImage 2.1 (``_qwenimage21_prefix_segments``): runs of equal image ids.
    prefix_ids = image_ids[:prefix_len].tolist()
    segments, start = [], 0
    for index in range(1, prefix_len + 1):
        if index == prefix_len or prefix_ids[index] != prefix_ids[start]:
            segments.append((start, index, prefix_ids[start] < 0))
            start = index
    return segments


class PrefixModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, image_ids, target_mask):
        prefix_len = int((~target_mask).sum())
        out = self.proj(x[prefix_len:])
        for start, end, is_text in prefix_segments(image_ids, prefix_len):
            out = out + x[start:end].mean(0) * (2.0 if is_text else 0.5)
        return out


@pytest.fixture
def prefix_inputs():
    g = torch.Generator().manual_seed(4)
    ids = torch.tensor([-1, -1, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3])
    return torch.randn(16, 8, generator=g), ids, torch.arange(16) >= 9


@torch.no_grad()
def test_tolist_of_a_captured_length_compiles(inductor, prefix_inputs, caplog):
    # Before: GuardOnDataDependentSymNode (backend="inductor" compiles it).
    model = PrefixModel()
    with caplog.at_level(logging.WARNING, logger="diffopt"):
        out = torch.compile(model, backend="diffopt", options={"inductor": inductor})(*prefix_inputs)
    torch.testing.assert_close(out, model(*prefix_inputs))
    warnings = [r.getMessage() for r in caplog.records if "does not compile with captured scalars" in r.getMessage()]
    assert any("forward" in w and "GuardOnDataDependentSymNode" in w for w in warnings), warnings
    # Another input (other ids, another prefix length) runs right too.
    ids = torch.tensor([-1, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3])
    mask = torch.arange(16) >= 12
    torch.testing.assert_close(
        torch.compile(model, backend="diffopt", options={"inductor": inductor})(prefix_inputs[0], ids, mask),
        model(prefix_inputs[0], ids, mask),
    )


def timestep_step(x, t, table):
    return (x * table[int(t.flatten()[0].item())]).sin()


@torch.no_grad()
def test_other_frames_keep_capturing(prefix_inputs, tables, caplog):
    # The frame that needs it compiles without capture; a frame whose .item() traces stays whole.
    model = PrefixModel()
    x, table = tables
    with caplog.at_level(logging.WARNING, logger="diffopt"):
        torch.compile(model, backend="diffopt")(*prefix_inputs)
        torch._dynamo.utils.counters.clear()
        out = torch.compile(timestep_step, backend="diffopt")(x, torch.tensor([7.0]), table)
    torch.testing.assert_close(out, timestep_step(x, torch.tensor([7.0]), table))
    assert graph_breaks() == 0
    assert not [r for r in caplog.records if "timestep_step" in r.getMessage()]
    assert torch._dynamo.config.capture_scalar_outputs is False  # nothing left set process-wide


def raising_pass(error):
    """A pass with a bug that shows on graphs with a captured read only."""

    class RaisingPass(GraphPass):
        name = "raising"
        stage = Stage.POST_GRAD

        def apply(self, graph, log):
            if any(node.target is torch.ops.aten._local_scalar_dense.default for node in graph.nodes):
                raise error

    return RaisingPass


@torch.no_grad()
@pytest.mark.parametrize("error", [
    RuntimeError("deliberate failure"),
    # what a data-dependent guard raises, and a failure that is retried when torch raises it
    GuardOnDataDependentSymNode(sympy.true, "deliberate failure"),
], ids=["RuntimeError", "GuardOnDataDependentSymNode"])
def test_a_failing_compile_is_not_retried_without_capture(monkeypatch, tables, error):
    # A captured graph whose compile fails (here: a pass under strict) fails; it is not hidden
    # by compiling the frame again uncaptured.
    monkeypatch.setattr(diffopt.fxpasses, "PIPELINE", [raising_pass(error), *diffopt.fxpasses.PIPELINE])
    x, table = tables
    fn = torch.compile(timestep_step, backend="diffopt", options={"strict": True, "inductor": False})
    with pytest.raises(Exception, match="deliberate failure"):
        fn(x, torch.tensor([7.0]), table)


def test_the_dynamo_hooks_are_installed_once():
    # Importing diffopt.backend wrapped both; installing again replaces the wrapper, never stacks it.
    from torch._dynamo import convert_frame, eval_frame

    lookups, factories = eval_frame.get_compiler_fn, convert_frame.convert_frame
    assert lookups._diffopt_original is not lookups and factories._diffopt_original is not factories
    scalar_capture.install(diffopt.backend._wrapped_diffopt, diffopt.backend._check_options)  # as the backend does
    assert eval_frame.get_compiler_fn._diffopt_original is lookups._diffopt_original
    assert convert_frame.convert_frame._diffopt_original is factories._diffopt_original
