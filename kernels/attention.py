"""``torch.ops.diffopt.attention``: scaled dot-product attention computed by a named kernel.

Schema::

    diffopt::attention(Tensor q, Tensor k, Tensor v, *, float scale, str backend, str out_layout) -> Tensor

q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Skv, D]``, v ``[B, Hkv, Skv, Dv]`` (SDPA's argument layout), any
strides, Hkv dividing Hq (grouped-query attention: key/value head ``h // (Hq / Hkv)`` serves query
head ``h``), Sq and Skv independent (cross-attention), no mask, no dropout, not causal. Semantics:
:func:`attention_reference` below (the spec, and the implementation on every device but CUDA,
whatever ``backend`` says).

``backend`` names the CUDA kernel:

- ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``: ATen's fused SDPA kernels, called directly
  (``aten._scaled_dot_product_{flash,efficient,cudnn}_attention``), without SDPA's per-call backend
  choice.
- ``flashinfer_fa3`` (Hopper, sm90), ``flashinfer_fa2`` (sm80 and newer): FlashInfer's single-request
  prefill kernel (what ``flashinfer.single_prefill_with_kv_cache(q, k, v, kv_layout="NHD",
  backend=...)`` runs), called per batch element on ``[S, H, D]`` views (``NHD``: the strides of a
  ``[B, S, H, D]`` tensor before the transpose, of a ``[B, H, S, D]`` one, and of head slices of a
  packed qkv all fit without a copy). Where every tensor's batch stride is its heads times its head
  stride (``[B, H, S, D]`` contiguous), the batch folds into the heads and one call does all of it.
  fa3 writes the output in any layout; fa2 only as contiguous ``[S, H, Dv]`` rows, so another layout
  costs it one copy. FlashInfer builds each kernel variant on its first use on a machine (20-100 s,
  then loaded from its disk cache); the ``diffopt`` logger warns before such a build, and
  :func:`prebuild` (``python -m diffopt.prebuild``) does it ahead of any compile. Nothing is
  planned on the host per call: safe to capture in CUDA graphs.

``out_layout`` (``flash``, ``efficient``, ``cudnn``, ``flash_cpu``): the output has exactly the sizes
and strides that ATen's ``_scaled_dot_product_<out_layout>_attention`` gives for these inputs. They
are computed by that op's own meta function (on meta tensors, cached per input layout), so they
agree with the stock call the op replaces on any torch version, and a kernel whose natural layout
differs copies into it.

Registered with ``torch.library.Library`` like ``qk_norm_rope`` (the dispatcher calls the device
function directly, without ``custom_op``'s Python wrappers and their host time per call), tagged
``needs_exact_strides`` so Inductor hands the op inputs with exactly the strides the rewrite saw.
Functional and inference-only (no autograd formula).
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .library import LIBRARY, first_definition

__all__ = [
    "ATTENTION_SCHEMA", "BACKENDS", "OUT_LAYOUTS", "attention", "attention_reference", "backend_unavailable",
    "backend_unsupported", "check_attention_args", "flashinfer_kernel_built", "prebuild",
]

log = logging.getLogger("diffopt")
aten = torch.ops.aten

ATTENTION_SCHEMA = "(Tensor q, Tensor k, Tensor v, *, float scale, str backend, str out_layout) -> Tensor"

# backend -> the input dtypes its kernel takes
_DTYPES = {
    "sdpa_flash": (torch.float16, torch.bfloat16),
    "sdpa_efficient": (torch.float16, torch.bfloat16, torch.float32),
    "sdpa_cudnn": (torch.float16, torch.bfloat16),
    "flashinfer_fa3": (torch.float16, torch.bfloat16),
    "flashinfer_fa2": (torch.float16, torch.bfloat16),
}
BACKENDS = tuple(_DTYPES)
# Head dims FlashInfer instantiates for prefill with equal q/k and v head dims: anything else would
# spend a minute in the JIT build before failing.
_FLASHINFER_HEAD_DIMS = (64, 128, 256)

# out_layout -> the stock op, called as it is in the graph's inference form (no mask, no dropout,
# no logsumexp)
OUT_LAYOUTS: dict[str, Callable[[Tensor, Tensor, Tensor], Any]] = {
    "flash": lambda q, k, v: aten._scaled_dot_product_flash_attention.default(q, k, v),
    "efficient": lambda q, k, v: aten._scaled_dot_product_efficient_attention.default(q, k, v, None, False),
    "cudnn": lambda q, k, v: aten._scaled_dot_product_cudnn_attention.default(q, k, v, None, False),
    "flash_cpu": lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v),
}


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, backend: str, out_layout: str) -> Tensor:
    """softmax(q @ k^T * scale) @ v per head, by the ``backend`` kernel, in the ``out_layout``
    stock op's output layout (see the module docstring; spec: ``attention_reference``)."""
    return torch.ops.diffopt.attention(q, k, v, scale=scale, backend=backend, out_layout=out_layout)


# --- the spec --------------------------------------------------------------------------


def check_attention_args(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Validate the tensors of ``diffopt::attention``: q [B, Hq, Sq, D], k [B, Hkv, Skv, D],
    v [B, Hkv, Skv, Dv], one floating dtype, Hkv dividing Hq. Raises ``ValueError`` otherwise."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D [B, H, S, D], got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or length")
    if Hq % k.shape[1]:
        raise ValueError(f"attention: {k.shape[1]} key/value heads do not divide {Hq} query heads")


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Reference for ``torch.ops.diffopt.attention`` (plain torch, like ``kernels/reference.py``):
    SDPA's math, without mask or dropout.

    out[b, h] = softmax(q[b, h] @ k[b, h // g]^T * scale) @ v[b, h // g], g = Hq / Hkv (grouped-query
    attention as SDPA's ``enable_gqa``: each key/value head serves g consecutive query heads).
    Shapes as :func:`check_attention_args`; any strides. Computed in float32 (float64 stays
    float64), rounded once to q's dtype; returns a new contiguous [B, Hq, Sq, Dv] tensor.
    """
    check_attention_args(q, k, v)
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = (x.to(compute) for x in (q, k, v))
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    weights = torch.softmax((qf @ kf.transpose(-2, -1)) * scale, dim=-1)
    return (weights @ vf).to(q.dtype)


# --- which kernels can run here --------------------------------------------------------


def backend_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None: it can). On devices other than CUDA every
    backend runs the reference; FlashInfer's must still be installed (so that its absence takes
    the same path everywhere)."""
    _check_backend(backend)
    if not backend.startswith("flashinfer"):
        return None
    error = _flashinfer_import()[1]
    if error:
        return error
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if backend == "flashinfer_fa3" and major != 9:
            return f"fa3 runs on sm90 (Hopper) only, this GPU is sm{major}{minor}"
        if backend == "flashinfer_fa2" and major < 8:
            return f"fa2 needs sm80 or newer, this GPU is sm{major}{minor}"
    return None


def backend_unsupported(backend: str, dtype: torch.dtype, head_dim: int, head_dim_v: int, grouped: bool) -> str | None:
    """Why ``backend``'s kernel does not take this problem (None: it may; a kernel can still fail
    on it, which the caller sees when it runs). ``grouped``: fewer key/value heads than query heads."""
    _check_backend(backend)
    if dtype not in _DTYPES[backend]:
        return f"takes {'/'.join(str(d).removeprefix('torch.') for d in _DTYPES[backend])} only"
    if grouped and backend == "sdpa_efficient":  # SDPA never sends grouped-query attention there
        return "no grouped-query attention"
    if backend.startswith("flashinfer") and (head_dim != head_dim_v or head_dim not in _FLASHINFER_HEAD_DIMS):
        return f"head dims {'/'.join(map(str, _FLASHINFER_HEAD_DIMS))} only"
    return None


def _check_backend(backend: str) -> None:
    if backend not in _DTYPES:
        raise ValueError(f"attention: unknown backend {backend!r}; known: {BACKENDS}")


# --- output layout ---------------------------------------------------------------------


def _stock_output(q: Tensor, k: Tensor, v: Tensor, out_layout: str) -> Tensor:
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"attention: unknown out_layout {out_layout!r}; known: {tuple(OUT_LAYOUTS)}")
    return OUT_LAYOUTS[out_layout](q, k, v)[0]


@functools.lru_cache(maxsize=1024)
def _layout(out_layout: str, dtype: torch.dtype, *shapes_and_strides: tuple[int, ...]) -> tuple[tuple, tuple]:
    q, k, v = (
        torch.empty_strided(shapes_and_strides[i], shapes_and_strides[i + 1], dtype=dtype, device="meta")
        for i in (0, 2, 4)
    )
    out = _stock_output(q, k, v, out_layout)
    return tuple(out.shape), tuple(out.stride())


def _empty_output(q: Tensor, k: Tensor, v: Tensor, out_layout: str) -> Tensor:
    """A new tensor with the sizes and strides of the ``out_layout`` stock op's output."""
    shape, stride = _layout(out_layout, q.dtype, *(t for x in (q, k, v) for t in (tuple(x.shape), x.stride())))
    return torch.empty_strided(shape, stride, dtype=q.dtype, device=q.device)


def _in_layout(result: Tensor, q: Tensor, k: Tensor, v: Tensor, out_layout: str) -> Tensor:
    shape, stride = _layout(out_layout, q.dtype, *(t for x in (q, k, v) for t in (tuple(x.shape), x.stride())))
    if result.stride() == stride:
        return result
    out = torch.empty_strided(shape, stride, dtype=result.dtype, device=result.device)
    return out.copy_(result)


# --- kernels ---------------------------------------------------------------------------


def _last_dim_dense(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _sdpa(call: Callable[..., Any]) -> Callable[..., Tensor]:
    def run(q: Tensor, k: Tensor, v: Tensor, scale: float, out_layout: str) -> Tensor:
        result = call(_last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v), scale)[0]
        return _in_layout(result, q, k, v, out_layout)

    return run


_sdpa_flash = _sdpa(lambda q, k, v, scale: aten._scaled_dot_product_flash_attention.default(q, k, v, scale=scale))
_sdpa_efficient = _sdpa(
    lambda q, k, v, scale: aten._scaled_dot_product_efficient_attention.default(q, k, v, None, False, scale=scale)
)
_sdpa_cudnn = _sdpa(
    lambda q, k, v, scale: aten._scaled_dot_product_cudnn_attention.default(q, k, v, None, False, scale=scale)
)


@functools.cache
def _flashinfer_import() -> tuple[Any, str | None]:
    try:
        import flashinfer.prefill
        import flashinfer.utils
    except ModuleNotFoundError as error:
        if error.name == "flashinfer":
            return None, "FlashInfer is not installed (pip install flashinfer-python)"
        return None, f"FlashInfer does not import ({error})"
    except Exception as error:  # its native dependencies fail to load
        return None, f"FlashInfer does not import ({type(error).__name__}: {error})"
    return flashinfer, None


def flashinfer_version() -> str | None:
    """The installed FlashInfer's version, None when it does not import."""
    module, _ = _flashinfer_import()
    return getattr(module, "__version__", "unknown") if module is not None else None


def _prefill_args(dtype: torch.dtype, head_dim: int, head_dim_v: int) -> tuple:
    """FlashInfer's arguments after the variant that name diffopt's single-prefill kernel."""
    flashinfer, _ = _flashinfer_import()
    return (
        dtype, dtype, dtype, head_dim, head_dim_v,
        flashinfer.utils.PosEncodingMode.NONE.value,
        False,  # use_sliding_window
        False,  # use_logits_soft_cap
        False,  # use_fp16_qk_reduction
    )


def _describe(variant: str, dtype: torch.dtype, head_dim: int) -> str:
    return f"FlashInfer {variant.removeprefix('flashinfer_')} attention kernel ({str(dtype).removeprefix('torch.')}, head_dim {head_dim})"


def flashinfer_kernel_built(variant: str, dtype: torch.dtype, head_dim: int, head_dim_v: int) -> bool:
    """Whether FlashInfer has the kernel on disk (prebuilt, or JIT-built earlier), so that loading
    it takes about a second instead of a 20-100 s build."""
    flashinfer, error = _flashinfer_import()
    if flashinfer is None:
        raise RuntimeError(error)
    spec = flashinfer.prefill.gen_single_prefill_module(variant.removeprefix("flashinfer_"), *_prefill_args(dtype, head_dim, head_dim_v))
    return bool(spec.is_compiled)


@functools.cache
def _prefill_module(variant: str, dtype: torch.dtype, head_dim: int, head_dim_v: int) -> Any:
    """FlashInfer's module of the single-request prefill kernel ``variant`` (``fa2``/``fa3``), built
    on first use, then loaded from FlashInfer's disk cache; kept for the process."""
    flashinfer, error = _flashinfer_import()
    if flashinfer is None:
        raise RuntimeError(error)
    what = _describe(variant, dtype, head_dim)
    if not flashinfer_kernel_built(variant, dtype, head_dim, head_dim_v):
        # A stall of a minute or more inside torch.compile needs saying where it is seen.
        log.warning("diffopt: building %s: 20-100 s, once per machine (FlashInfer's cache keeps it; "
                    "`python -m diffopt.prebuild` builds it ahead of time)", what)
    start = time.perf_counter()
    module = flashinfer.prefill.get_single_prefill_module(variant, *_prefill_args(dtype, head_dim, head_dim_v))
    log.info("diffopt: %s ready in %.1f s", what, time.perf_counter() - start)
    return module


def prebuild(dtypes: Sequence[torch.dtype], head_dims: Sequence[int], device: torch.device) -> Iterator[dict[str, Any]]:
    """Build (or load) every FlashInfer kernel the attention pass may measure on ``device`` for
    these dtypes and head dims, so that no compile waits for a build. Yields one record per kernel
    as it is done: ``{"kernel", "built_before", "seconds"}`` plus ``"error"`` where it failed, or
    ``{"kernel", "skipped"}`` with the reason where the pass would not measure it."""
    for backend in BACKENDS:
        if not backend.startswith("flashinfer"):
            continue
        for dtype in dtypes:
            for head_dim in head_dims:
                what = _describe(backend, dtype, head_dim)
                why = backend_unavailable(backend, device) or backend_unsupported(backend, dtype, head_dim, head_dim, False)
                if why:
                    yield {"kernel": what, "skipped": why}
                    continue
                variant = backend.removeprefix("flashinfer_")
                record: dict[str, Any] = {"kernel": what, "built_before": None}
                start = time.perf_counter()
                try:  # a kernel that does not build is a result; the others still build
                    record["built_before"] = flashinfer_kernel_built(variant, dtype, head_dim, head_dim)
                    _prefill_module(variant, dtype, head_dim, head_dim)
                except Exception as error:
                    record["error"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
                record["seconds"] = round(time.perf_counter() - start, 2)
                yield record


def _tma_ready(x: Tensor) -> bool:
    """Dense last dim, 16-byte aligned start and strides: what FlashInfer's vector and TMA loads need."""
    unit = 16 // x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s % unit == 0 for s in x.stride()[:-1])


def _folds(x: Tensor) -> bool:
    """Whether batch folds into heads: element (b, h) sits where head b * H + h would."""
    return x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def _nhd_views(x: Tensor, fold: bool) -> list[Tensor]:
    """``[S, H, D]`` views of a ``[B, H, S, D]`` tensor: one per batch element, or one of ``B * H`` heads."""
    if fold:
        B, H, S, D = x.shape
        return [x.as_strided((S, B * H, D), (x.stride(2), x.stride(1), x.stride(3)))]
    return [x[b].transpose(0, 1) for b in range(x.shape[0])]


def _nhd_plan(q: Tensor, k: Tensor, v: Tensor, out: Tensor, variant: str) -> bool | None:
    """Whether the calls fold the batch (True) or loop over it (False); None: the kernel cannot
    write ``out`` (fa2 writes contiguous ``[S, H, Dv]`` rows only)."""
    fold = all(_folds(x) for x in (q, k, v, out))
    if not _tma_ready(out) or (variant == "fa2" and not all(o.is_contiguous() for o in _nhd_views(out, fold))):
        return None
    return fold


# Most thread blocks one SM of an sm80+ GPU keeps resident: a bound on FA2's occupancy.
_MAX_BLOCKS_PER_SM = 32
# FA2's largest query tile: the fewest thread blocks a launch can have.
_FA2_MAX_CTA_TILE_Q = 128


@functools.cache
def _sm_count(device: torch.device) -> int:
    """The device's SM count (looked up once per device, not per call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_kv_workspace(variant: str, q: Tensor, k: Tensor, fold: bool, size: int) -> Tensor:
    """The ``tmp`` buffer of FlashInfer's single prefill: FA2 writes partial results there when it
    splits the keys over several thread blocks (``partition_kv``), which it does only when the
    launch has too few blocks to fill the GPU; the sm90 (fa3) kernel never reads it. A null
    ``tmp`` (an empty tensor) turns the split off, so the 32 MB FlashInfer allocates per call is
    allocated only where a split can happen: it sits on the attention's peak, in every layer."""
    if variant == "fa2":
        heads_q, heads_kv = q.shape[1] * (q.shape[0] if fold else 1), k.shape[1] * (k.shape[0] if fold else 1)
        packed_rows = q.shape[2] * (heads_q // heads_kv)
        fewest_blocks = heads_kv * -(-packed_rows // _FA2_MAX_CTA_TILE_Q)
        resident = _MAX_BLOCKS_PER_SM * _sm_count(q.device)
        if 2 * fewest_blocks <= resident:  # FlashInfer splits when at least two chunks fit
            return torch.empty(size, dtype=torch.uint8, device=q.device)
    return torch.empty(0, dtype=torch.uint8, device=q.device)


def _flashinfer(variant: str) -> Callable[..., Tensor]:
    def run(q: Tensor, k: Tensor, v: Tensor, scale: float, out_layout: str) -> Tensor:
        flashinfer, _ = _flashinfer_import()
        utils = flashinfer.utils
        out = _empty_output(q, k, v, out_layout)
        q, k, v = (x if _tma_ready(x) else x.contiguous() for x in (q, k, v))
        target, fold = out, _nhd_plan(q, k, v, out, variant)
        if fold is None:  # computed as [B, S, H, Dv] rows, then copied into the layout
            B, H, S, Dv = out.shape
            target = torch.empty((B, S, H, Dv), dtype=out.dtype, device=out.device).transpose(1, 2)
            fold = _nhd_plan(q, k, v, target, variant)
        module = _prefill_module(variant, q.dtype, q.shape[-1], v.shape[-1])
        tmp = _split_kv_workspace(variant, q, k, fold, utils.SINGLE_KERNEL_TMP_SIZE)
        for qb, kb, vb, ob in zip(*(_nhd_views(x, fold) for x in (q, k, v, target))):
            module.run(
                q=qb, k=kb, v=vb, tmp=tmp, o=ob, maybe_lse=None,
                mask_mode=utils.MaskMode.NON_CAUSAL.value, layout=utils.TensorLayout.NHD.value,
                window_left=-1, maybe_packed_custom_mask=None, maybe_alibi_slopes=None,
                logits_soft_cap=0.0, sm_scale=scale, scale_q=None, scale_k=None, scale_v=None,
                rope_scale=1.0, rope_theta=1e4,  # no RoPE inside the kernel (pos_encoding_mode NONE)
            )
        return out if target is out else out.copy_(target)

    return run


_CUDA_KERNELS: dict[str, Callable[..., Tensor]] = {
    "sdpa_flash": _sdpa_flash,
    "sdpa_efficient": _sdpa_efficient,
    "sdpa_cudnn": _sdpa_cudnn,
    "flashinfer_fa3": _flashinfer("fa3"),
    "flashinfer_fa2": _flashinfer("fa2"),
}


# --- registration ----------------------------------------------------------------------


_REGISTER = first_definition("attention")
_library = LIBRARY
if _REGISTER:
    _library.define("attention" + ATTENTION_SCHEMA, tags=(torch.Tag.needs_exact_strides,))


def _attention_cpu(q: Tensor, k: Tensor, v: Tensor, *, scale: float, backend: str, out_layout: str) -> Tensor:
    _check_backend(backend)
    return _in_layout(attention_reference(q, k, v, scale), q, k, v, out_layout)


def _attention_cuda(q: Tensor, k: Tensor, v: Tensor, *, scale: float, backend: str, out_layout: str) -> Tensor:
    _check_backend(backend)
    return _CUDA_KERNELS[backend](q, k, v, scale, out_layout)


def _attention_fake(q: Tensor, k: Tensor, v: Tensor, *, scale: float, backend: str, out_layout: str) -> Tensor:
    check_attention_args(q, k, v)
    _check_backend(backend)
    stock = _stock_output(q, k, v, out_layout)
    return q.new_empty_strided(stock.shape, stock.stride())


if _REGISTER:
    _library.impl("attention", _attention_cpu, "CPU")
    _library.impl("attention", _attention_cuda, "CUDA")
    torch.library.register_fake("diffopt::attention", _attention_fake, lib=_library)
