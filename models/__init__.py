"""Reference diffusion-transformer models in the stock forms that diffopt rewrites.

The diffusers builders live in ``diffopt.models.diffusers_models`` (diffusers is optional).
"""

from .configs import CONFIG_NAMES, Cosmos3Config, FluxConfig, WanConfig, get_config
from .cosmos3 import Cosmos3GenLayer, Cosmos3GenStack, build_prefix_kv, cosmos3_example_inputs, rotate_half
from .loop import DenoiseStep, denoise, loop_example_inputs, make_timesteps, sinusoidal_timestep_table
from .rope import increasing_positions, qwen3_rope_tables, wan_axis_dims, wan_rope_tables
from .wan import (
    FP32LayerNorm,
    WanAttention,
    WanBlock,
    WanFeedForward,
    WanStack,
    apply_interleaved_rope,
    wan_example_inputs,
)

__all__ = [
    "CONFIG_NAMES",
    "Cosmos3Config",
    "Cosmos3GenLayer",
    "Cosmos3GenStack",
    "DenoiseStep",
    "FP32LayerNorm",
    "FluxConfig",
    "WanAttention",
    "WanBlock",
    "WanConfig",
    "WanFeedForward",
    "WanStack",
    "apply_interleaved_rope",
    "build_prefix_kv",
    "cosmos3_example_inputs",
    "denoise",
    "get_config",
    "increasing_positions",
    "loop_example_inputs",
    "make_timesteps",
    "qwen3_rope_tables",
    "rotate_half",
    "sinusoidal_timestep_table",
    "wan_axis_dims",
    "wan_example_inputs",
    "wan_rope_tables",
]
