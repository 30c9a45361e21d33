"""``torch.ops.diffopt.attention`` and the ``attention`` pass (measured choice of the SDPA kernel).

CPU (CI): the op's reference against ``F.scaled_dot_product_attention`` and float64 on random
shapes, layouts, GQA ratios, cross-attention and scales; its output layout against the stock ops';
the pass on the stock forms (a plain module, our Wan and Cosmos3 references, diffusers' Wan), its
near-misses, and the selection logic driven by injected timings (real CPU timing never decides a
test). GPU (``@pytest.mark.gpu``): every installed backend against SDPA at the real shapes, batch 1
and 2, and the pass under CUDA graphs.
"""
from __future__ import annotations

import contextlib
import copy
import enum
import functools
import math
import statistics
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffopt
from diffopt import autotune
from diffopt.kernels import attention as kernels
from diffopt.kernels.attention import attention_reference
from diffopt.testing import cast_floats, count_ops, tiny_cosmos3, tiny_diffusers_wan, tiny_wan, trace

OP = torch.ops.diffopt.attention
OP_NAME = "diffopt.attention.default"
aten = torch.ops.aten
gpu = pytest.mark.gpu
BF16, F32 = torch.bfloat16, torch.float32
STOCK_OPS = {
    "flash": aten._scaled_dot_product_flash_attention.default,
    "efficient": aten._scaled_dot_product_efficient_attention.default,
    "cudnn": aten._scaled_dot_product_cudnn_attention.default,
    "flash_cpu": aten._scaled_dot_product_flash_attention_for_cpu.default,
}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test measures into its own cache file."""
    monkeypatch.setenv("DIFFOPT_CACHE_DIR", str(tmp_path / "diffopt-cache"))


def make_qkv(B, Hq, Hkv, Sq, Skv, D, layout, dtype=F32, device="cpu", seed=0):
    """q [B,Hq,Sq,D], k/v [B,Hkv,Skv,D] in one of the layouts stock models hand SDPA:
    "bhsd" contiguous; "bshd" the transpose of contiguous [B,S,H,D]; "packed" head slices of one
    packed projection (q|k|v when Sq == Skv, else q apart and k|v packed)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if layout == "bhsd":
        return randn(B, Hq, Sq, D), randn(B, Hkv, Skv, D), randn(B, Hkv, Skv, D)
    if layout == "bshd":
        return (randn(B, Sq, Hq, D).transpose(1, 2), randn(B, Skv, Hkv, D).transpose(1, 2),
                randn(B, Skv, Hkv, D).transpose(1, 2))
    if Sq == Skv:
        qkv = randn(B, Sq, Hq + 2 * Hkv, D)
        q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    else:
        kv = randn(B, Skv, 2 * Hkv, D)
        q, k, v = randn(B, Sq, Hq, D), kv[:, :, :Hkv], kv[:, :, Hkv:]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def sdpa(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# --- the op -----------------------------------------------------------------------------


@st.composite
def cases(draw):
    Hkv = draw(st.sampled_from([1, 2, 3]))
    return dict(
        B=draw(st.integers(1, 2)), Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4])),
        Sq=draw(st.integers(1, 40)), Skv=draw(st.sampled_from([None, 1, 7, 33])), D=draw(st.sampled_from([8, 16, 64])),
        layout=draw(st.sampled_from(["bhsd", "bshd", "packed"])), scale=draw(st.sampled_from([None, 0.3, 1.7])),
        dtype=draw(st.sampled_from([F32, BF16])), seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cases())
def test_reference_is_sdpa(case):
    case = dict(case)
    scale, dtype, seed = case.pop("scale"), case.pop("dtype"), case.pop("seed")
    case["Skv"] = case["Skv"] or case["Sq"]  # None: self-attention
    q, k, v = make_qkv(**case, dtype=dtype, seed=seed)
    used_scale = 1 / math.sqrt(case["D"]) if scale is None else scale
    out = OP(q, k, v, scale=used_scale, backend="flashinfer_fa3", out_layout="flash_cpu")  # CPU: the reference
    truth = sdpa(q.double(), k.double(), v.double(), scale)
    error = (out.double() - truth).abs()
    if dtype == F32:
        assert error.max() <= 1e-5 * truth.abs().max()
    else:  # computed in fp32, rounded once: within half a bf16 ulp (plus fp32 noise) of the truth
        assert (error <= 2**-8 * truth.abs() + 1e-5 * truth.abs().max()).all()
        stock_error = (sdpa(q, k, v, scale).double() - truth).abs().max()
        assert error.max() <= stock_error + 1e-6
    torch.testing.assert_close(attention_reference(q, k, v, used_scale), sdpa(q, k, v, scale), rtol=2e-2 if dtype == BF16 else 1e-5, atol=2e-2 if dtype == BF16 else 1e-5)


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "packed"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("out_layout", list(STOCK_OPS))
def test_output_has_the_stock_ops_layout(layout, cross, out_layout):
    q, k, v = make_qkv(2, 4, 2, 6, 9 if cross else 6, 16, layout)
    meta = [torch.empty_strided(x.shape, x.stride(), device="meta") for x in (q, k, v)]
    args = (None, False) if out_layout in ("efficient", "cudnn") else ()
    expected = STOCK_OPS[out_layout](*meta, *args)[0]
    out = OP(q, k, v, scale=0.25, backend="sdpa_cudnn", out_layout=out_layout)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = OP(*(mode.from_tensor(x) for x in (q, k, v)), scale=0.25, backend="sdpa_cudnn", out_layout=out_layout)
    assert fake.stride() == expected.stride()
    if out_layout == "flash_cpu":  # and the real stock kernel's
        assert out.stride() == STOCK_OPS["flash_cpu"](q, k, v)[0].stride()


def test_op_rejects_what_it_does_not_compute():
    q, k, v = make_qkv(1, 3, 2, 4, 4, 8, "bhsd")
    with pytest.raises(ValueError, match="divide"):
        OP(q, k, v, scale=1.0, backend="sdpa_flash", out_layout="flash")
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, "bhsd")
    with pytest.raises(ValueError, match="unknown backend"):
        OP(q, k, v, scale=1.0, backend="math", out_layout="flash")
    with pytest.raises(ValueError, match="unknown out_layout"):
        OP(q, k, v, scale=1.0, backend="sdpa_flash", out_layout="bshd")


def test_opcheck():
    q, k, v = make_qkv(2, 4, 2, 5, 7, 16, "packed")
    torch.library.opcheck(OP, (q, k, v), {"scale": 0.3, "backend": "sdpa_flash", "out_layout": "flash_cpu"})


def test_backends_that_cannot_run_say_why():
    cpu = torch.device("cpu")
    assert kernels.backend_unavailable("sdpa_flash", cpu) is None
    if kernels.flashinfer_version() is None:
        assert "not installed" in kernels.backend_unavailable("flashinfer_fa3", cpu)
    assert "float16/bfloat16 only" in kernels.backend_unsupported("flashinfer_fa3", F32, 128, 128, False)
    assert "head dims" in kernels.backend_unsupported("flashinfer_fa2", BF16, 96, 96, False)
    assert kernels.backend_unsupported("sdpa_efficient", F32, 96, 96, False) is None
    assert "grouped" in kernels.backend_unsupported("sdpa_efficient", F32, 96, 96, True)
    assert kernels.backend_unsupported("flashinfer_fa3", BF16, 128, 128, True) is None
    assert "float16/bfloat16" in kernels.backend_unsupported("sdpa_flash", torch.float64, 64, 64, False)


class FakeFlashInfer:
    """FlashInfer's single-prefill module as the op calls it, in plain torch, with the kernels'
    contracts: [S, H, D] NHD views with a dense last dim, query head j reads key/value head
    j // (Hq / Hkv), 16-byte aligned operands, and for fa2 a contiguous output."""

    class utils:
        SINGLE_KERNEL_TMP_SIZE = 16

        class PosEncodingMode(enum.Enum):
            NONE = 0

        class MaskMode(enum.Enum):
            NON_CAUSAL = 0

        class TensorLayout(enum.Enum):
            NHD = 0

    def __init__(self):
        self.calls = []
        self.built = set()  # (variant, *args) of the kernels on "disk"
        self.prefill = self

    def gen_single_prefill_module(self, variant, *args):
        return types.SimpleNamespace(is_compiled=(variant, *args) in self.built)

    def get_single_prefill_module(self, variant, *args):
        fake = self
        self.built.add((variant, *args))

        class Module:
            def run(self, *, q, k, v, tmp, o, maybe_lse, mask_mode, layout, window_left, maybe_packed_custom_mask,
                    maybe_alibi_slopes, logits_soft_cap, sm_scale, scale_q, scale_k, scale_v, rope_scale, rope_theta):
                assert (mask_mode, layout, window_left, maybe_lse, logits_soft_cap) == (0, 0, -1, None, 0.0)
                for x in (q, k, v, o):
                    assert x.dim() == 3 and x.stride(-1) == 1 and x.data_ptr() % 16 == 0
                assert variant == "fa3" or o.is_contiguous(), "fa2 writes contiguous rows only"
                # fa3 never reads the split-kv workspace; fa2 gets it where it can split (these shapes)
                assert tmp.numel() == (0 if variant == "fa3" else fake.utils.SINGLE_KERNEL_TMP_SIZE)
                fake.calls.append((variant, tuple(q.shape)))
                heads = [attention_reference(q[:, j, None].transpose(0, 1)[None], k[:, j * k.shape[1] // q.shape[1], None]
                                             .transpose(0, 1)[None], v[:, j * k.shape[1] // q.shape[1], None]
                                             .transpose(0, 1)[None], sm_scale)[0, 0] for j in range(q.shape[1])]
                o.copy_(torch.stack(heads, 1))

        return Module()


@pytest.mark.parametrize(
    "variant, B, Hq, Hkv, S, workspace",
    [
        ("fa3", 1, 12, 12, 64, False),  # the sm90 kernel never reads it
        ("fa2", 1, 12, 12, 64, True),  # 12 blocks: FlashInfer splits the keys
        ("fa2", 1, 12, 12, 32760, False),  # Wan 1.3B 480p: 3072 blocks fill 132 SMs
        ("fa2", 1, 32, 8, 28520, False),  # Cosmos3, grouped: 8 x 892 blocks
        ("fa2", 2, 12, 12, 2000, True),  # batch folded into 24 heads, 16 blocks each: 384, a split fits
    ],
)
def test_split_kv_workspace_only_where_flashinfer_can_split(monkeypatch, variant, B, Hq, Hkv, S, workspace):
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    q = torch.empty(B, Hq, S, 128, device="meta", dtype=BF16)
    k = torch.empty(B, Hkv, S, 128, device="meta", dtype=BF16)
    tmp = kernels._split_kv_workspace(variant, q, k, True, 1 << 25)
    assert tmp.numel() == (1 << 25 if workspace else 0)


@pytest.mark.parametrize("variant", ["fa3", "fa2"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "packed"])
@pytest.mark.parametrize("out_layout", ["cudnn", "efficient", "flash"])
@pytest.mark.parametrize("B, Hq, Hkv, Skv", [(1, 4, 4, 6), (2, 4, 2, 6), (2, 6, 3, 9)], ids=["b1", "b2-gqa", "b2-gqa-cross"])
def test_flashinfer_calls_mean_the_right_thing(monkeypatch, variant, layout, out_layout, B, Hq, Hkv, Skv):
    fake = FakeFlashInfer()
    monkeypatch.setattr(kernels, "_flashinfer_import", lambda: (fake, None))
    monkeypatch.setattr(kernels, "_prefill_module", kernels._prefill_module.__wrapped__)
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    q, k, v = make_qkv(B, Hq, Hkv, 6, Skv, 16, layout, dtype=BF16)
    run = kernels._CUDA_KERNELS[f"flashinfer_{variant}"]  # the CUDA implementation, on CPU tensors
    out = run(q, k, v, 0.3, out_layout)
    assert out.stride() == OP(q, k, v, scale=0.3, backend="sdpa_flash", out_layout=out_layout).stride()
    assert autotune.mismatch(out, sdpa(q, k, v, 0.3)) is None
    # One call when the batch folds into the heads: every operand [B, H, S, D]-contiguous, which
    # fa2 cannot write (its rows would not be contiguous) and efficient's [B, S, H, D] output is not.
    folds = B == 1 or (variant == "fa3" and layout == "bhsd" and out_layout != "efficient")
    assert len(fake.calls) == (1 if folds else B)


def test_flashinfer_build_warns_once_per_machine(monkeypatch, caplog):
    fake = FakeFlashInfer()
    monkeypatch.setattr(kernels, "_flashinfer_import", lambda: (fake, None))
    monkeypatch.setattr(kernels, "_prefill_module", kernels._prefill_module.__wrapped__)  # no per-process cache
    q, k, v = make_qkv(1, 2, 2, 4, 4, 16, "bshd", dtype=BF16)
    for process in ("first", "second"):  # the first builds the kernel, the second finds it on disk
        caplog.clear()
        with caplog.at_level("INFO", logger="diffopt"):
            kernels._CUDA_KERNELS["flashinfer_fa3"](q, k, v, 0.25, "cudnn")
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
        assert any("FlashInfer fa3 attention kernel (bfloat16, head_dim 16) ready in" in m for m in infos), infos
        if process == "first":
            assert len(warnings) == 1 and "building FlashInfer fa3 attention kernel (bfloat16, head_dim 16)" in warnings[0]
            assert "python -m diffopt.prebuild" in warnings[0]
        else:
            assert warnings == []


def test_prebuild_builds_each_kernel_the_pass_may_measure(monkeypatch):
    fake = FakeFlashInfer()
    monkeypatch.setattr(kernels, "_flashinfer_import", lambda: (fake, None))
    monkeypatch.setattr(kernels, "_prefill_module", kernels._prefill_module.__wrapped__)
    cpu = torch.device("cpu")  # both FlashInfer backends count as available off CUDA
    records = list(kernels.prebuild([BF16, torch.float16], [128, 96], cpu))
    by_kernel = {r["kernel"]: r for r in records}
    assert len(records) == 8
    for variant in ("fa3", "fa2"):
        for dtype in ("bfloat16", "float16"):
            built = by_kernel[f"FlashInfer {variant} attention kernel ({dtype}, head_dim 128)"]
            assert built["built_before"] is False and built["seconds"] >= 0 and "error" not in built
            assert "head dims" in by_kernel[f"FlashInfer {variant} attention kernel ({dtype}, head_dim 96)"]["skipped"]
    assert len(fake.built) == 4
    again = list(kernels.prebuild([BF16], [128], cpu))
    assert [r["built_before"] for r in again] == [True, True]


def test_prebuild_reports_a_kernel_that_fails_and_builds_the_rest(monkeypatch):
    fake = FakeFlashInfer()
    real_get = fake.get_single_prefill_module

    def get(variant, *args):
        if variant == "fa3":
            raise RuntimeError("nvcc: out of memory\nmore")
        return real_get(variant, *args)

    fake.get_single_prefill_module = get
    monkeypatch.setattr(kernels, "_flashinfer_import", lambda: (fake, None))
    monkeypatch.setattr(kernels, "_prefill_module", kernels._prefill_module.__wrapped__)
    records = list(kernels.prebuild([BF16], [64], torch.device("cpu")))
    assert records[0]["error"].startswith("RuntimeError: nvcc: out of memory")
    assert "error" not in records[1] and records[1]["kernel"].startswith("FlashInfer fa2")


def test_prebuild_command_without_a_gpu_says_so(capsys):
    from diffopt import prebuild

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert prebuild.main(["--head-dim", "64"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def _pretend_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_prebuild_command_builds_what_this_gpu_would_measure(monkeypatch, capsys):
    from diffopt import prebuild

    fake = FakeFlashInfer()
    monkeypatch.setattr(kernels, "_flashinfer_import", lambda: (fake, None))
    monkeypatch.setattr(kernels, "_prefill_module", kernels._prefill_module.__wrapped__)
    _pretend_gpu(monkeypatch, (8, 0))  # an A100: no fa3
    assert prebuild.main(["--head-dim", "128", "96"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "FlashInfer fa3 attention kernel (bfloat16, head_dim 128): skipped (fa3 runs on sm90 (Hopper) only, this GPU is sm80)"
    assert lines[2].startswith("FlashInfer fa2 attention kernel (bfloat16, head_dim 128): built in ")
    assert lines[3].startswith("FlashInfer fa2 attention kernel (bfloat16, head_dim 96): skipped (head dims 64/128/256 only")
    assert [variant for variant, *_ in fake.built] == ["fa2"]
    _pretend_gpu(monkeypatch, (9, 0))
    assert prebuild.main([]) == 0
    fa3, fa2 = capsys.readouterr().out.splitlines()
    assert fa3.startswith("FlashInfer fa3 attention kernel (bfloat16, head_dim 128): built in ")
    assert fa2.startswith("FlashInfer fa2 attention kernel (bfloat16, head_dim 128): on disk before, ready in ")


def test_prebuild_command_without_flashinfer_has_nothing_to_build(monkeypatch, capsys):
    from diffopt import prebuild

    monkeypatch.setattr(kernels, "_flashinfer_import", lambda: (None, "FlashInfer is not installed (pip install flashinfer-python)"))
    _pretend_gpu(monkeypatch, (9, 0))
    assert prebuild.main([]) == 0
    assert capsys.readouterr().out.strip() == "diffopt.prebuild: nothing to build: FlashInfer is not installed (pip install flashinfer-python)"


# --- the pass ---------------------------------------------------------------------------


class Timer:
    """An injected timer: fixed milliseconds per candidate; a name not listed fails to time."""

    def __init__(self, **times_ms):
        self.times_ms = times_ms
        self.calls: list[str] = []

    def __call__(self, fn, name):
        self.calls.append(name)
        fn()
        return self.times_ms[name]


def options(timer=None, inductor=False, **config):
    config = {"devices": ("cpu",), **({"timer": timer} if timer else {}), **config}
    return {"inductor": inductor, "passes": {"attention": config}}


def bshd_attention(x, context):
    """A stock attention call: heads split from projections, transposed to [B, H, S, D]."""
    q = x.unflatten(-1, (4, 64)).transpose(1, 2)
    kv = context.unflatten(-1, (2, 4, 64))
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # strided head slices of packed k|v
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def gqa_attention(x, context):
    """The same with 2 key/value heads for 4 query heads."""
    q = x.unflatten(-1, (4, 64)).transpose(1, 2)
    kv = context[..., :256].unflatten(-1, (2, 2, 64))
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).flatten(2)


def attention_inputs(dtype=F32, Skv=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 12, 256, generator=g).to(dtype), torch.randn(2, Skv, 512, generator=g).to(dtype)


def stock_ops(graph):
    return sum(n for name, n in count_ops(graph).items() if "scaled_dot_product" in name)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_fires_on_stock_attention_and_keeps_numerics(dtype, inductor):
    args = attention_inputs(dtype)
    timer = Timer(stock=2.0, sdpa_efficient=1.0, sdpa_flash=0.5)  # flash: bf16 only
    t = trace(bshd_attention, *args, options=options(timer, inductor))
    before, after = t.before("attention"), t.after("attention")
    assert stock_ops(before) == 1 and count_ops(before)[OP_NAME] == 0
    assert stock_ops(after) == 0 and count_ops(after)[OP_NAME] == 1
    chosen = "sdpa_flash" if dtype == BF16 else "sdpa_efficient"
    assert _choice(t.report) == chosen and t.report.matches("attention") == 1
    truth = bshd_attention(*(a.double() for a in args))
    stock = bshd_attention(*args)
    ours, theirs = (t.output.double() - truth).abs().max(), (stock.double() - truth).abs().max()
    assert ours <= theirs + (1e-6 if dtype == F32 else 2**-8 * truth.abs().max())


def test_grouped_query_attention():
    args = attention_inputs(BF16)
    t = trace(gqa_attention, *args, options=options(Timer(stock=2.0, sdpa_flash=1.0, sdpa_cudnn=1.5)))
    assert _choice(t.report) == "sdpa_flash"
    torch.testing.assert_close(t.output, gqa_attention(*args), atol=2e-2, rtol=2e-2)
    # fp32: only sdpa_efficient takes it, and not with grouped heads
    t = trace(gqa_attention, *attention_inputs(F32), options=options(Timer(stock=2.0, sdpa_efficient=1.0)))
    assert t.report.matches("attention") == 0
    assert any("sdpa_efficient: no grouped-query attention" in note for note in _notes(t.report))


def test_symbolic_batch_and_sequence():
    timer = Timer(stock=2.0, sdpa_efficient=1.0)
    t = trace(bshd_attention, *attention_inputs(Skv=9), options=options(timer), dynamic=True)
    assert t.report.matches("attention") == 1
    torch.testing.assert_close(t.output, bshd_attention(*attention_inputs(Skv=9)))


def test_the_ops_layout_is_the_stock_nodes():
    t = trace(bshd_attention, *attention_inputs(), options=options(Timer(stock=2.0, sdpa_efficient=1.0)))
    (stock,) = [n for n in t.before("attention").nodes if "scaled_dot_product" in str(n.target)]
    (ours,) = [n for n in t.after("attention").nodes if n.target is OP.default]
    assert ours.meta["val"].shape == stock.meta["val"][0].shape
    assert ours.meta["val"].stride() == stock.meta["val"][0].stride()


def _first(output):
    return output[0] if isinstance(output, (list, tuple)) else output


# model -> attention calls in one layer (Wan: self + cross; Cosmos3 generation: GQA over prefix + own tokens)
MODELS = {tiny_wan: 2, tiny_cosmos3: 1, tiny_diffusers_wan: 2}
GROUPED = {tiny_cosmos3}  # in fp32 no candidate takes grouped-query attention


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("build", list(MODELS), ids=lambda f: f.__name__)
@torch.no_grad()
def test_fires_on_models_with_inductor(build, dtype):
    model, args, kwargs = build(dtype)
    model = model.to(dtype).eval()
    timer = Timer(stock=3.0, sdpa_efficient=2.0, sdpa_flash=1.0)
    report = diffopt.explain(model, *args, options={"strict": True, **options(timer, inductor=True)}, **kwargs)
    expected = 0 if dtype == F32 and build in GROUPED else MODELS[build]
    assert report.matches("attention") == expected, str(report)
    exact = copy.deepcopy(model).double()(*cast_floats(args, torch.float64), **cast_floats(kwargs, torch.float64))
    stock = model(*args, **kwargs)
    ours = (_first(report.output).double() - _first(exact)).abs().max()
    theirs = (_first(stock).double() - _first(exact)).abs().max()
    assert ours <= (1e-4 + 2 * theirs if dtype == F32 else 2 * theirs + 2e-2), (ours, theirs)


def _notes(report):
    """What the pass said about each attention call: the rewrites (with the measurements) and the
    declines (why the call stayed stock)."""
    return (
        [r.by for r in report.rewrites if r.pass_name == "attention"]
        + [d.reason for d in report.declines if d.pass_name == "attention"]
        + [run.note for run in report.runs if run.pass_name == "attention" and run.note]  # e.g. off on this device
    )


@pytest.mark.parametrize(
    "fn, why",
    [
        (lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), "causal"),
        (lambda q: F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5).tril()), "attention mask"),
        (lambda q: F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool).tril()),
         "attention mask"),
    ],
    ids=["causal", "float mask", "bool mask"],
)
def test_does_not_fire_on_masks(fn, why):
    q = torch.randn(1, 2, 5, 16)
    t = trace(fn, q, options=options(Timer(stock=2.0, sdpa_efficient=1.0)))
    assert t.report.matches("attention") == 0 and stock_ops(t.after("attention")) == 1
    assert any(why in note for note in _notes(t.report)), _notes(t.report)
    torch.testing.assert_close(t.output, fn(q))


def test_does_not_fire_on_dropout():
    # SDPA takes its math path for dropout: post-grad there is no fused op (and no candidate
    # would be allowed to replace it).
    q = torch.randn(1, 2, 5, 16)
    t = trace(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), q,
              options=options(Timer(stock=2.0, sdpa_efficient=1.0)))
    assert t.report.matches("attention") == 0 and count_ops(t.after("attention"))[OP_NAME] == 0


def test_does_not_fire_on_fp64():
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    t = trace(lambda q: F.scaled_dot_product_attention(q, q, q), q, options=options(Timer(stock=2.0, sdpa_efficient=1.0)))
    assert t.report.matches("attention") == 0
    assert any("no candidate" in note for note in _notes(t.report))


def test_does_not_fire_when_the_logsumexp_is_used():
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    t = trace(lambda q: F.scaled_dot_product_attention(q, q, q), q, options=options(Timer(stock=2.0, sdpa_efficient=1.0)))
    assert t.report.matches("attention") == 0
    assert any("logsumexp" in note for note in _notes(t.report)), _notes(t.report)


def test_off_the_listed_devices_it_stays_stock_and_says_why():
    t = trace(bshd_attention, *attention_inputs(), options={"inductor": False})  # devices: CUDA only
    assert t.report.matches("attention") == 0
    assert any("on cpu" in note and "devices" in note for note in _notes(t.report))


def test_without_a_timer_off_cuda_nothing_is_measured():
    t = trace(bshd_attention, *attention_inputs(), options=options())
    assert t.report.matches("attention") == 0
    assert any("no timer for cpu" in note for note in _notes(t.report))


def test_pass_off():
    t = trace(bshd_attention, *attention_inputs(), options={"inductor": False, "passes": {"attention": False}})
    assert "attention" not in {run.pass_name for run in t.report.runs}
    assert stock_ops(t.graphs[-1][3]) == 1


def test_unknown_backend_option_is_an_error():
    from diffopt.options import Options
    from diffopt.pipeline import Pipeline, registered_passes

    with pytest.raises(ValueError, match="not one of"):
        Pipeline(Options.parse({"passes": {"attention": {"backend": "flashattention"}}}, registered_passes()))


# --- the choice -------------------------------------------------------------------------


def _choice(report):
    rewrites = [r.by for r in report.rewrites if r.pass_name == "attention"]
    return rewrites[0].removeprefix("diffopt.attention[").split("]")[0] if rewrites else None


def run_choice(timer, dtype=BF16, **config):
    t = trace(bshd_attention, *attention_inputs(dtype), options=options(timer, **config))
    return _choice(t.report), t


def test_fastest_candidate_wins():
    assert run_choice(Timer(stock=3.0, sdpa_efficient=1.0, sdpa_flash=2.0, sdpa_cudnn=1.5))[0] == "sdpa_efficient"
    autotune.cache_file().unlink()
    assert run_choice(Timer(stock=3.0, sdpa_efficient=2.0, sdpa_flash=1.0, sdpa_cudnn=1.5))[0] == "sdpa_flash"


def test_failing_candidates_are_never_chosen():
    # sdpa_flash fails to time (not in the table), sdpa_cudnn raises when run.
    timer = Timer(stock=3.0, sdpa_efficient=2.0, sdpa_cudnn=0.1)
    original = timer.__call__

    def raising(fn, name):
        if name == "sdpa_cudnn":
            raise RuntimeError("no kernel image for this GPU")
        return original(fn, name)

    choice, t = run_choice(raising)
    assert choice == "sdpa_efficient"
    (note,) = _notes(t.report)
    assert "sdpa_flash: failed (KeyError" in note and "sdpa_cudnn: failed (RuntimeError: no kernel image" in note


def test_no_room_to_measure_keeps_the_stock_call_and_caches_nothing(monkeypatch):
    from diffopt.fxpasses import attention as attention_pass

    def full_device(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 100.00 MiB")

    monkeypatch.setattr(attention_pass, "_real", full_device)
    timer = Timer(stock=3.0, sdpa_efficient=1.0)
    choice, t = run_choice(timer)  # strict: had the pass raised, this would too
    assert choice is None and timer.calls == [] and stock_ops(t.after("attention")) == 1
    assert any("stock: failed (OutOfMemoryError: CUDA out of memory" in note for note in _notes(t.report))
    assert not autotune.cache_file().exists()


def packed_attention(x):
    """q, k, v: head slices of one packed projection [B, S, 3 * H * D] (a fused qkv linear)."""
    qkv = x.unflatten(-1, (3, 4, 16))
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("build", [packed_attention, bshd_attention], ids=["qkv packed", "kv packed"])
def test_the_measurement_views_one_storage_where_the_call_does(monkeypatch, build):
    from diffopt.fxpasses import attention as attention_pass

    made = []
    real = attention_pass._real
    monkeypatch.setattr(attention_pass, "_real", lambda nodes, generator: made.append(real(nodes, generator)) or made[-1])
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(2, 9, 192, generator=g),) if build is packed_attention else attention_inputs()
    t = trace(build, *args, options=options(Timer(stock=2.0, sdpa_efficient=1.0, sdpa_flash=0.5)))
    assert _choice(t.report) == "sdpa_efficient"
    torch.testing.assert_close(t.output, build(*args))
    ((q, k, v),) = ([tensors[node] for node in tensors] for tensors in made)
    packed = args[-1]  # the tensor k and v (and q where packed) are views of
    assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.untyped_storage().nbytes() == packed.untyped_storage().nbytes()
    assert (q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()) == (build is packed_attention)
    for x, like in zip((q, k, v), _sdpa_inputs(monkeypatch, build, *args)):
        assert (x.shape, x.stride(), x.storage_offset()) == (like.shape, like.stride(), like.storage_offset())


def _sdpa_inputs(monkeypatch, build, *args):
    """q, k, v as ``build`` hands them to SDPA, in eager."""
    seen = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.extend((q, k, v))
        return original(q, k, v, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", spy)
        build(*args)
    return seen


def test_stock_stays_when_it_is_fastest():
    choice, t = run_choice(Timer(stock=1.0, sdpa_efficient=1.5, sdpa_flash=1.2, sdpa_cudnn=1.1))
    assert choice is None and stock_ops(t.after("attention")) == 1
    assert any("stock call kept" in note for note in _notes(t.report))
    autotune.cache_file().unlink()
    # a near-tie (within autotune.MIN_GAIN) keeps the stock call too
    assert run_choice(Timer(stock=1.0, sdpa_efficient=0.995, sdpa_flash=2.0, sdpa_cudnn=2.0))[0] is None


def test_a_candidate_that_computes_something_else_is_out():
    expected = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    with_nan = expected.clone()
    with_nan[1, 2, 3, 4] = float("nan")
    _, failures = autotune.check(lambda: expected, {
        "right": lambda: expected * (1 + torch.finfo(F32).eps),
        "wrong": lambda: expected.flip(1),
        "nan": lambda: with_nan,
        "shape": lambda: expected[:, :2],
    })
    assert set(failures) == {"wrong", "nan", "shape"}
    assert failures["wrong"].startswith("wrong result")


def _whole_output_mismatch(got, expected):
    """The comparison as a whole-tensor formula (the spec :func:`autotune.mismatch` slices)."""
    error = (got.double() - expected.double()).abs().max().item()
    tolerance = max(4 * torch.finfo(expected.dtype).eps, 2**-12) * expected.double().abs().max().item()
    return None if error <= tolerance else f"wrong result: max error {error:.3g} vs the stock call (tolerance {tolerance:.3g})"


@st.composite
def compared_outputs(draw):
    shape = draw(st.lists(st.integers(1, 7), min_size=1, max_size=4))
    order = draw(st.permutations(range(len(shape))))
    dtype = draw(st.sampled_from([F32, BF16]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    # stored in another dimension order, so the slices are strided views
    expected = torch.randn([shape[d] for d in order], generator=generator).to(dtype).permute(
        [order.index(d) for d in range(len(shape))])
    got = expected * (1 + draw(st.sampled_from([0.0, 1.0, 2.0])) * torch.finfo(dtype).eps)
    if draw(st.booleans()):  # the same values in the other layout: slices must pair by index, not storage order
        got = got.contiguous() if draw(st.booleans()) else got.transpose(0, -1).contiguous().transpose(0, -1)
    where = tuple(draw(st.integers(0, size - 1)) for size in shape)
    got[where] += draw(st.sampled_from([0.0, 1e-3, 0.5, float("nan")]))
    return got, expected, draw(st.integers(1, 40))


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(compared_outputs())
def test_the_sliced_comparison_decides_as_the_whole_one(monkeypatch, case):
    got, expected, chunk = case
    monkeypatch.setattr(autotune, "COMPARE_CHUNK", chunk)
    expected_why = _whole_output_mismatch(got, expected)
    assert autotune.mismatch(got, expected) == expected_why


def test_the_comparison_holds_no_whole_output_in_float64(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestFloat64(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in tree_leaves(out):
                if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
                    self.numel = max(self.numel, x.numel())
            return out

    monkeypatch.setattr(autotune, "COMPARE_CHUNK", 64)
    generator = torch.Generator().manual_seed(3)
    expected = torch.randn(2, 37, 3, 16, generator=generator).to(BF16).transpose(1, 2)  # a BHSD view of BSHD
    got = expected.contiguous()  # BHSD memory: the pair's slices are views in different layouts
    got[1, 2, 36, 15] += 1.0  # in the last slice
    with LargestFloat64() as mode:
        why = autotune.mismatch(got, expected)
    assert why is not None and why.startswith("wrong result")
    assert 0 < mode.numel <= 64


def test_empty_outputs_agree():
    assert autotune.mismatch(torch.empty(2, 0, 3), torch.empty(2, 0, 3)) is None


class FakeDevice:
    """A clock that each call of the timed function advances by the next of ``durations_ms``
    (cycling) and each flush by 0.25 ms, so a flush inside a timed window shows in the result.
    Events read the clock when recorded; reading one before a synchronize after its recording
    fails, as on a GPU. ``log`` keeps the order of flushes, calls and records."""

    FLUSH_MS = 0.25

    def __init__(self, durations_ms):
        self.durations_ms, self.now, self.calls, self.log = durations_ms, 0.0, 0, []
        self.steps = self.synced_at = 0  # a counter of device work, and its value at the last synchronize

    def fn(self):
        self.now += self.durations_ms[self.calls % len(self.durations_ms)]
        self.calls += 1
        self.steps += 1
        self.log.append("call")

    def flush(self):
        self.now += self.FLUSH_MS
        self.steps += 1
        self.log.append("flush")

    def synchronize(self):
        self.synced_at = self.steps

    def event(self):
        device = self

        class Event:
            def record(self):
                device.steps += 1
                self.at, self.step = device.now, device.steps
                device.log.append("record")

            def elapsed_time(self, end):
                assert device.synced_at >= max(self.step, end.step), "read before a synchronize"
                return end.at - self.at

        return Event()


@pytest.mark.parametrize("durations_ms", [[1.0], [1.0, 3.0, 2.0, 2.5, 7.0], [0.0]])
def test_median_ms_times_each_call_alone_after_a_flush(durations_ms):
    device = FakeDevice(durations_ms)
    got = autotune.median_ms(device.fn, device.flush, device.event, device.synchronize)
    duration = lambda i: durations_ms[i % len(durations_ms)]  # of the i-th call
    estimate = max(sum(device.FLUSH_MS + duration(1 + i) for i in range(5)) / 5, 1e-3)  # the estimate flushes too
    warmup = max(1, int(25 / estimate))
    timed = max(1, min(autotune.MAX_TIMED_CALLS, int(100 / estimate)))
    assert device.calls == 1 + 5 + warmup + timed
    assert timed > 10  # a median of many calls
    assert got == pytest.approx(statistics.median(duration(1 + 5 + warmup + i) for i in range(timed)))
    assert device.log[:13] == ["call", "record"] + ["flush", "call"] * 5 + ["record"]
    assert device.log[13:13 + warmup] == ["call"] * warmup
    assert device.log[13 + warmup:] == ["flush", "record", "call", "record"] * timed


def test_median_ms_of_fast_calls_times_many():
    # calls of a microsecond are timed MAX_TIMED_CALLS times, not 100 ms / 1 us (with a flush that costs nothing)
    device = FakeDevice([0.001])
    device.FLUSH_MS = 0.0
    assert autotune.median_ms(device.fn, device.flush, device.event, device.synchronize) == pytest.approx(0.001)
    assert device.log.count("record") == 2 + 2 * autotune.MAX_TIMED_CALLS


@pytest.mark.parametrize("l2_bytes, flush_bytes", [(50 << 20, 50 << 20), (0, 256 << 20)], ids=["L2", "unknown L2"])
def test_cuda_timer_flushes_with_a_buffer_of_the_l2s_size(monkeypatch, l2_bytes, flush_bytes):
    used = []

    def median_ms(fn, flush, event, synchronize):
        used.append((flush.__self__, event()))  # the buffer whose zero_ is the flush; one event
        return 1.5

    monkeypatch.setattr(autotune, "median_ms", median_ms)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(L2_cache_size=l2_bytes))
    monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: kwargs)
    assert autotune.cuda_timer(lambda: None, "stock") == 1.5
    ((buffer, event),) = used
    assert buffer.numel() * buffer.element_size() == flush_bytes
    assert event == {"enable_timing": True}


class FakeCurrentDevice:
    """``torch.cuda.device`` on a machine without CUDA: a stack of current devices."""

    def __init__(self, current):
        self.stack = [current]

    def __call__(self, device):
        stack = self.stack

        class Guard:
            def __enter__(self):
                stack.append(device)

            def __exit__(self, *exc):
                stack.pop()

        return Guard()


def test_a_call_is_measured_with_its_own_gpu_current(monkeypatch):
    # a model on cuda:1 while cuda:0 is current: cuda_timer's events and synchronize, and kernels
    # that launch on the current device's stream, must be cuda:1's
    guard = FakeCurrentDevice(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device", guard)
    seen = []

    def run(name):
        return lambda: seen.append((name, guard.stack[-1])) or torch.ones(3)

    def timer(fn, name):
        seen.append((f"timed {name}", guard.stack[-1]))
        return {"stock": 2.0, "fast": 1.0}[name]

    selection = autotune.select({"call": "on cuda:1"}, lambda: (run("stock"), {"fast": run("fast")}), timer,
                                "attention", torch.device("cuda", 1))
    assert selection.choice == "fast"
    assert {name for name, _ in seen} == {"stock", "fast", "timed stock", "timed fast"}
    assert all(device == torch.device("cuda", 1) for _, device in seen), seen
    assert guard.stack == [torch.device("cuda", 0)]  # cuda:0 is current again


def test_the_pass_measures_with_the_calls_device_current(monkeypatch):
    entered, inside = [], []
    on_device = autotune.on_device

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        with on_device(device):
            inside.append(True)
            yield
            inside.pop()

    monkeypatch.setattr(autotune, "on_device", recording)
    check = autotune.check
    monkeypatch.setattr(autotune, "check", lambda *runs: check(*runs) if inside else pytest.fail("checked outside"))

    class Guarded(Timer):
        def __call__(self, fn, name):
            assert inside, f"{name} timed outside the device guard"
            return super().__call__(fn, name)

    assert run_choice(Guarded(stock=3.0, sdpa_efficient=1.0, sdpa_flash=2.0, sdpa_cudnn=2.5))[0] == "sdpa_efficient"
    assert run_choice(Timer(), backend="sdpa_cudnn")[0] == "sdpa_cudnn"  # forced: checked, not timed
    assert entered == [torch.device("cpu")] * 2


def test_the_choice_is_cached_on_disk(tmp_path, monkeypatch):
    timer = Timer(stock=3.0, sdpa_efficient=1.0, sdpa_flash=2.0, sdpa_cudnn=2.5)
    assert run_choice(timer)[0] == "sdpa_efficient"
    assert set(timer.calls) == {"stock", "sdpa_efficient", "sdpa_flash", "sdpa_cudnn"}
    assert autotune.cache_file().is_file() and autotune.cache_file().parent == tmp_path / "diffopt-cache"
    # A second compile reads the choice: no timing at all, whatever the timer would say now.
    again = Timer(stock=3.0, sdpa_efficient=9.0, sdpa_flash=1.0, sdpa_cudnn=2.5)
    choice, t = run_choice(again)
    assert choice == "sdpa_efficient" and again.calls == []
    assert any("(cached)" in note for note in _notes(t.report))
    # New code measures again.
    from diffopt import graph_pass

    monkeypatch.setattr(graph_pass, "code_digest", lambda: "the kernels were edited")
    assert run_choice(again)[0] == "sdpa_flash" and again.calls


def test_calls_with_one_key_measure_once_per_graph():
    timer = Timer(stock=3.0, sdpa_efficient=1.0)

    def twice(x, context):
        return bshd_attention(x, context) + bshd_attention(x.cos(), context.sin())

    t = trace(twice, *attention_inputs(), options=options(timer))
    assert t.report.matches("attention") == 2 and timer.calls.count("stock") == 1


def test_forced_backend_is_not_timed():
    timer = Timer()
    choice, t = run_choice(timer, backend="sdpa_cudnn")
    assert choice == "sdpa_cudnn" and timer.calls == []
    # forced onto a dtype it does not take: stays stock, says why
    choice, t = run_choice(timer, dtype=F32, backend="sdpa_cudnn")
    assert choice is None and any("no candidate" in note for note in _notes(t.report))


def test_flashinfer_absent_takes_the_sdpa_path(monkeypatch):
    monkeypatch.setattr(kernels, "_flashinfer_import", lambda: (None, "FlashInfer is not installed (test)"))
    timer = Timer(stock=3.0, sdpa_efficient=2.0, flashinfer_fa3=0.1, flashinfer_fa2=0.2)
    choice, t = run_choice(timer)
    assert choice == "sdpa_efficient" and not any(name.startswith("flashinfer") for name in timer.calls)
    assert any("flashinfer_fa3, flashinfer_fa2: FlashInfer is not installed" in note for note in _notes(t.report))


def test_flashinfer_present_competes(monkeypatch):
    # On CPU the op runs its reference for every backend, so "installed" is enough to take part.
    monkeypatch.setattr(kernels, "_flashinfer_import", lambda: (object(), None))
    monkeypatch.setattr(kernels, "flashinfer_version", lambda: "0.7.2.post1")
    timer = Timer(stock=3.0, sdpa_efficient=2.0, flashinfer_fa3=0.5, flashinfer_fa2=0.7)
    assert run_choice(timer)[0] == "flashinfer_fa3"
    assert {"flashinfer_fa3", "flashinfer_fa2"} <= set(timer.calls)


# --- GPU ----------------------------------------------------------------------------------

# (name, B, Hq, Hkv, Sq, Skv, D)
REAL_SHAPES = [
    ("wan-1.3b-self", 1, 12, 12, 32760, 32760, 128),
    ("wan-1.3b-cross", 1, 12, 12, 32760, 512, 128),
    ("cosmos3-gen", 1, 32, 8, 28520, 29032, 128),
    ("image-1560", 1, 12, 12, 1560, 1560, 128),
    ("wan-1.3b-self-cfg", 2, 12, 12, 32760, 32760, 128),
    ("image-1560-cfg", 2, 12, 12, 1560, 1560, 128),
]


def _cuda_backends():
    if not torch.cuda.is_available():
        return []
    device = torch.device("cuda")
    return [b for b in kernels.BACKENDS if kernels.backend_unavailable(b, device) is None]


@gpu
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "packed"])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: s[0])
def test_gpu_backends_match_sdpa_at_real_shapes(shape, layout):
    _, B, Hq, Hkv, Sq, Skv, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Skv, D, layout, dtype=BF16, device="cuda")
    scale = 1 / math.sqrt(D)
    expected = sdpa(q, k, v)  # SDPA's default kernel (cuDNN on the H200)
    meta = [torch.empty_strided(x.shape, x.stride(), dtype=BF16, device="meta") for x in (q, k, v)]
    stock_layout = aten._scaled_dot_product_cudnn_attention.default(*meta, None, False)[0]
    failures = {}
    for backend in _cuda_backends():
        if kernels.backend_unsupported(backend, BF16, D, D, grouped=Hq != Hkv):
            continue
        try:
            out = OP(q, k, v, scale=scale, backend=backend, out_layout="cudnn")
        except RuntimeError as error:  # an SDPA kernel that does not take this problem (e.g. GQA)
            failures[backend] = str(error)[:200]
            continue
        why = autotune.mismatch(out, expected)
        assert why is None, (backend, why)
        assert out.stride() == stock_layout.stride(), backend
    assert not {b for b in failures if b.startswith("flashinfer")}, failures


@gpu
@pytest.mark.parametrize("backend", [b for b in kernels.BACKENDS if b.startswith("flashinfer")])
def test_gpu_flashinfer_under_cuda_graphs(backend):
    if backend not in _cuda_backends():
        pytest.skip(kernels.backend_unavailable(backend, torch.device("cuda")))
    g = torch.Generator().manual_seed(0)
    # S = 1560 attending over 512 tokens, 2 heads of 128, batch 2 (classifier-free guidance batched)
    x, context = (torch.randn(2, s, 256, generator=g).to("cuda", BF16) for s in (1560, 512))

    def stock(x, context):
        q = x.unflatten(-1, (2, 128)).transpose(1, 2)
        k, v = (t.unflatten(-1, (2, 128)).transpose(1, 2) for t in (context, context.flip(-1)))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    # torch.compile takes mode or options, not both: the backend gets both itself
    compiled = torch.compile(stock, backend=functools.partial(
        diffopt.diffopt_backend, mode="reduce-overhead",
        options={"strict": True, "passes": {"attention": {"backend": backend}}}))
    from torch._dynamo.utils import counters

    from diffopt.report import Report, collecting

    counters.clear()
    report = Report()
    with torch.no_grad(), collecting(report), torch._inductor.config.patch(fx_graph_cache=False):
        for step in range(3):  # warm-up, capture, replay
            got = compiled(x * (1 + step), context).clone()
            assert autotune.mismatch(got, stock(x * (1 + step), context)) is None
    assert _choice(report) == backend and report.matches("attention") == 1
    assert counters["inductor"]["cudagraph_skips"] == 0


@gpu
@torch.no_grad()
def test_gpu_pass_measures_and_matches_sdpa():
    x = torch.randn(1, 1560, 12 * 128, device="cuda", dtype=BF16)

    def stock(x):
        q = x.unflatten(-1, (12, 128)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q.flip(2), q * 0.5).transpose(1, 2).flatten(2)

    report = diffopt.explain(stock, x, options={"strict": True})
    (note,) = _notes(report)
    assert "stock" in note and "ms" in note, note  # measured on the GPU, whatever won
    assert autotune.mismatch(report.output, stock(x)) is None
