"""benchmarks/bench_models.py: its pure helpers, and the script itself on the tiny workloads
(CPU, float32; every configuration in its own process with fresh compile caches).

``benchmarks/`` is not a package, so the file is loaded by path."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from conftest import ROOT, load_script

SCRIPT = ROOT / "benchmarks" / "bench_models.py"
bench_models = load_script("benchmarks/bench_models.py")
measure = load_script("benchmarks/measure.py")
Config = bench_models.Config


def _run(tmp_path, *args, device="cpu", timeout=600):
    out = tmp_path / "out"
    device_args = ["--device", device] if device != "cpu" else []
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", *device_args, "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout, json.loads((out / "bench_models.json").read_text()), out


# ---------------------------------------------------------------------------- pure helpers


def test_summarize_pools_the_calls_of_every_repeat():
    runs = [
        {"ms": [10.0, 12.0, 11.0], "compile_s": 30.0, "peak_bytes": 2e9, "rel_err_max": 1e-3, "rel_err_l2": 1e-4,
         "rewrites": {"dedupe": 3}},
        {"ms": [14.0, 13.0, 9.5], "compile_s": 34.0, "peak_bytes": 3e9, "rel_err_max": 2e-3, "rel_err_l2": 5e-5,
         "rewrites": {"dedupe": 3}},
    ]
    summary = bench_models.summarize(runs)
    assert summary["median_ms"] == 11.5  # median of the six calls, not of the two medians
    assert summary["min_ms"] == 9.5
    assert summary["repeat_median_ms"] == [11.0, 13.0]
    assert summary["spread_pct"] == pytest.approx(100 * 2 / 11.5)
    assert summary["compile_s"] == 32.0 and summary["repeat_compile_s"] == [30.0, 34.0]
    assert summary["peak_GB"] == 3.0  # the largest of the repeats, as are the errors
    assert (summary["rel_err_max"], summary["rel_err_l2"]) == (2e-3, 1e-4)
    assert summary["rewrites"] == {"dedupe": 3} and summary["failed_repeats"] == 0


def test_summarize_takes_the_kernel_profile_where_the_children_made_one():
    top = [{"name": "triton_mm_1", "ms": 0.5, "per_call": 30.0}]
    runs = [{"ms": [3.0], "compile_s": 1.0, "kernels": {"calls": 3, "kernel_ms": 2.0, "launches": 90.0, "top": top}},
            {"ms": [4.0], "compile_s": 1.0, "kernels": {"calls": 3, "kernel_ms": 2.4, "launches": 91.0, "top": []}}]
    summary = bench_models.summarize(runs)
    assert (summary["kernel_ms"], summary["launches"], summary["top_kernels"]) == (2.2, 90.5, top)
    unprofiled = bench_models.summarize([{"ms": [3.0], "compile_s": 1.0}])
    assert unprofiled["kernel_ms"] is None and unprofiled["top_kernels"] is None
    table = bench_models.table([{"workload": "w", "config": "c", "failed_repeats": 0, "vs_inductor": None, **summary}])
    header, _, row = ([cell.strip() for cell in line.split("|")] for line in table.splitlines()[:3])
    assert row[header.index("kernel ms")] == "2.20" and row[header.index("median ms")] == "3.50"
    assert "w c: 90 launches per call, top kernels:" in table
    assert "0.500 ms  x30    triton_mm_1" in table


@given(st.lists(st.tuples(st.sampled_from(["CUDA", "CPU"]), st.integers(1, 400), st.floats(0.5, 5e4)),
                min_size=1, max_size=12, unique_by=lambda event: event[1]),
       st.integers(1, 5), st.integers(1, 6))
def test_per_call_kernels_sums_what_ran_on_the_device(events, calls, top):
    from torch.autograd import DeviceType

    averages = [SimpleNamespace(key=f"k{count}", device_type=getattr(DeviceType, device), count=count,
                                self_device_time_total=us)
                for device, count, us in events]
    device = [event for event in averages if event.device_type == DeviceType.CUDA]
    record = measure.per_call_kernels(averages, calls, top)
    assert record["calls"] == calls
    assert record["kernel_ms"] == pytest.approx(sum(e.self_device_time_total for e in device) / calls / 1e3)
    assert record["launches"] == pytest.approx(sum(e.count for e in device) / calls)
    ranked = sorted(device, key=lambda e: -e.self_device_time_total)[:top]
    assert [kernel["name"] for kernel in record["top"]] == [e.key for e in ranked]
    assert [kernel["per_call"] for kernel in record["top"]] == pytest.approx([e.count / calls for e in ranked])


def test_summarize_and_table_show_host_time_and_each_repeat_when_repeats_disagree():
    # Two processes of one compiled program: the same kernels, one host 1.5x slower (seen on an H200 under
    # max-autotune: 15.58 and 23.70 ms with 13.05 and 13.13 ms of kernels).
    runs = [{"ms": [15.5, 15.6, 15.7], "host_ms": [15.0, 15.1, 15.2], "compile_s": 29.0, "host_probe_ms": [5.0, 5.4],
             "kernels": {"calls": 3, "kernel_ms": 13.05, "launches": 645.0, "top": []}},
            {"ms": [23.6, 23.7, 23.8], "host_ms": [23.1, 23.2, 23.3], "compile_s": 22.7, "host_probe_ms": [9.0, 10.0],
             "kernels": {"calls": 3, "kernel_ms": 13.13, "launches": 645.0, "top": []}}]
    summary = bench_models.summarize(runs)
    assert summary["host_ms"] == pytest.approx(19.15) and summary["repeat_host_ms"] == [15.1, 23.2]
    assert summary["repeat_kernel_ms"] == [13.05, 13.13] and summary["repeat_host_probe_ms"] == pytest.approx([5.2, 9.5])
    assert summary["spread_pct"] > bench_models.NOISY_SPREAD_PCT
    table = bench_models.table([{"workload": "w", "config": "c", "failed_repeats": 0, "vs_inductor": None, **summary}])
    header, _, row = ([cell.strip() for cell in line.split("|")] for line in table.splitlines()[:3])
    assert row[header.index("host ms")] == "19.15"
    assert "w c: the repeats disagree by 41%; per repeat:" in table
    assert "  median 15.60 ms, host 15.10 ms, kernels 13.05 ms, host probe 5.2 ms" in table
    assert "  median 23.70 ms, host 23.20 ms, kernels 13.13 ms, host probe 9.5 ms" in table
    assert "The host's speed moved between children: a fixed pure-Python loop took 5.2 to 9.5 ms" in table
    # repeats that agree, or one repeat, print no such lines; a run without host times or probes shows "-"
    steady = bench_models.summarize([{"ms": [10.0], "compile_s": 1.0, "host_probe_ms": [5.0, 5.1]},
                                     {"ms": [10.5], "compile_s": 1.0, "host_probe_ms": [5.5, 5.6]}])
    table = bench_models.table([{"workload": "w", "config": "c", "failed_repeats": 0, "vs_inductor": None, **steady}])
    header, _, row = ([cell.strip() for cell in line.split("|")] for line in table.splitlines()[:3])
    assert row[header.index("host ms")] == "-" and "disagree" not in table and "speed moved" not in table
    noisy_without_probes = bench_models.summarize([{"ms": [10.0], "compile_s": 1.0}, {"ms": [20.0], "compile_s": 1.0}])
    table = bench_models.table([{"workload": "w", "config": "c", "failed_repeats": 0, "vs_inductor": None,
                                 **noisy_without_probes}])
    assert "  median 10.00 ms, host - ms, kernels - ms, host probe - ms" in table and "speed moved" not in table


@given(durations_ms=st.lists(st.floats(0.5, 100.0), min_size=1, max_size=4))
def test_host_probe_is_the_fastest_of_its_repeats(durations_ms):
    clock = iter(value for ms in durations_ms for value in (0.0, ms / 1e3))
    with mock.patch.object(measure, "time", SimpleNamespace(perf_counter=lambda: next(clock))):
        assert measure.host_probe_ms(len(durations_ms)) == pytest.approx(min(durations_ms))
    assert 0 < measure.host_probe_ms(1) < 1e4  # and on the real clock, once


@given(iters=st.integers(1, 4), sleep_ms=st.floats(0.5, 3.0))
def test_time_calls_times_each_call_and_its_host_side(iters, sleep_ms):
    import time

    calls = []
    times = measure.time_calls(lambda: (calls.append(1), time.sleep(sleep_ms / 1e3)), iters, torch.device("cpu"))
    assert len(calls) == len(times.ms) == len(times.host_ms) == iters
    assert all(ms >= sleep_ms * 0.99 for ms in times.ms) and times.host_ms == times.ms  # no device to wait for


def test_summarize_keeps_failures_and_missing_numbers():
    ok = {"ms": [5.0, 7.0], "compile_s": 1.5}  # on the CPU: no peak; no eager reference: no error
    summary = bench_models.summarize([ok, {"error": "OutOfMemoryError: boom"}, {"error": "OutOfMemoryError: boom"}])
    assert summary["median_ms"] == 6.0 and summary["spread_pct"] is None  # one repeat: no spread
    assert summary["peak_GB"] is None and summary["rel_err_max"] is None
    assert summary["failed_repeats"] == 2 and summary["errors"] == ["OutOfMemoryError: boom"]
    failed = bench_models.summarize([{"error": "timeout: killed after 5 s"}])
    assert "median_ms" not in failed and failed["errors"] == ["timeout: killed after 5 s"]


def test_ratios_compare_with_inductor_at_the_same_options():
    def row(backend, mode, regional, median_ms, workload="w"):
        return {"workload": workload, "backend": backend, "mode": mode, "regional": regional, "median_ms": median_ms}

    results = [
        row("eager", None, False, 30.0),
        row("inductor", None, False, 20.0),
        row("diffopt", None, False, 19.0),
        row("inductor", "reduce-overhead", False, 10.0),
        row("diffopt", "reduce-overhead", False, 8.0),
        row("inductor", None, True, None),  # failed
        row("diffopt", None, True, 21.0),
        row("diffopt", None, False, 40.0, workload="other"),  # no inductor there
    ]
    bench_models.add_ratios_vs_inductor(results)
    assert [r["vs_inductor"] for r in results] == [1.5, 1.0, 0.95, 1.0, 0.8, None, None, None]


def test_config_names_round_trip():
    for config in bench_models.configurations(["eager", "inductor", "diffopt"], True, True, True):
        assert Config.parse(config.name) == config
    assert Config.parse("diffopt/regional/reduce-overhead") == Config("diffopt", "reduce-overhead", True)
    assert Config.parse("inductor/max-autotune-no-cudagraphs/regional").name == (
        "inductor/regional/max-autotune-no-cudagraphs"
    )
    for bad in ("tensorrt", "eager/regional", "eager/reduce-overhead", "inductor/fast", "inductor/reduce-overhead/max-autotune"):
        with pytest.raises(ValueError):
            Config.parse(bad)


def test_configurations_cross_the_options_with_backends_side_by_side():
    names = [c.name for c in bench_models.configurations(["eager", "inductor", "diffopt"], False, False, False)]
    assert names == ["eager", "inductor", "diffopt"]
    names = [c.name for c in bench_models.configurations(["inductor", "diffopt"], True, False, True)]
    assert names == [
        "inductor", "diffopt", "inductor/reduce-overhead", "diffopt/reduce-overhead",
        "inductor/regional", "diffopt/regional", "inductor/regional/reduce-overhead", "diffopt/regional/reduce-overhead",
    ]
    modes = {c.mode for c in bench_models.configurations(["diffopt"], True, True, False)}
    assert modes == {None, "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"}
    # --configs: eager goes first so that the others can compare with its output
    assert [c.name for c in bench_models.parse_configs("diffopt/regional, eager,diffopt/regional")] == [
        "eager", "diffopt/regional"
    ]


class RecordsCompiles:
    """A model that records how it was compiled, and runs its forward pre-hooks when called."""

    def __init__(self):
        self.regional, self.hooks = [], []

    def compile_repeated_blocks(self, **kwargs):
        self.regional.append(kwargs)

    def register_forward_pre_hook(self, hook):
        self.hooks.append(hook)

    def __call__(self):
        for hook in self.hooks:
            hook(self, ())


@pytest.mark.parametrize("name, regional, steps_marked", [
    ("diffopt/regional/reduce-overhead", [{"backend": "diffopt", "mode": "reduce-overhead"}], 2),
    ("inductor/regional/max-autotune", [{"backend": "inductor", "mode": "max-autotune"}], 2),
    ("diffopt/regional/max-autotune-no-cudagraphs", [{"backend": "diffopt", "mode": "max-autotune-no-cudagraphs"}], 0),
    ("diffopt/regional", [{"backend": "diffopt"}], 0),
    ("eager", [], 0),
])
def test_regional_cuda_graphs_begin_a_step_per_forward(monkeypatch, name, regional, steps_marked):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = RecordsCompiles()
    assert bench_models.compiled(model, Config.parse(name)) is model
    model()
    model()
    assert model.regional == regional and len(marks) == steps_marked


def test_schedule_repeats_the_whole_set_in_order():
    a, b = Config("eager"), Config("diffopt")
    assert bench_models.schedule(["w1", "w2"], [a, b], 2) == [
        (0, "w1", a), (0, "w1", b), (0, "w2", a), (0, "w2", b),
        (1, "w1", a), (1, "w1", b), (1, "w2", a), (1, "w2", b),
    ]


def test_relative_errors():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(1000, generator=generator)
    noise = 1e-3 * torch.randn(1000, generator=generator)
    max_err, l2 = bench_models.relative_errors(reference + noise, reference)
    assert max_err == pytest.approx((noise.abs().max() / reference.abs().max()).item(), rel=1e-5)
    assert l2 == pytest.approx((noise.norm() / reference.norm()).item(), rel=1e-5)
    assert bench_models.relative_errors(reference, reference) == (0.0, 0.0)


def test_every_workload_has_a_description_and_the_14b_block_count_in_its_name():
    table = bench_models.workloads(wan14b_blocks=40)
    assert set(table) == {"wan1.3b_480p", "wan1.3b_1frame", "wan14b_40blocks", "cosmos3", "flux_1024", "wan1.3b_480p_cfg2"}
    assert "40 of 40 blocks" in table["wan14b_40blocks"].description


@pytest.mark.parametrize("name", list(bench_models.workloads()))
def test_tiny_workloads_run_and_real_ones_have_the_stated_shapes(name):
    pytest.importorskip("diffusers")
    model, inputs = bench_models.workloads()[name].build(True, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        (output, *_) = model(**inputs)
    output = output[0] if isinstance(output, list) else output  # Cosmos3: one sample per item
    assert torch.isfinite(output).all() and output.abs().max() > 0
    if name.startswith("wan"):
        assert output.shape[0] == (2 if name.endswith("cfg2") else 1)


def test_real_workload_shapes():
    from diffopt.models import get_config

    wan = get_config("wan-1.3b")
    assert wan.seq_len == 32760 and wan.text_len == 512
    frames, height, width = bench_models.COSMOS3_LATENT[False]
    assert frames * (height // 2) * (width // 2) == get_config("cosmos3").gen_seq_len == 28520
    flux = get_config("flux-dev")
    assert (flux.seq_len, flux.text_len, flux.num_layers, flux.num_single_layers) == (4096, 512, 19, 38)


# ---------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bench_models"), "--workloads", "wan1.3b_1frame", "--iters", "2",
                "--warmup", "1")


def test_tiny_run_has_every_configuration_with_finite_numbers(tiny_run):
    from diffopt.pipeline import registered_passes

    stdout, data, out = tiny_run
    results = {row["config"]: row for row in data["results"]}
    assert set(results) == {"eager", "inductor", "diffopt"}
    for name, row in results.items():
        assert row["workload"] == "wan1.3b_1frame" and row["failed_repeats"] == 0, row["errors"]
        assert len(row["runs"]) == 1 and len(row["runs"][0]["ms"]) == 2 == len(row["runs"][0]["host_ms"])
        assert row["runs"][0]["load_avg_1min"] >= 0 and row["host_ms"] > 0
        assert len(row["runs"][0]["host_probe_ms"]) == 2 and min(row["runs"][0]["host_probe_ms"]) > 0
        for key in ("median_ms", "min_ms", "compile_s", "vs_inductor"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key)
        assert row["min_ms"] <= row["median_ms"]
        assert row["peak_GB"] is None and row["held_GB"] is None  # no CUDA
        assert Path(row["runs"][0]["log"]).exists()
    for name in ("inductor", "diffopt"):
        assert results[name]["rel_err_max"] < 1e-4 and results[name]["rel_err_l2"] < 1e-4, name
        assert results[name]["graphs"] >= 1
        assert results[name]["runs"][0]["fx_graph_cache_hits"] == 0, name  # each child compiles cold
    assert results["inductor"]["vs_inductor"] == 1.0
    rewrites = results["diffopt"]["rewrites"]
    assert set(rewrites) <= set(registered_passes()) and sum(rewrites.values()) > 0
    assert results["inductor"]["rewrites"] is None
    assert data["meta"]["env"]["torch"] == torch.__version__ and data["meta"]["tiny"]


def test_tiny_run_prints_the_table_and_the_chart(tiny_run):
    stdout, data, out = tiny_run
    header = next(line for line in stdout.splitlines() if line.startswith("| workload"))
    for column in ("config", "median ms", "min ms", "vs inductor", "peak GB", "compile s", "rel err max", "rewrites"):
        assert column in header
    rows = [line for line in stdout.splitlines() if line.startswith("| wan1.3b_1frame")]
    assert [row.split("|")[2].strip() for row in rows] == ["eager", "inductor", "diffopt"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no chart: matplotlib is not installed" in stdout
    else:
        assert (out / "bench_models.png").stat().st_size > 0


def test_chart_marks_kernel_time_where_profiled(tmp_path, monkeypatch):
    axes = pytest.importorskip("matplotlib.axes")
    ticks = []
    draw = axes.Axes.scatter
    monkeypatch.setattr(axes.Axes, "scatter", lambda self, x, y, **kw: (ticks.append((list(x), list(y))),
                                                                         draw(self, x, y, **kw))[1])
    rows = [{"workload": "w", "config": config, "backend": config, "mode": None, "regional": False,
             "median_ms": median, "repeat_median_ms": [median], "peak_GB": 0.1, "kernel_ms": kernels}
            for config, median, kernels in (("inductor", 15.1, 12.7), ("diffopt", 17.0, None))]
    assert bench_models.plot(rows, {"date": "2026-12-02"}, tmp_path / "chart.png").stat().st_size > 0
    assert ticks == [([12.7], [1])]  # rows are drawn bottom-up: the first row is the top one


def test_repeats_run_the_set_again_and_eager_repeats_itself(tmp_path):
    stdout, data, _ = _run(tmp_path, "--workloads", "flux_1024", "--configs", "eager", "--repeats", "2",
                           "--iters", "2", "--warmup", "0")
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("[")] == ["r0", "r1"]
    (row,) = data["results"]
    assert [run["repeat"] for run in row["runs"]] == [0, 1]
    assert len(row["repeat_median_ms"]) == 2 and row["spread_pct"] >= 0
    assert row["rel_err_max"] == 0.0  # the second eager run against the first one's output
    assert row["vs_inductor"] is None


def test_shared_cache_dir_makes_later_children_warm_and_is_kept(tmp_path):
    caches = tmp_path / "caches"
    stdout, data, _ = _run(tmp_path, "--workloads", "wan1.3b_1frame", "--configs", "eager,inductor,diffopt", "--repeats", "2",
                           "--iters", "1", "--warmup", "0", "--cache-dir", str(caches))
    hits = {row["config"]: [run["fx_graph_cache_hits"] for run in row["runs"]] for row in data["results"]
            if row["backend"] != "eager"}
    # the first child of each backend compiles and fills the cache; its second child finds the graph there
    assert hits["inductor"][0] == 0 and hits["inductor"][1] >= 1, hits
    assert hits["diffopt"][1] >= 1, hits
    assert (caches / "inductor").is_dir() and any((caches / "inductor").rglob("*"))
    assert data["meta"]["cache_dir"] == str(caches)
    assert f"compile s is warm: every child compiled with the caches in {caches}" in stdout
    assert all(row["rel_err_max"] < 1e-4 for row in data["results"] if row["backend"] != "eager"), data["results"]


def test_a_child_past_its_timeout_is_recorded_and_the_run_goes_on(tmp_path):
    stdout, data, _ = _run(tmp_path, "--workloads", "wan1.3b_1frame,flux_1024", "--configs", "eager",
                           "--timeout", "0.2")
    assert [row["errors"] for row in data["results"]] == [["timeout: killed after 0.2 s"]] * 2
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in stdout.splitlines() if line.startswith("| ")]
    assert [row[:3] + row[-1:] for row in rows[1:]] == [
        [workload, "eager", "failed", "timeout: killed after 0.2 s"] for workload in ("wan1.3b_1frame", "flux_1024")
    ]


def test_kernel_prebuild_runs_in_its_own_process_and_is_recorded(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU this builds FlashInfer's kernels")
    record = bench_models.prebuild_kernels(tmp_path / "prebuild.log", timeout_s=300)
    assert record["returncode"] == 2 and record["seconds"] > 0
    assert record["kernels"] == ["diffopt.prebuild: no CUDA device (cuda); the kernels are built for the GPU they run on"]


@pytest.mark.gpu
def test_tiny_run_on_cuda_measures_peak_memory(tmp_path):
    stdout, data, _ = _run(tmp_path, "--workloads", "wan1.3b_1frame", "--cudagraphs", "--iters", "3",
                           "--warmup", "2", "--kernels", device="cuda")
    results = {row["config"]: row for row in data["results"]}
    assert set(results) == {"eager", "inductor", "diffopt", "inductor/reduce-overhead", "diffopt/reduce-overhead"}
    for name, row in results.items():
        assert row["failed_repeats"] == 0, (name, row["errors"])
        assert row["peak_GB"] >= 0 and row["first_calls_peak_GB"] >= 0, name
        assert row["held_GB"] is not None, name
        if name != "eager":
            assert row["rel_err_max"] < 1e-3, name
        if "reduce-overhead" not in name:  # a graph replay's kernels may not reach the profiler
            assert row["kernel_ms"] > 0 and row["launches"] >= len(row["top_kernels"]) > 0, name
            assert 0 < row["host_ms"] <= row["median_ms"] * 1.05, name  # the host returns before the device ends
            assert f"{row['workload']} {name}: " in stdout
    assert data["meta"]["env"]["gpu"]
    assert "kernel_prebuild" not in data["meta"]  # float32 only: no FlashInfer kernel to build


@pytest.mark.gpu
def test_tiny_regional_runs_under_cuda_graphs(tmp_path):
    stdout, data, _ = _run(tmp_path, "--workloads", "flux_1024", "--configs",
                           "eager,inductor/regional/reduce-overhead,diffopt/regional/reduce-overhead",
                           "--iters", "3", "--warmup", "2", device="cuda")
    for row in data["results"]:
        assert row["failed_repeats"] == 0, (row["config"], row["errors"])
        if row["config"] != "eager":
            assert row["rel_err_max"] < 1e-3, row["config"]
