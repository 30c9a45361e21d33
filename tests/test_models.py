"""Reference models: shapes and dtypes, stock source forms, and numerics against float64
references and against the stock diffusers modules they mirror."""

import math

import pytest
import torch

from diffopt.models import (
    CONFIG_NAMES,
    Cosmos3Config,
    Cosmos3GenLayer,
    Cosmos3GenStack,
    DenoiseStep,
    FluxConfig,
    WanBlock,
    WanConfig,
    WanStack,
    apply_interleaved_rope,
    build_prefix_kv,
    cosmos3_example_inputs,
    denoise,
    get_config,
    increasing_positions,
    loop_example_inputs,
    make_timesteps,
    qwen3_rope_tables,
    rotate_half,
    wan_axis_dims,
    wan_example_inputs,
    wan_rope_tables,
)

WAN_TINY = get_config("wan-tiny")
COSMOS3_TINY = get_config("cosmos3-tiny")
DTYPES = [torch.float32, torch.bfloat16]
# Tolerances on outputs of unit-scale activations: bf16 keeps 8 bits of mantissa.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def _graph_targets(module, *inputs) -> list[str]:
    explanation = torch._dynamo.explain(module)(*inputs)
    assert explanation.graph_break_count == 0
    (graph,) = explanation.graphs
    return [getattr(node.target, "__name__", str(node.target)) for node in graph.graph.nodes]


# ---------------------------------------------------------------------------- configs


def test_real_configs_have_the_published_dims():
    wan_small = get_config("wan-1.3b")
    assert (wan_small.dim, wan_small.num_heads, wan_small.head_dim, wan_small.ffn_dim) == (1536, 12, 128, 8960)
    assert (wan_small.eps, wan_small.text_len, wan_small.num_layers) == (1e-6, 512, 30)
    wan_large = get_config("wan-14b")
    assert (wan_large.dim, wan_large.num_heads, wan_large.head_dim, wan_large.ffn_dim) == (5120, 40, 128, 13824)
    assert wan_large.num_layers == 40
    # 480x832, 81 frames -> latent 21x60x104 -> patches (1, 2, 2) -> 32760 tokens.
    for wan in (wan_small, wan_large):
        assert wan.rope_grid == (21, 30, 52)
        assert wan.seq_len == 32760
    cosmos3 = get_config("cosmos3")
    assert (cosmos3.hidden_size, cosmos3.num_heads, cosmos3.num_kv_heads, cosmos3.head_dim) == (4096, 32, 8, 128)
    assert (cosmos3.intermediate_size, cosmos3.eps, cosmos3.num_layers) == (12288, 1e-6, 36)
    assert (cosmos3.gen_seq_len, cosmos3.prefix_len) == (28520, 512)


def test_tiny_configs_keep_the_architectural_features():
    assert isinstance(WAN_TINY, WanConfig) and isinstance(COSMOS3_TINY, Cosmos3Config)
    assert COSMOS3_TINY.num_kv_heads < COSMOS3_TINY.num_heads  # GQA
    assert WAN_TINY.head_dim in (16, 32) and COSMOS3_TINY.head_dim in (16, 32)
    assert all(1 < size for size in WAN_TINY.rope_grid)  # all three RoPE axes vary
    assert WAN_TINY.seq_len < 100 and COSMOS3_TINY.gen_seq_len < 100


def test_get_config_overrides_layers_and_rejects_unknown_names():
    assert set(CONFIG_NAMES) == {
        "wan-tiny", "wan-1.3b", "wan-14b", "cosmos3-tiny", "cosmos3-sp-tiny", "cosmos3", "flux-tiny", "flux-dev"
    }
    three = get_config("wan-14b", num_layers=3)
    assert three.num_layers == 3 and three.dim == 5120
    assert get_config("wan-14b").num_layers == 40  # the registry entry is untouched
    with pytest.raises(KeyError, match="wan-1.3b"):
        get_config("wan-2b")
    with pytest.raises(ValueError):
        WanConfig(name="bad", dim=100, num_heads=12, ffn_dim=10, num_layers=1)
    with pytest.raises(ValueError):
        Cosmos3Config(name="bad", hidden_size=64, num_heads=4, num_kv_heads=3, head_dim=16,
                      intermediate_size=8, num_layers=1, rope_axes_dim=(4, 2, 2))
    with pytest.raises(ValueError):
        FluxConfig(name="bad", num_heads=2, head_dim=16, num_layers=1, num_single_layers=1, rope_axes_dim=(4, 4, 4))


def test_flux_dev_config_has_the_published_dims():
    flux = get_config("flux-dev")
    assert (flux.num_heads, flux.head_dim, flux.num_layers, flux.num_single_layers) == (24, 128, 19, 38)
    assert (flux.in_channels, flux.text_dim, flux.pooled_dim, flux.rope_axes_dim) == (64, 4096, 768, (16, 56, 56))
    assert flux.guidance_embeds and flux.seq_len == 4096 and flux.text_len == 512


# ---------------------------------------------------------------------------- RoPE


def test_wan_rope_tables_and_form_match_float64_rotation():
    head_dim, grid, theta = 32, (3, 4, 5), 10000.0
    freqs_cos, freqs_sin = wan_rope_tables(head_dim, grid, theta)
    seq_len = math.prod(grid)
    assert freqs_cos.shape == freqs_sin.shape == (1, seq_len, 1, head_dim)
    assert freqs_cos.dtype == freqs_sin.dtype == torch.float32

    # Wan gives height and width 2 * (D // 6) channels each and time the rest.
    axis_dims = (12, 10, 10)
    assert wan_axis_dims(head_dim) == axis_dims and wan_axis_dims(128) == (44, 42, 42)
    # Reference: pair j of an axis section of width d turns by coordinate * theta^(-2j/d).
    coords = [(f, h, w) for f in range(grid[0]) for h in range(grid[1]) for w in range(grid[2])]
    pair_angles = torch.tensor(
        [
            [coord[axis] * theta ** (-2 * j / axis_dim)
             for axis, axis_dim in enumerate(axis_dims) for j in range(axis_dim // 2)]
            for coord in coords
        ],
        dtype=torch.float64,
    )[None, :, None, :]
    x = torch.randn(2, seq_len, 3, head_dim, generator=torch.Generator().manual_seed(0))
    x_even, x_odd = x.double()[..., 0::2], x.double()[..., 1::2]
    cos, sin = pair_angles.cos(), pair_angles.sin()
    expected = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1).flatten(-2)

    actual = apply_interleaved_rope(x, freqs_cos, freqs_sin)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)
    # Not a no-op: most channels really rotate.
    assert (actual - x).abs().max() > 0.5


def test_qwen3_rope_tables_and_form_match_float64_rotation():
    head_dim, theta = 32, 5_000_000.0
    positions = increasing_positions(2, 40, start=100, seed=3)
    cos, sin = qwen3_rope_tables(positions, head_dim, theta, torch.float32)
    assert cos.shape == sin.shape == (2, 40, head_dim) and cos.dtype == torch.float32

    # Reference: channel i and i + D/2 form a pair turned by position * theta^(-2i/D).
    half = head_dim // 2
    inv_freq = theta ** (-2 * torch.arange(half, dtype=torch.float64) / head_dim)
    angles = (positions.double()[..., None] * inv_freq)[:, :, None, :]
    x = torch.randn(2, 40, 3, head_dim, generator=torch.Generator().manual_seed(1))
    first, second = x.double()[..., :half], x.double()[..., half:]
    expected = torch.cat(
        [first * angles.cos() - second * angles.sin(), second * angles.cos() + first * angles.sin()], dim=-1
    )

    actual = x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)
    torch.testing.assert_close(actual.double(), expected, atol=1e-4, rtol=1e-4)
    assert (actual - x).abs().max() > 0.5

    cos_bf16, sin_bf16 = qwen3_rope_tables(positions, head_dim, theta, torch.bfloat16)
    assert cos_bf16.dtype == sin_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(cos_bf16.float(), cos, atol=1e-2, rtol=0)


def test_increasing_positions_are_deterministic_and_strictly_increasing():
    positions = increasing_positions(2, 50, start=7, seed=5)
    assert positions.shape == (2, 50) and positions.dtype == torch.int64
    assert (positions[:, 0] == 7).all()
    gaps = positions.diff(dim=1)
    assert gaps.min() >= 1 and gaps.max() <= 3 and gaps.unique().numel() > 1
    assert torch.equal(positions, increasing_positions(2, 50, start=7, seed=5))
    assert not torch.equal(positions, increasing_positions(2, 50, start=7, seed=6))


# ---------------------------------------------------------------------------- Wan


@pytest.mark.parametrize("dtype", DTYPES)
def test_wan_stack_runs(dtype):
    torch.manual_seed(0)
    stack = WanStack(WAN_TINY).to(dtype)
    inputs = wan_example_inputs(WAN_TINY, batch_size=2, dtype=dtype)
    hidden_states = inputs[0]
    assert inputs[3][0].dtype == torch.float32  # RoPE tables stay fp32 in a bf16 model
    with torch.no_grad():
        out = stack(*inputs)
    assert out.shape == (2, WAN_TINY.seq_len, WAN_TINY.dim) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert _relative_error(out, hidden_states) > 0.1


def test_wan_block_keeps_the_stock_source_forms():
    torch.manual_seed(0)
    targets = _graph_targets(WanBlock(WAN_TINY), *wan_example_inputs(WAN_TINY))
    # Across-heads q/k norm on both attentions, RoPE through empty_like stores on q and k.
    assert targets.count("rms_norm") == 4
    assert targets.count("empty_like") == 2
    assert targets.count("scaled_dot_product_attention") == 2
    assert targets.count("layer_norm") == 3


# ---------------------------------------------------------------------------- Cosmos3


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosmos3_stack_runs(dtype):
    torch.manual_seed(0)
    stack = Cosmos3GenStack(COSMOS3_TINY).to(dtype)
    hidden_states, cos, sin, prefix_kv = cosmos3_example_inputs(COSMOS3_TINY, batch_size=2, dtype=dtype)
    assert cos.shape == (2, COSMOS3_TINY.gen_seq_len, COSMOS3_TINY.head_dim) and cos.dtype == dtype
    assert len(prefix_kv) == COSMOS3_TINY.num_layers
    for k_prefix, v_prefix in prefix_kv:
        expected_shape = (2, COSMOS3_TINY.prefix_len, COSMOS3_TINY.num_kv_heads, COSMOS3_TINY.head_dim)
        assert k_prefix.shape == v_prefix.shape == expected_shape and k_prefix.dtype == dtype
    with torch.no_grad():
        out = stack(hidden_states, cos, sin, prefix_kv)
    assert out.shape == hidden_states.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert _relative_error(out, hidden_states) > 0.1
    with pytest.raises(ValueError):
        stack(hidden_states, cos, sin, prefix_kv[:1])


def test_prefix_kv_is_deterministic_normed_and_distinct_per_layer():
    first = build_prefix_kv(COSMOS3_TINY, 1, torch.Generator().manual_seed(0))
    again = build_prefix_kv(COSMOS3_TINY, 1, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for pair, pair_again in zip(first, again) for a, b in zip(pair, pair_again))
    assert not torch.equal(first[0][0], first[1][0])
    # RoPE preserves the per-head RMS norm of 1 that the K cache was normed to.
    k_rms = first[0][0].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(k_rms, torch.ones_like(k_rms), atol=1e-3, rtol=0)


def _float64_cosmos3_gen_layer(layer: Cosmos3GenLayer, hidden_states, cos, sin, k_prefix, v_prefix):
    """The generation layer written independently: explicit RMS, pairwise rotation,
    GQA by repeating each kv head over its group of q heads, softmax attention."""
    p = {name: value.double() for name, value in layer.state_dict().items()}
    hidden_states, cos, sin, k_prefix, v_prefix = (t.double() for t in (hidden_states, cos, sin, k_prefix, v_prefix))
    batch, seq_len, _ = hidden_states.shape
    heads, kv_heads, head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    half = head_dim // 2

    def rms(x, weight, eps):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x):
        c, s = cos[:, :, None, :half], sin[:, :, None, :half]
        return torch.cat([x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s], dim=-1)

    x = rms(hidden_states, p["input_norm_weight"], layer.rms_norm_eps)
    qkv = x @ p["to_qkv.weight"].T
    q = qkv[..., : heads * head_dim].reshape(batch, seq_len, heads, head_dim)
    k = qkv[..., heads * head_dim : (heads + kv_heads) * head_dim].reshape(batch, seq_len, kv_heads, head_dim)
    v = qkv[..., (heads + kv_heads) * head_dim :].reshape(batch, seq_len, kv_heads, head_dim)
    q = rotate(rms(q, p["q_norm_weight"], layer.q_norm_eps))
    k = rotate(rms(k, p["k_norm_weight"], layer.k_norm_eps))
    group = heads // kv_heads
    k = torch.cat([k_prefix, k], dim=1).repeat_interleave(group, dim=2)
    v = torch.cat([v_prefix, v], dim=1).repeat_interleave(group, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(head_dim)
    attn = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).reshape(batch, seq_len, heads * head_dim)
    hidden_states = hidden_states + attn @ p["to_out.weight"].T
    x = rms(hidden_states, p["post_attention_norm_weight"], layer.rms_norm_eps)
    gate, up = x @ p["gate_proj.weight"].T, x @ p["up_proj.weight"].T
    return hidden_states + (torch.nn.functional.silu(gate) * up) @ p["down_proj.weight"].T


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosmos3_gen_layer_matches_float64_reference(dtype):
    torch.manual_seed(0)
    layer = Cosmos3GenLayer(COSMOS3_TINY)
    hidden_states, cos, sin, prefix_kv = cosmos3_example_inputs(COSMOS3_TINY, batch_size=2, seed=1)
    expected = _float64_cosmos3_gen_layer(layer, hidden_states, cos, sin, *prefix_kv[0])
    cast = [t.to(dtype) for t in (hidden_states, cos, sin, *prefix_kv[0])]
    with torch.no_grad():
        actual = layer.to(dtype)(*cast)
    assert _relative_error(actual, expected) < TOLERANCE[dtype]
    # The prefix is attended to: another cache gives another answer.
    other_k, other_v = build_prefix_kv(COSMOS3_TINY, 2, torch.Generator().manual_seed(9), dtype)[0]
    with torch.no_grad():
        assert _relative_error(layer(*cast[:3], other_k, other_v), actual) > 1e-2


def test_cosmos3_gen_layer_keeps_the_stock_source_forms():
    torch.manual_seed(0)
    layer = Cosmos3GenLayer(COSMOS3_TINY)
    config = COSMOS3_TINY
    assert layer.to_qkv.out_features == (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    assert layer.to_qkv.bias is None
    hidden_states, cos, sin, prefix_kv = cosmos3_example_inputs(config)
    targets = _graph_targets(layer, hidden_states, cos, sin, *prefix_kv[0])
    assert targets.count("split") == 1
    assert targets.count("contiguous") == 3
    assert targets.count("rms_norm") == 4  # input, q, k, post-attention
    assert targets.count("cat") == 4  # rotate_half on q and k, then the K and V prefix concats
    assert targets.count("scaled_dot_product_attention") == 1


# ---------------------------------------------------------------------------- denoising loop


@pytest.mark.parametrize("dtype", DTYPES)
def test_denoise_runs_and_the_timestep_selects_the_embedding(dtype):
    torch.manual_seed(0)
    step = DenoiseStep(WAN_TINY).to(dtype)
    latents, timesteps, encoder_hidden_states = loop_example_inputs(WAN_TINY, num_steps=3, batch_size=2, dtype=dtype)
    assert timesteps.tolist() == [999, 500, 0]
    with torch.no_grad():
        out = denoise(step, latents, timesteps, encoder_hidden_states)
        assert out.shape == latents.shape and out.dtype == dtype and torch.isfinite(out).all()
        early = step(latents, torch.tensor([900, 900]), encoder_hidden_states)
        late = step(latents, torch.tensor([100, 100]), encoder_hidden_states)
    assert early.shape == latents.shape
    assert _relative_error(early, late) > 1e-2


def test_denoise_is_an_euler_integration_from_the_first_sigma_to_zero():
    velocity = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    seen = []

    def constant_velocity(latents, timestep, encoder_hidden_states):
        seen.append(timestep.tolist())
        return velocity

    latents = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    out = denoise(constant_velocity, latents, make_timesteps(4), encoder_hidden_states=None)
    assert seen == [[999, 999], [666, 666], [333, 333], [0, 0]]
    torch.testing.assert_close(out, latents - 0.999 * velocity)


def test_denoise_step_reads_the_timestep_on_the_host():
    torch.manual_seed(0)
    step = DenoiseStep(WAN_TINY)
    latents, timesteps, encoder_hidden_states = loop_example_inputs(WAN_TINY)
    inputs = (latents, timesteps[:1], encoder_hidden_states)
    # The stock form breaks the graph at .item() ...
    assert torch._dynamo.explain(step)(*inputs).graph_break_count == 1
    # ... and is captured whole once scalar outputs are captured.
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        explanation = torch._dynamo.explain(step)(*inputs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)


# ---------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def diffusers_models():
    pytest.importorskip("diffusers")
    from diffopt.models import diffusers_models

    return diffusers_models


@pytest.mark.parametrize("dtype", DTYPES)
def test_wan_block_matches_diffusers(diffusers_models, dtype):
    theirs = diffusers_models.build_diffusers_wan_block(WAN_TINY).to(dtype)
    ours = diffusers_models.wan_block_from_diffusers(theirs, WAN_TINY)
    assert isinstance(ours, WanBlock) and next(ours.parameters()).dtype == dtype
    assert theirs.norm2.weight.sub(1).abs().max() > 0  # norm weights were randomized
    inputs = wan_example_inputs(WAN_TINY, batch_size=2, dtype=dtype, seed=4)
    with torch.no_grad():
        expected = theirs(*inputs)
        actual = ours(*inputs)
    assert actual.dtype == expected.dtype == dtype
    assert _relative_error(actual, expected) < TOLERANCE[dtype]


def test_wan_rope_tables_match_diffusers(diffusers_models):
    model = diffusers_models.build_diffusers_wan(WAN_TINY, num_layers=1)
    latents = diffusers_models.diffusers_wan_inputs(WAN_TINY)["hidden_states"]
    expected_cos, expected_sin = model.rope(latents)
    freqs_cos, freqs_sin = wan_rope_tables(WAN_TINY.head_dim, WAN_TINY.rope_grid, WAN_TINY.rope_theta)
    torch.testing.assert_close(freqs_cos, expected_cos)
    torch.testing.assert_close(freqs_sin, expected_sin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosmos3_gen_layer_matches_diffusers(diffusers_models, dtype):
    theirs = diffusers_models.build_diffusers_cosmos3_layer(COSMOS3_TINY).to(dtype)
    ours = diffusers_models.cosmos3_gen_layer_from_diffusers(theirs, COSMOS3_TINY)
    und_seq, gen_seq, rotary_emb = diffusers_models.diffusers_cosmos3_layer_inputs(COSMOS3_TINY, dtype, seed=2)
    cos_und, sin_und, cos_gen, sin_gen = rotary_emb
    with torch.no_grad():
        _, expected = theirs(und_seq, gen_seq, rotary_emb)
        k_prefix, v_prefix = diffusers_models.cosmos3_prefix_kv_from_diffusers(theirs, und_seq, cos_und, sin_und)
        actual = ours(gen_seq[None], cos_gen[None], sin_gen[None], k_prefix, v_prefix)[0]
    assert k_prefix.shape == (1, COSMOS3_TINY.prefix_len, COSMOS3_TINY.num_kv_heads, COSMOS3_TINY.head_dim)
    assert actual.dtype == expected.dtype == dtype
    assert _relative_error(actual, expected) < TOLERANCE[dtype]


def test_diffusers_wan_model_runs(diffusers_models):
    model = diffusers_models.build_diffusers_wan(WAN_TINY)
    assert len(model.blocks) == WAN_TINY.num_layers
    inputs = diffusers_models.diffusers_wan_inputs(WAN_TINY, batch_size=2)
    assert inputs["encoder_hidden_states"].shape == (2, WAN_TINY.text_len, WAN_TINY.text_dim)
    with torch.no_grad():
        (out,) = model(**inputs, return_dict=False)
    assert out.shape == inputs["hidden_states"].shape == (2, WAN_TINY.in_channels, *WAN_TINY.latent_shape)
    assert torch.isfinite(out).all()


def test_diffusers_cosmos3_model_runs(diffusers_models):
    model = diffusers_models.build_diffusers_cosmos3(COSMOS3_TINY, num_layers=1)
    assert len(model.layers) == 1
    inputs = diffusers_models.diffusers_cosmos3_inputs(COSMOS3_TINY, latent_shape=(2, 4, 6))
    with torch.no_grad():
        (sample,) = model(**inputs).sample
    assert sample.shape == (1, COSMOS3_TINY.latent_channel, 2, 4, 6)
    assert torch.isfinite(sample).all() and sample.abs().max() > 0


def test_diffusers_flux_model_runs(diffusers_models):
    config = get_config("flux-tiny")
    model = diffusers_models.build_diffusers_flux(config)
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (1, 1)
    inputs = diffusers_models.diffusers_flux_inputs(config, batch_size=2)
    assert inputs["hidden_states"].shape == (2, config.seq_len, config.in_channels)
    # RoPE ids: (0, row, column) per image token, row-major over the token grid
    assert inputs["img_ids"][config.grid_width + 2].tolist() == [0, 1, 2]
    with torch.no_grad():
        (out,) = model(**inputs, return_dict=False)
    assert out.shape == inputs["hidden_states"].shape
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_cast_like_from_pretrained_keeps_the_float32_modules(diffusers_models):
    model = diffusers_models.build_diffusers_wan(WAN_TINY)
    diffusers_models.cast_like_from_pretrained(model, torch.bfloat16)
    kept = set(model._keep_in_fp32_modules)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            want = torch.float32 if kept & set(name.split(".")) else torch.bfloat16
            assert tensor.dtype == want, name
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    inputs = diffusers_models.diffusers_wan_inputs(WAN_TINY, dtype=torch.bfloat16)
    with torch.no_grad():
        (out,) = model(**inputs, return_dict=False)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.gpu
def test_diffusers_builders_on_cuda_are_deterministic_and_leave_the_rng_alone(diffusers_models):
    rng_state = torch.cuda.get_rng_state()
    first = diffusers_models.build_diffusers_wan(WAN_TINY, device="cuda").state_dict()
    assert torch.equal(torch.cuda.get_rng_state(), rng_state)
    again = diffusers_models.build_diffusers_wan(WAN_TINY, device="cuda").state_dict()
    assert all(tensor.is_cuda and torch.equal(tensor, again[key]) for key, tensor in first.items())


def test_diffusers_builders_are_deterministic_in_the_seed(diffusers_models):
    rng_state = torch.get_rng_state()
    first = diffusers_models.build_diffusers_cosmos3_layer(COSMOS3_TINY, seed=0).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    again = diffusers_models.build_diffusers_cosmos3_layer(COSMOS3_TINY, seed=0).state_dict()
    other = diffusers_models.build_diffusers_cosmos3_layer(COSMOS3_TINY, seed=1).state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["self_attn.add_q_proj.weight"], other["self_attn.add_q_proj.weight"])
