"""The backend itself: options, entry point, both stages, failure isolation, cache key, report."""
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import diffopt
import diffopt.fxpasses
from diffopt.graph_pass import GraphPass, Stage
from diffopt.options import Options
from diffopt.pipeline import Pipeline, registered_passes
from diffopt.testing import count_ops, trace


def packed_qkv_attention(x, w):
    # A packed projection split into q/k/v, each made contiguous: the split_contiguous stock form.
    B, S, _ = x.shape
    q, k, v = torch.nn.functional.linear(x, w).split([32, 16, 16], dim=-1)
    q = q.contiguous().view(B, S, 4, 8)
    k = k.contiguous().view(B, S, 2, 8)
    v = v.contiguous().view(B, S, 2, 8)
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
    ).sum(1)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 6, 24, generator=g), torch.randn(64, 24, generator=g) / 5


class RaisingPass(GraphPass):
    """Matches nothing; half-rewrites the graph, then raises (a buggy pass)."""

    name = "raising"
    stage = Stage.POST_GRAD

    def apply(self, graph, log):
        first = next(n for n in graph.nodes if n.op == "call_function")
        with graph.inserting_after(first):
            graph.call_function(torch.ops.aten.neg.default, (first,))
        raise RuntimeError("deliberate failure")


@pytest.fixture
def extra_passes(monkeypatch):
    monkeypatch.setattr(diffopt.fxpasses, "PIPELINE", [RaisingPass, *diffopt.fxpasses.PIPELINE])


def test_unknown_options_are_errors():
    with pytest.raises(ValueError, match="unknown option"):
        Options.parse({"pases": {}}, registered_passes())
    with pytest.raises(ValueError, match="unknown pass"):
        Options.parse({"passes": {"split_contigous": False}}, registered_passes())
    with pytest.raises(ValueError, match="no option"):
        Pipeline(Options.parse({"passes": {"split_contiguous": {"depth": 3}}}, registered_passes()))


@pytest.mark.parametrize(
    "options, error",
    [
        ({"strict": "yes"}, "'strict' must be True or False"),
        ({"inductor": 0}, "'inductor' must be True or False"),
        ({"inductor_config": [("max_autotune", True)]}, "'inductor_config' must be a dict"),
        ({"mode": "fast"}, "'mode' must be one of"),
        ({"passes": {"dedupe": "off"}}, "must be a bool or a dict"),
    ],
)
def test_option_values_are_checked(options, error):
    with pytest.raises((TypeError, ValueError), match=error):
        Options.parse(options, registered_passes())


def test_mode_is_an_option():
    assert Options.parse({"mode": "max-autotune"}, registered_passes()).mode == "max-autotune"


def test_opt_in_passes_run_only_when_named():
    def names(options):
        return [p.name for p in Pipeline(Options.parse(options, registered_passes())).passes]

    opt_in = [name for name, cls in registered_passes().items() if not cls.on_by_default]
    assert opt_in == ["pipeline_heads"]
    assert "pipeline_heads" not in names({})
    assert "pipeline_heads" in names({"passes": {"pipeline_heads": True}})
    assert "pipeline_heads" in names({"passes": {"pipeline_heads": {"chunks": 4}}})
    assert "split_contiguous" in names({}) and "split_contiguous" not in names({"passes": {"split_contiguous": False}})


@torch.no_grad()
def test_passes_can_be_turned_off(inputs):
    on = trace(packed_qkv_attention, *inputs)
    off = trace(packed_qkv_attention, *inputs, options={"passes": {"split_contiguous": False}})
    assert on.report.matches("split_contiguous") == 3
    assert "split_contiguous" not in {run.pass_name for run in off.report.runs}
    assert count_ops(off.before("dedupe"))["aten.clone.default"] == 3
    torch.testing.assert_close(on.output, packed_qkv_attention(*inputs))
    torch.testing.assert_close(off.output, packed_qkv_attention(*inputs))


@torch.no_grad()
def test_failing_pass_is_skipped_with_a_warning(extra_passes, inputs, caplog):
    with caplog.at_level(logging.WARNING, logger="diffopt"):
        result = trace(packed_qkv_attention, *inputs, options={"strict": False})
    assert any("raising" in r.getMessage() and "deliberate failure" in r.getMessage() for r in caplog.records)
    [failed] = result.report.failures()
    assert failed.pass_name == "raising" and failed.matches == 0
    # The half-done rewrite was rolled back: the graph the next pass saw has no neg.
    assert count_ops(result.before("split_contiguous"))["aten.neg.default"] == 0
    assert result.report.matches("split_contiguous") == 3
    torch.testing.assert_close(result.output, packed_qkv_attention(*inputs))


@torch.no_grad()
def test_failing_pass_raises_when_strict(extra_passes, inputs):
    with pytest.raises(Exception, match="deliberate failure"):
        trace(packed_qkv_attention, *inputs, options={"strict": True})


class MisorderingPass(GraphPass):
    """Moves an op before its input and returns as if nothing happened (a buggy pass)."""

    name = "misordering"
    stage = Stage.POST_GRAD

    def apply(self, graph, log):
        calls = [n for n in graph.nodes if n.op == "call_function"]
        user = next(n for n in calls if any(a in calls for a in n.all_input_nodes))
        calls[0].prepend(user)


class HalfLinkingPass(GraphPass):
    """Records a use without the argument that makes it one (a buggy pass)."""

    name = "half_linking"
    stage = Stage.POST_GRAD

    def apply(self, graph, log):
        calls = [n for n in graph.nodes if n.op == "call_function"]
        calls[0].users[calls[-1]] = None


BROKEN_PASSES = [RaisingPass, MisorderingPass, HalfLinkingPass]


@torch.no_grad()
@pytest.mark.parametrize("broken", BROKEN_PASSES, ids=[cls.name for cls in BROKEN_PASSES])
def test_a_broken_pass_is_rolled_back(broken, inductor, monkeypatch, inputs, caplog):
    monkeypatch.setattr(diffopt.fxpasses, "PIPELINE", [broken, *diffopt.fxpasses.PIPELINE])
    with caplog.at_level(logging.WARNING, logger="diffopt"):
        result = trace(packed_qkv_attention, *inputs, options={"strict": False, "inductor": inductor})
    torch.testing.assert_close(result.output, packed_qkv_attention(*inputs))
    [failed] = result.report.failures()
    assert failed.pass_name == broken.name and failed.matches == 0
    assert any(r.levelno == logging.WARNING and broken.name in r.getMessage() for r in caplog.records)
    # The graph after it is the graph before it: the next pass saw the stock graph and rewrote it.
    code = [graph.python_code("self").src for graph in (result.before(broken.name), result.after(broken.name))]
    assert code[0] == code[1]
    assert result.report.matches("split_contiguous") == 3


@torch.no_grad()
@pytest.mark.parametrize("broken", BROKEN_PASSES, ids=[cls.name for cls in BROKEN_PASSES])
def test_a_broken_pass_fails_the_compile_when_strict(broken, monkeypatch, inputs):
    monkeypatch.setattr(diffopt.fxpasses, "PIPELINE", [broken, *diffopt.fxpasses.PIPELINE])
    with pytest.raises(Exception, match=f"deliberate failure|pass {broken.name} left the graph inconsistent"):
        trace(packed_qkv_attention, *inputs, options={"strict": True})


@torch.no_grad()
def test_inductor_path_runs_the_passes_and_matches_eager(inputs):
    report = diffopt.explain(packed_qkv_attention, *inputs)
    assert report.matches("split_contiguous") == 3
    torch.testing.assert_close(report.output, packed_qkv_attention(*inputs))


def test_uuid_changes_with_options_and_code(monkeypatch):
    def fingerprint(options):
        return Pipeline(Options.parse(options, registered_passes())).fingerprint()

    base = fingerprint({})
    assert fingerprint({}) == base
    assert fingerprint({"passes": {"split_contiguous": False}}) != base
    assert fingerprint({"strict": True}) != base
    # A change to a pass's code changes the key.
    cls = registered_passes()["split_contiguous"]
    monkeypatch.setattr(cls, "fingerprint", lambda self: "edited")
    assert fingerprint({}) != base


def test_uuid_is_stable_across_processes():
    code = "from diffopt.options import Options; from diffopt.pipeline import Pipeline, registered_passes; " \
           "print(Pipeline(Options.parse({}, registered_passes())).fingerprint())"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(runs) == 1 and len(runs.pop().strip()) == 64


def test_backend_by_name_in_a_fresh_process():
    code = textwrap.dedent(
        """
        import logging, torch
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        def f(x, w):
            q, k = torch.nn.functional.linear(x, w).split([8, 8], -1)
            return q.contiguous().view(2, 3, 2, 4).sin() + k.contiguous().view(2, 3, 2, 4).cos()
        x, w = torch.randn(2, 3, 5), torch.randn(16, 5)
        with torch.no_grad():
            out = torch.compile(f, backend="diffopt", options={"inductor": False})(x, w)
        torch.testing.assert_close(out, f(x, w))
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ok" in run.stdout
    assert "diffopt diffopt: graph 0 post_grad split_contiguous: 2 rewrite(s)" in run.stderr


@torch.no_grad()
def test_report_names_the_source_line(inputs):
    report = diffopt.explain(packed_qkv_attention, *inputs, options={"inductor": False})
    text = str(report)
    assert "split_contiguous" in text and "post_grad" in text
    sources = {r.source for r in report.rewrites}
    assert all(s.startswith("test_backend.py:") and "contiguous()" in s for s in sources), sources
    assert len(report.rewrites) == 3


def test_every_pass_documents_its_forms():
    import sys

    for cls in registered_passes().values():
        assert isinstance(cls.stage, Stage)
        doc = sys.modules[cls.__module__].__doc__ or ""
        for heading in ("Stock form", "Optimized form", "Preconditions"):
            assert heading in doc, (cls.name, heading)


def test_a_bad_option_fails_at_torch_compile():
    # diffopt's own error, raised by torch.compile(...) itself rather than wrapped at the first call
    with pytest.raises(TypeError, match="diffopt: option 'strict' must be True or False"):
        torch.compile(torch.nn.Linear(2, 2), backend="diffopt", options={"strict": "yes"})


def test_mode_and_options_together():
    model = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    compiled = torch.compile(model, backend="diffopt", options={"mode": "max-autotune-no-cudagraphs", "strict": True})
    torch.testing.assert_close(compiled(x), model(x))


def test_the_cache_key_covers_the_shared_code_and_kernels(monkeypatch):
    # A pass's result depends on diffopt's helpers and on the kernels it inserts, not only on its module.
    from diffopt import graph_pass

    base = Pipeline(Options.parse({}, registered_passes())).fingerprint()
    monkeypatch.setattr(graph_pass, "code_digest", lambda: "a kernel was edited")
    assert Pipeline(Options.parse({}, registered_passes())).fingerprint() != base


def test_the_pipeline_order_is_checked_against_what_passes_declare(monkeypatch):
    from diffopt.fxpasses import PIPELINE, BatchAllToAll, PipelineHeads
    from diffopt.pipeline import check_order

    check_order(PIPELINE)
    with pytest.raises(ValueError, match="'batch_all_to_all' must run after 'pipeline_heads'"):
        check_order([BatchAllToAll, PipelineHeads])

    class Misnamed(GraphPass):
        name = "misnamed"
        stage = Stage.POST_GRAD
        after = ("dedup",)

    with pytest.raises(ValueError, match="runs after 'dedup', which is no pass"):
        check_order([Misnamed, *PIPELINE])
    # A reordered pipeline fails when it is built, before any graph is compiled.
    monkeypatch.setattr(diffopt.fxpasses, "PIPELINE", list(reversed(PIPELINE)))
    with pytest.raises(ValueError, match="must run after"):
        registered_passes()


def test_every_run_ends_with_one_cleanup():
    import torch.fx as fx

    from diffopt.pipeline import cleanup

    aten = torch.ops.aten
    graph = fx.Graph()
    x = graph.placeholder("x")
    cos = graph.call_function(aten.cos.default, (x,))
    graph.call_function(aten.neg.default, (cos,))  # unused and pure: goes
    graph.call_function(aten.bernoulli.default, (x,))  # unused but draws random numbers: stays
    sin = graph.call_function(aten.sin.default, (cos,))
    graph.output(sin)
    cos.prepend(sin)  # sin before its input: a rewrite left the order broken
    with pytest.raises(RuntimeError):
        graph.lint()
    cleanup(graph)
    graph.lint()
    # sin moved to right after its input, the rest stays where it was
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [aten.cos.default, aten.sin.default, aten.bernoulli.default]


def _asserts_positive_sum(x):
    torch._assert_async(x.sum() > 0, "sum must be positive")
    return x * 2


def _checks_positive_item(x):
    torch._check(x.sum().item() > 0)
    return x * 2


@pytest.mark.parametrize("fn", [_asserts_positive_sum, _checks_positive_item], ids=["assert_async", "check"])
@pytest.mark.parametrize("inductor", [False, True], ids=["aten", "inductor"])
def test_runtime_asserts_survive_the_cleanup(fn, inductor):
    """An assert's result is unused, but it is the program's: a compiled call raises where eager does."""
    bad, good = -torch.rand(8) - 1, torch.rand(8) + 1
    with pytest.raises(RuntimeError):
        fn(bad)
    torch.compiler.reset()
    compiled = torch.compile(fn, backend="diffopt", options={"inductor": inductor})
    torch.testing.assert_close(compiled(good), good * 2)
    with pytest.raises(RuntimeError):
        compiled(bad)
