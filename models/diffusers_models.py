"""The stock diffusers models at our configs, with random weights, and weight transfers to ours.

diffusers is optional: it is imported inside each function, which raises ImportError with
an install hint when it is missing. Builders are deterministic in ``seed`` (for a given
``device``) and leave the global RNG untouched. Norm weights are perturbed away from their
ones/zeros init so that comparisons against our models exercise them. Whole-model builders
take a ``device`` to initialise on: a 12B-parameter model initialises in seconds on a GPU.
"""

import importlib

import torch
import torch.nn as nn

from .configs import Cosmos3Config, FluxConfig, WanConfig
from .cosmos3 import Cosmos3GenLayer, rotate_half
from .rope import increasing_positions, qwen3_rope_tables
from .wan import WanBlock


def _import_transformers_module(name: str):
    """``diffusers.models.transformers.<name>``, or an ImportError that says how to get it."""
    try:
        return importlib.import_module(f"diffusers.models.transformers.{name}")
    except ImportError as error:
        raise ImportError(
            f"building the stock diffusers model needs diffusers.models.transformers.{name} "
            "(pip install 'diffopt[diffusers]')"
        ) from error


def _perturb_norm_weights(model: nn.Module, generator: torch.Generator) -> None:
    # Norm layers are recognised by name: diffusers has several RMSNorm classes of its own.
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__:
                for param in module.parameters(recurse=False):
                    noise = torch.randn(param.shape, generator=generator, device=generator.device)
                    param.add_(0.1 * noise.to(param.device))


def _build(constructor, seed: int, device: torch.device | str | None = None) -> nn.Module:
    device = torch.device(device or "cpu")
    rng_devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type), device:
        torch.manual_seed(seed)
        model = constructor()
    _perturb_norm_weights(model, torch.Generator(device).manual_seed(seed + 1))
    return model.to(device).eval()


def cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype`` the way ``from_pretrained(..., torch_dtype=dtype)`` loads it: the
    floating-point entries of the state dict become ``dtype``, except those under the class's
    ``_keep_in_fp32_modules`` (Wan's RoPE, time embedder, modulation tables and norms, for
    example), and non-persistent buffers keep the dtype they were built in. ``model.to(dtype)``
    would cast everything, which diffusers warns against. In place; returns ``model``."""
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and not any(part in name.split(".") for part in keep_fp32):
                tensor.data = tensor.data.to(dtype)
    return model


# ---------------------------------------------------------------------------- Wan


def build_diffusers_wan(
    config: WanConfig, num_layers: int | None = None, seed: int = 0, device: torch.device | str | None = None
) -> nn.Module:
    """``diffusers.WanTransformer3DModel`` (text-to-video) at ``config``, fp32 on ``device`` (default CPU)."""
    wan = _import_transformers_module("transformer_wan")
    return _build(
        lambda: wan.WanTransformer3DModel(
            patch_size=config.patch_size,
            num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            text_dim=config.text_dim,
            freq_dim=config.freq_dim,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers if num_layers is None else num_layers,
            cross_attn_norm=config.cross_attn_norm,
            qk_norm="rms_norm_across_heads",
            eps=config.eps,
        ),
        seed,
        device,
    )


def diffusers_wan_inputs(
    config: WanConfig,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Keyword inputs of ``WanTransformer3DModel.forward``: the latent video
    ``hidden_states`` ``[B, C, F, H, W]``, ``timestep`` ``[B]`` and the prompt embedding
    ``encoder_hidden_states`` ``[B, text_len, text_dim]``."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, config.in_channels, *config.latent_shape, generator=generator)
    timestep = torch.randint(0, 1000, (1,), generator=generator).expand(batch_size)
    prompt = torch.randn(batch_size, config.text_len, config.text_dim, generator=generator)
    return {
        "hidden_states": latents.to(device=device, dtype=dtype),
        "timestep": timestep.to(device),
        "encoder_hidden_states": prompt.to(device=device, dtype=dtype),
    }


def build_diffusers_wan_block(config: WanConfig, seed: int = 0) -> nn.Module:
    """One diffusers ``WanTransformerBlock``; it takes the same inputs as ``WanBlock``
    (``models.wan.wan_example_inputs``)."""
    wan = _import_transformers_module("transformer_wan")
    return _build(
        lambda: wan.WanTransformerBlock(
            dim=config.dim,
            ffn_dim=config.ffn_dim,
            num_heads=config.num_heads,
            qk_norm="rms_norm_across_heads",
            cross_attn_norm=config.cross_attn_norm,
            eps=config.eps,
        ),
        seed,
    )


def _wan_key_from_diffusers(key: str) -> str:
    # diffusers wraps the output projection with a Dropout in a ModuleList and the FFN in
    # FeedForward(GELU(proj), Dropout, Linear); ours are plain Linears.
    return (
        key.replace(".to_out.0.", ".to_out.")
        .replace("ffn.net.0.proj.", "ffn.proj_in.")
        .replace("ffn.net.2.", "ffn.proj_out.")
    )


def wan_block_from_diffusers(block: nn.Module, config: WanConfig) -> WanBlock:
    """Our ``WanBlock`` holding the weights of diffusers' ``block`` (same dtype and device)."""
    state = {_wan_key_from_diffusers(key): value for key, value in block.state_dict().items()}
    reference = next(iter(state.values()))
    ours = WanBlock(config).to(device=reference.device, dtype=reference.dtype)
    ours.load_state_dict(state, strict=True)
    return ours.eval()


# ---------------------------------------------------------------------------- Cosmos3


def build_diffusers_cosmos3_layer(config: Cosmos3Config, seed: int = 0) -> nn.Module:
    """One diffusers ``Cosmos3VLTextMoTDecoderLayer`` (both pathways), fp32 on the CPU."""
    cosmos3 = _import_transformers_module("transformer_cosmos3")
    return _build(
        lambda: cosmos3.Cosmos3VLTextMoTDecoderLayer(
            hidden_size=config.hidden_size,
            head_dim=config.head_dim,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            intermediate_size=config.intermediate_size,
            attention_bias=False,
            rms_norm_eps=config.eps,
            hidden_act="silu",
        ),
        seed,
    )


def diffusers_cosmos3_layer_inputs(
    config: Cosmos3Config,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(und_seq, gen_seq, rotary_emb)`` for ``Cosmos3VLTextMoTDecoderLayer.forward``.

    diffusers packs the sequence without a batch dim: ``und_seq`` ``[P, hidden]``,
    ``gen_seq`` ``[S_gen, hidden]``, ``rotary_emb`` = ``(cos_und, sin_und, cos_gen, sin_gen)``
    each ``[tokens, D]`` in ``dtype``; understanding positions ``0..P-1``, generation after.
    """
    generator = torch.Generator().manual_seed(seed)
    und_seq = torch.randn(config.prefix_len, config.hidden_size, generator=generator)
    gen_seq = torch.randn(config.gen_seq_len, config.hidden_size, generator=generator)
    positions = torch.cat(
        [
            torch.arange(config.prefix_len)[None],
            increasing_positions(1, config.gen_seq_len, start=config.prefix_len, seed=seed),
        ],
        dim=1,
    )
    cos, sin = qwen3_rope_tables(positions, config.head_dim, config.rope_theta, dtype)
    cos, sin = cos[0].to(device), sin[0].to(device)
    prefix = config.prefix_len
    return (
        und_seq.to(device=device, dtype=dtype),
        gen_seq.to(device=device, dtype=dtype),
        (cos[:prefix], sin[:prefix], cos[prefix:], sin[prefix:]),
    )


def cosmos3_gen_layer_from_diffusers(layer: nn.Module, config: Cosmos3Config) -> Cosmos3GenLayer:
    """Our ``Cosmos3GenLayer`` holding the generation-pathway weights of diffusers' ``layer``."""
    attn = layer.self_attn
    reference = attn.add_q_proj.weight
    ours = Cosmos3GenLayer(config).to(device=reference.device, dtype=reference.dtype)
    ours.load_state_dict(
        {
            "input_norm_weight": layer.input_layernorm_moe_gen.weight,
            "to_qkv.weight": torch.cat([attn.add_q_proj.weight, attn.add_k_proj.weight, attn.add_v_proj.weight]),
            "q_norm_weight": attn.norm_added_q.weight,
            "k_norm_weight": attn.norm_added_k.weight,
            "to_out.weight": attn.to_add_out.weight,
            "post_attention_norm_weight": layer.post_attention_layernorm_moe_gen.weight,
            "gate_proj.weight": layer.mlp_moe_gen.gate_proj.weight,
            "up_proj.weight": layer.mlp_moe_gen.up_proj.weight,
            "down_proj.weight": layer.mlp_moe_gen.down_proj.weight,
        },
        strict=True,
    )
    return ours.eval()


def cosmos3_prefix_kv_from_diffusers(
    layer: nn.Module, und_seq: torch.Tensor, cos_und: torch.Tensor, sin_und: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The understanding K/V that diffusers' ``layer`` lets the generation tokens attend to,
    as the ``(k_prefix, v_prefix)`` ``[1, P, Hkv, D]`` cache that ``Cosmos3GenLayer`` takes."""
    attn = layer.self_attn
    if attn.k_norm_und_for_gen is not None:
        raise NotImplementedError("layers built with use_und_k_norm_for_gen have a second K norm")
    und_norm = layer.input_layernorm(und_seq)
    k = attn.norm_k(attn.to_k(und_norm).view(-1, attn.num_key_value_heads, attn.head_dim))
    v = attn.to_v(und_norm).view(-1, attn.num_key_value_heads, attn.head_dim)
    k = k * cos_und.unsqueeze(1) + rotate_half(k) * sin_und.unsqueeze(1)
    return k.unsqueeze(0), v.unsqueeze(0)


def build_diffusers_cosmos3(
    config: Cosmos3Config, num_layers: int | None = None, seed: int = 0, device: torch.device | str | None = None
) -> nn.Module:
    """``diffusers.Cosmos3OmniTransformer`` (video generation only) at ``config``, fp32 on ``device`` (default CPU)."""
    cosmos3 = _import_transformers_module("transformer_cosmos3")
    patch = config.latent_patch_size
    return _build(
        lambda: cosmos3.Cosmos3OmniTransformer(
            head_dim=config.head_dim,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            latent_channel=config.latent_channel,
            latent_patch_size=patch,
            num_attention_heads=config.num_heads,
            num_hidden_layers=config.num_layers if num_layers is None else num_layers,
            num_key_value_heads=config.num_kv_heads,
            patch_latent_dim=config.latent_channel * patch * patch,
            rms_norm_eps=config.eps,
            rope_theta=config.rope_theta,
            vocab_size=config.vocab_size,
            rope_axes_dim=list(config.rope_axes_dim),
        ),
        seed,
        device,
    )


def diffusers_cosmos3_inputs(
    config: Cosmos3Config,
    latent_shape: tuple[int, int, int] = (2, 4, 4),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict:
    """Keyword inputs of ``Cosmos3OmniTransformer.forward`` for one text-to-video item:
    ``config.prefix_len`` text tokens then one all-noisy latent video of ``latent_shape``
    (frames, height, width), i.e. ``frames * ceil(height / patch) * ceil(width / patch)``
    generation tokens (the model pads odd sizes: 720p latents are 45 high)."""
    generator = torch.Generator().manual_seed(seed)
    patch = config.latent_patch_size
    frames, height, width = latent_shape
    grid = (frames, -(-height // patch), -(-width // patch))
    num_text = config.prefix_len
    num_vision = grid[0] * grid[1] * grid[2]
    sequence_length = num_text + num_vision

    latents = torch.randn(1, config.latent_channel, frames, height, width, generator=generator)
    timestep = torch.rand(1, generator=generator) * 1000
    # mRoPE ids: text advances all three axes together; video tokens take their (t, h, w)
    # grid coordinates, offset past the text.
    vision_positions = torch.stack(
        torch.meshgrid(*(torch.arange(size) for size in grid), indexing="ij"), dim=0
    ).reshape(3, -1)
    position_ids = torch.cat([torch.arange(num_text).expand(3, -1), num_text + vision_positions], dim=1)
    vision_indexes = torch.arange(num_text, sequence_length)
    return {
        "input_ids": torch.randint(0, config.vocab_size, (num_text,), generator=generator).to(device),
        "text_indexes": torch.arange(num_text, device=device),
        "position_ids": position_ids.to(device),
        "und_len": num_text,
        "sequence_length": sequence_length,
        "vision_tokens": [latents.to(device=device, dtype=dtype)],
        "vision_token_shapes": [grid],
        "vision_sequence_indexes": vision_indexes.to(device),
        "vision_mse_loss_indexes": vision_indexes.to(device),
        "vision_timesteps": timestep.expand(num_vision).to(device=device, dtype=dtype),
        "vision_noisy_frame_indexes": [torch.arange(frames, device=device)],
    }


# ---------------------------------------------------------------------------- Flux


def build_diffusers_flux(config: FluxConfig, seed: int = 0, device: torch.device | str | None = None) -> nn.Module:
    """``diffusers.FluxTransformer2DModel`` at ``config``, fp32 on ``device`` (default CPU)."""
    flux = _import_transformers_module("transformer_flux")
    return _build(
        lambda: flux.FluxTransformer2DModel(
            patch_size=1,
            in_channels=config.in_channels,
            num_layers=config.num_layers,
            num_single_layers=config.num_single_layers,
            attention_head_dim=config.head_dim,
            num_attention_heads=config.num_heads,
            joint_attention_dim=config.text_dim,
            pooled_projection_dim=config.pooled_dim,
            guidance_embeds=config.guidance_embeds,
            axes_dims_rope=config.rope_axes_dim,
        ),
        seed,
        device,
    )


def diffusers_flux_inputs(
    config: FluxConfig,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Keyword inputs of ``FluxTransformer2DModel.forward`` as diffusers' ``FluxPipeline``
    makes them: packed latents ``hidden_states`` ``[B, tokens, in_channels]``, the prompt
    embedding ``[B, text_len, text_dim]`` and its pooled form, ``timestep`` in (0, 1),
    ``guidance`` (float32) when the model embeds it, and the RoPE ids ``img_ids``
    ``[tokens, 3]`` (0, row, column) and ``txt_ids`` (zeros)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = config.grid_height, config.grid_width
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    inputs = {
        "hidden_states": torch.randn(batch_size, height * width, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(batch_size, config.text_len, config.text_dim, generator=generator),
        "pooled_projections": torch.randn(batch_size, config.pooled_dim, generator=generator),
        "timestep": torch.rand(1, generator=generator).expand(batch_size),
        "img_ids": img_ids.reshape(height * width, 3),
        "txt_ids": torch.zeros(config.text_len, 3),
    }
    inputs = {key: value.to(device=device, dtype=dtype) for key, value in inputs.items()}
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch_size,), 3.5, device=device)
    return inputs
