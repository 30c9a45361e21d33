"""examples/wan.py and examples/cosmos3.py: the command line, and each script run with ``--tiny``
in a process of its own (fp32; the CPU in CI): the denoising loop runs eager, with Inductor
and with diffopt, the compiled latents agree with eager's, diffopt's report is printed.

``examples/`` is not a package: its shared module is imported from the folder."""
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, load_script

pytest.importorskip("diffusers")

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import _common  # noqa: E402

wan, cosmos3 = load_script("examples/wan.py", "examples_wan"), load_script("examples/cosmos3.py", "examples_cosmos3")
WAN = wan.DEFAULTS


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny", *args], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def _check_output(completed: subprocess.CompletedProcess, steps: int, tolerance: float) -> str:
    out = completed.stdout
    for backend in _common.BACKENDS:
        assert re.search(rf"^{backend} +\d+\.\d ", out, re.M), f"no table row for {backend}:\n{out}"
    errors = dict(re.findall(r"^max err vs eager \((\w+)\): (\S+)$", out, re.M))
    assert set(errors) == {"inductor", "diffopt"}, out
    for backend, error in errors.items():
        assert math.isfinite(float(error)) and float(error) < tolerance, f"{backend}: {error}"
    report = out.split("diffopt report", 1)[-1]
    assert "diffopt report" in out and "dedupe" in report and "fold_invariant" in report, out
    # One progress bar per backend, each run to the last step.
    assert completed.stderr.count(f"{steps}/{steps}") >= len(_common.BACKENDS), completed.stderr
    return out


@pytest.mark.parametrize("script", ["wan.py", "cosmos3.py"])
def test_tiny_loop_agrees_with_eager_and_reports(script, tmp_path):
    chart = tmp_path / "steps.png"
    completed = _run(script, "--chart", str(chart))
    out = _check_output(completed, steps=3, tolerance=1e-3)
    assert "random" in out and "no VAE" in out  # says what it does not run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
@pytest.mark.parametrize("script", ["wan.py", "cosmos3.py"])
def test_tiny_loop_on_cuda(script):
    completed = _run(script, "--device", "cuda")
    out = _check_output(completed, steps=3, tolerance=1e-3)
    assert not re.search(r"^diffopt .* n/a ", out, re.M)  # peak memory is measured on CUDA


def test_defaults_follow_tiny_and_explicit_flags_win():
    tiny = _common.parse_args("", WAN, ["--tiny"])
    assert (tiny.config, tiny.device, tiny.dtype, tiny.steps) == ("wan-tiny", torch.device("cpu"), torch.float32, 3)
    assert (tiny.height, tiny.width, tiny.frames) == (64, 64, 5)
    real = _common.parse_args("", WAN, [])
    assert (real.config, real.device, real.dtype, real.steps) == ("wan-1.3b", torch.device("cuda"), torch.bfloat16, 10)
    assert (real.height, real.width, real.frames) == (480, 832, 81)
    mixed = _common.parse_args("", WAN, ["--tiny", "--dtype", "bf16", "--height", "128", "--backends", "diffopt"])
    assert (mixed.dtype, mixed.height, mixed.width, mixed.backends) == (torch.bfloat16, 128, 64, ["diffopt"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "1"],  # nothing left to time after the compiling step
        ["--backends", "eager,tvm"],
        ["--model", "/nowhere", "--layers", "2"],
        ["--model", "/nowhere", "--config", "wan-14b"],
        ["--config", "cosmos3"],  # not a Wan config
    ],
)
def test_bad_command_lines_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        _common.parse_args("", WAN, argv)
    assert "error" in capsys.readouterr().err


def test_relative_error_is_max_abs_over_max_abs_of_the_reference():
    reference = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    assert _common.relative_error(reference + torch.tensor([[0.0, 0.0], [0.0, -0.2]]), reference) == pytest.approx(0.05)


def test_sizes_the_vae_cannot_take_are_refused():
    wan_config = SimpleNamespace(patch_size=(1, 2, 2), in_channels=16)
    args = _common.parse_args("", WAN, [])
    assert wan.latent_shape(args, wan_config) == (1, 16, 21, 60, 104)  # 480x832, 81 frames
    for flag, value in (("--frames", "80"), ("--height", "472")):
        args = _common.parse_args("", WAN, [flag, value])
        with pytest.raises(SystemExit, match="multiples of 16/16 and --frames 4k\\+1"):
            wan.latent_shape(args, wan_config)
    args = _common.parse_args("", cosmos3.DEFAULTS, [])
    assert cosmos3.latent_grid(args) == (31, 45, 80)  # 720x1280, 121 frames: 31 x 23 x 40 tokens after padding
    with pytest.raises(SystemExit, match="multiples of 16"):
        cosmos3.latent_grid(_common.parse_args("", cosmos3.DEFAULTS, ["--width", "1288"]))
