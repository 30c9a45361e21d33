"""backend="diffopt" with Inductor on the tiny stock models: the rewrites fire and results match eager."""
import copy

import pytest
import torch

import diffopt
from diffopt.models import get_config
from diffopt.testing import cast_floats, tiny_cosmos3, tiny_diffusers_wan, tiny_wan


def diffusers_cosmos3_layer(dtype):
    pytest.importorskip("diffusers")
    from diffopt.models.diffusers_models import build_diffusers_cosmos3_layer, diffusers_cosmos3_layer_inputs

    config = get_config("cosmos3-tiny")
    return build_diffusers_cosmos3_layer(config), diffusers_cosmos3_layer_inputs(config, dtype=dtype), {}


# model -> {pass: matches} for one layer
EXPECTED = {
    tiny_wan: {"qk_norm_rope": 1},
    tiny_cosmos3: {"qk_norm_rope": 1, "split_contiguous": 3},
    tiny_diffusers_wan: {"qk_norm_rope": 1},
    diffusers_cosmos3_layer: {"qk_norm_rope": 2},  # understanding and generation pathways
}


def _max_error(got, want):
    if isinstance(got, (list, tuple)):
        return max(_max_error(g, w) for g, w in zip(got, want))
    return (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("build", list(EXPECTED), ids=lambda f: f.__name__)
@torch.no_grad()
def test_compiled_matches_eager(build, dtype):
    model, args, kwargs = build(dtype)
    model = model.to(dtype).eval()
    # qk_norm_rope fires on CUDA by default; on for CPU here to check it on these models.
    options = {"strict": True, "passes": {"qk_norm_rope": {"devices": ["cpu", "cuda"]}}}
    report = diffopt.explain(model, *args, options=options, **kwargs)
    for pass_name, count in EXPECTED[build].items():
        assert report.matches(pass_name) == count, (pass_name, str(report))
    stock = model(*args, **kwargs)
    exact = copy.deepcopy(model).double()(*cast_floats(args, torch.float64), **cast_floats(kwargs, torch.float64))
    ours, theirs = _max_error(report.output, exact), _max_error(stock, exact)
    if dtype == torch.float32:
        assert ours <= 1e-4 + 2 * theirs, (ours, theirs)
    else:  # no worse than the stock code in the same dtype, up to bf16 rounding noise
        assert ours <= 2 * theirs + 2e-2, (ours, theirs)
