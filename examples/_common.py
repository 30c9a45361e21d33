"""What ``examples/wan.py`` and ``examples/cosmos3.py`` share: the command line, the loading of a
stock transformer, one denoising loop run eager / Inductor / diffopt, and the side-by-side table.

A model script describes its loop as a :class:`Denoising` (the transformer, the initial latents,
the scheduler's shift and one step as the model's diffusers pipeline takes it) and calls
:func:`compare`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from diffopt.models import CONFIG_NAMES, get_config
from diffopt.models.diffusers_models import cast_like_from_pretrained
from diffopt.report import Report, collecting

BACKENDS = ("eager", "inductor", "diffopt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------- command line


@dataclasses.dataclass(frozen=True)
class Defaults:
    """A model script's defaults: at real size (bf16 on CUDA) and with ``--tiny`` (fp32 on the CPU).
    Sizes are of the decoded video, ``(height, width, frames)``, as the pipeline takes them."""

    config: str
    tiny_config: str
    size: tuple[int, int, int]
    tiny_size: tuple[int, int, int]
    steps: int
    tiny_steps: int
    guidance_scale: float


def parse_args(description: str, defaults: Defaults, argv: Sequence[str] | None = None) -> argparse.Namespace:
    family = defaults.config.split("-")[0]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="PATH", help="a local diffusers checkpoint: the pipeline folder (its "
                        "transformer/ subfolder is loaded) or the transformer folder itself")
    source.add_argument("--config", choices=[name for name in CONFIG_NAMES if name.startswith(family)],
                        help=f"named config, random weights (default: {defaults.config}; {defaults.tiny_config} "
                        "with --tiny)")
    parser.add_argument("--layers", type=int, help="build the named config with this many layers instead")
    parser.add_argument("--tiny", action="store_true", help="tiny config, fp32 on the CPU, small sizes, few steps")
    parser.add_argument("--device", help="default: cuda, or cpu with --tiny")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bf16, or fp32 with --tiny")
    parser.add_argument("--steps", type=int, help=f"denoising steps (default: {defaults.steps}; "
                        f"{defaults.tiny_steps} with --tiny)")
    size, tiny_size = defaults.size, defaults.tiny_size
    for index, name in enumerate(("height", "width", "frames")):
        parser.add_argument(f"--{name}", type=int, help=f"of the video (default: {size[index]}; "
                            f"{tiny_size[index]} with --tiny)")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale,
                        help=f"classifier-free guidance (default: {defaults.guidance_scale:g}, the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights, latents and text")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma list of eager, inductor, diffopt")
    parser.add_argument("--regional", action="store_true", help="compile only the repeated blocks "
                        "(diffusers' compile_repeated_blocks): seconds of compile instead of minutes")
    parser.add_argument("--chart", metavar="PNG", help="write a chart of ms per step per backend (needs matplotlib)")
    args = parser.parse_args(argv)

    if args.model and args.layers is not None:
        parser.error("--layers builds a named config; it does not apply to --model")
    args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown or not args.backends:
        parser.error(f"--backends: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(BACKENDS)}")
    args.config = args.config or (defaults.tiny_config if args.tiny else defaults.config)
    args.device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    args.dtype = DTYPES[args.dtype or ("fp32" if args.tiny else "bf16")]
    args.steps = args.steps or (defaults.tiny_steps if args.tiny else defaults.steps)
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first step compiles; the others are timed)")
    for index, name in enumerate(("height", "width", "frames")):
        if getattr(args, name) is None:
            setattr(args, name, (tiny_size if args.tiny else size)[index])
    return args


def load_or_build(args: argparse.Namespace, model_class_name: str, builder: Callable) -> tuple[nn.Module, str]:
    """The stock transformer in ``args.dtype`` on ``args.device``, and where it came from.

    ``--model PATH``: ``from_pretrained(PATH, subfolder="transformer", torch_dtype=...)`` for a
    pipeline folder, ``from_pretrained(PATH, torch_dtype=...)`` for the transformer folder itself.
    Otherwise ``builder`` (a ``diffopt.models.diffusers_models`` one) at the named config with
    random weights, cast the way ``from_pretrained(torch_dtype=...)`` casts (float32 modules kept).
    """
    if args.model:
        import diffusers

        path = Path(args.model)
        subfolder = "transformer" if (path / "transformer").is_dir() else None
        model = getattr(diffusers, model_class_name).from_pretrained(path, subfolder=subfolder, torch_dtype=args.dtype)
        return model.to(args.device).eval(), f"{path / (subfolder or '')} (from_pretrained)"
    model = builder(get_config(args.config), num_layers=args.layers, seed=args.seed, device=args.device)
    cast_like_from_pretrained(model, args.dtype)
    layers = "" if args.layers is None else f", {args.layers} layers"
    return model, f"{args.config}{layers} (random weights: nothing is downloaded)"


def random_generator(seed: int) -> torch.Generator:
    """A CPU generator, so that the latents and text are the same on every device."""
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Denoising:
    """One model's denoising loop as its diffusers pipeline runs it, transformer alone.

    ``step(transformer, scheduler, latents, t)`` is one step: the transformer called for the
    prompt and, when ``guided``, for the negative prompt, classifier-free guidance, the
    scheduler's update; it returns the next latents. Both pipelines step a UniPC scheduler over
    flow-matching sigmas shifted by ``flow_shift``. ``source`` says where the transformer came
    from, ``about`` what the latents and the text are.
    """

    title: str
    pipeline: str
    source: str
    about: list[str]
    model: nn.Module
    latents: torch.Tensor
    flow_shift: float
    guided: bool
    step: Callable


def flow_unipc_scheduler(flow_shift: float):
    """A fresh ``UniPCMultistepScheduler`` as the Wan and Cosmos3 checkpoints configure it:
    flow prediction over shifted flow sigmas (a scheduler keeps per-run state)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )


@dataclasses.dataclass
class Run:
    backend: str
    step_ms: list[float]
    latents: torch.Tensor
    peak_bytes: int | None
    report: Report | None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms[1:])

    @property
    def first_step_extra_s(self) -> float:
        """What the first step took beyond a later one: compiling, for a compiled backend."""
        return (self.step_ms[0] - self.median_ms) / 1e3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _first_compile(report: Report | None):
    # Inductor's on-disk FX graph and AOT caches would let a second run of the example skip
    # compiling, and with it diffopt's passes (then nothing is reported): turned off for the
    # first step, every run compiles for real and the compile seconds mean the same each time.
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        if report is not None:
            stack.enter_context(collecting(report))
        yield


def _compiled(model: nn.Module, backend: str, regional: bool):
    if backend == "eager":
        return model
    if regional:
        model.compile_repeated_blocks(backend=backend)
        return model
    return torch.compile(model, backend=backend)


def _uncompile_blocks(model: nn.Module) -> None:
    # nn.Module.compile keeps the compiled __call__ in _compiled_call_impl and has no public
    # undo; clearing it gives the next backend the stock blocks back.
    for module in model.modules():
        module._compiled_call_impl = None


def run_backend(denoising: Denoising, backend: str, args: argparse.Namespace) -> Run:
    """The whole loop with ``backend``, from the same initial latents; each step timed alone."""
    from tqdm.auto import tqdm

    torch._dynamo.reset()
    device = args.device
    transformer = _compiled(denoising.model, backend, args.regional)
    scheduler = flow_unipc_scheduler(denoising.flow_shift)
    scheduler.set_timesteps(args.steps, device=device)
    # As WanPipeline does: the step index starts at 0 instead of being looked up from the
    # timestep (a host sync per step).
    scheduler.set_begin_index(0)
    latents = denoising.latents.clone()
    report = Report() if backend == "diffopt" else None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    step_ms = []
    with torch.no_grad(), tqdm(total=len(scheduler.timesteps), desc=f"{backend:>8}", unit="step") as progress:
        for index, t in enumerate(scheduler.timesteps):
            first = index == 0 and backend != "eager"
            _synchronize(device)
            start = time.perf_counter()
            with _first_compile(report) if first else contextlib.nullcontext():
                latents = denoising.step(transformer, scheduler, latents, t)
            _synchronize(device)
            step_ms.append((time.perf_counter() - start) * 1e3)
            progress.update()
            if index == 0 and device.type == "cuda":
                # The peak of the steps that follow: compiling (autotuning included) stays out.
                torch.cuda.reset_peak_memory_stats(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if args.regional and backend != "eager":
        _uncompile_blocks(denoising.model)
    return Run(backend, step_ms, latents.float(), peak, report)


# ---------------------------------------------------------------------------- output


def relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """max |latents - reference| / max |reference|, in float64."""
    latents, reference = latents.double(), reference.double()
    return ((latents - reference).abs().max() / reference.abs().max()).item()


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def summary(runs: Sequence[Run], args: argparse.Namespace) -> str:
    """The side-by-side table, then one agreement line per compiled backend."""
    by_name = {run.backend: run for run in runs}
    eager, inductor = by_name.get("eager"), by_name.get("inductor")
    rows = [("backend", "ms/step", "vs inductor", "total s", "compile s", "peak GB", "max err vs eager")]
    for run in runs:
        rows.append((
            run.backend,
            f"{run.median_ms:.1f}",
            f"{run.median_ms / inductor.median_ms:.3f}" if inductor else "-",
            f"{sum(run.step_ms) / 1e3:.2f}",
            "-" if run.backend == "eager" else f"{run.first_step_extra_s:.1f}",
            "n/a" if run.peak_bytes is None else f"{run.peak_bytes / 1e9:.2f}",
            f"{relative_error(run.latents, eager.latents):.2e}" if eager else "-",
        ))
    lines = [
        f"{args.steps} steps, {', '.join(run.backend for run in runs)}"
        f"{' (repeated blocks compiled)' if args.regional else ''}",
        _table(rows),
        "ms/step: median over steps 2..N (a step: the transformer calls and the scheduler); compile s: what step 1 "
        "took beyond that; peak GB: CUDA max allocated over steps 2..N, weights included (n/a on CPU); max err: "
        "final latents, max |x - eager| / max |eager|",
    ]
    if args.device.type == "cpu":
        lines.append("on the CPU diffopt's fused kernels are off by default (CUDA-only) and small sizes are "
                     "overhead-bound: CPU times show that the loop runs and agrees, not what diffopt gains")
    if eager:
        lines += [f"max err vs eager ({run.backend}): {relative_error(run.latents, eager.latents):.3e}"
                  for run in runs if run.backend != "eager"]
    return "\n".join(lines)


BACKEND_COLORS = {"eager": "#9e9e9e", "inductor": "#1f77b4", "diffopt": "#ff7f0e"}


def write_chart(runs: Sequence[Run], title: str, path: str) -> None:
    """ms of each step per backend (log scale: step 1 includes compiling)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no chart written to {path}: matplotlib is not installed (pip install matplotlib)")
        return
    figure, axis = plt.subplots(figsize=(8, 4.5))
    steps = range(1, len(runs[0].step_ms) + 1)
    for run in runs:
        compile_s = "" if run.backend == "eager" else f", compile {run.first_step_extra_s:.1f} s"
        axis.plot(steps, run.step_ms, marker="o", color=BACKEND_COLORS[run.backend],
                  label=f"{run.backend}: {run.median_ms:.1f} ms/step{compile_s}")
    axis.set_xticks(steps)
    axis.set_yscale("log")
    axis.set_xlabel("denoising step")
    axis.set_ylabel("ms (step 1 includes compiling)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def compare(denoising: Denoising, args: argparse.Namespace) -> list[Run]:
    """Run the loop with every backend asked for, then print the table and diffopt's report."""
    import diffusers

    device = args.device
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    model = denoising.model
    blocks = [type(module).__name__ for module in model.modules() if type(module).__name__ in model._repeated_blocks]
    parameters = sum(parameter.numel() for parameter in model.parameters())
    calls = "the prompt and the negative prompt as two calls per step" if denoising.guided else "one call per step"
    print(denoising.title)
    for line in (
        f"transformer: diffusers {type(model).__name__}, {denoising.source}: {len(blocks)} x {blocks[0]}, "
        f"{parameters / 1e9:.2f} B parameters" if parameters >= 1e8 else f"{parameters / 1e6:.2f} M parameters",
        *denoising.about,
        f"{denoising.pipeline}'s loop: UniPCMultistepScheduler (flow_prediction, flow_shift "
        f"{denoising.flow_shift:g}), {args.steps} steps, guidance {args.guidance_scale:g}: {calls}",
    ):
        print(f"  {line}")
    print(f"  {str(args.dtype).removeprefix('torch.')} on {device}{gpu}; torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}")
    print(flush=True)
    runs = [run_backend(denoising, backend, args) for backend in args.backends]
    print()
    print(summary(runs, args))
    for run in runs:
        if run.report is not None:
            print("\ndiffopt report (the first step, where it compiled):")
            print(run.report)
    if args.chart:
        write_chart(runs, denoising.title, args.chart)
    return runs
