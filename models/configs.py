"""Named model configurations for the reference models and their diffusers counterparts.

One frozen dataclass per model family. Real-size configs carry the shapes the benchmarks
use; the tiny ones keep every architectural feature (GQA, 3-axis RoPE, affine cross-attention
norm) at sizes that run on a CPU in milliseconds.
"""

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class WanConfig:
    """A Wan 2.1 text-to-video transformer (diffusers' ``WanTransformer3DModel``)."""

    name: str
    dim: int
    num_heads: int
    ffn_dim: int
    num_layers: int
    eps: float = 1e-6
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # Latent video grid (frames, height, width) after the VAE. 480x832 at 81 frames
    # compresses 4x in time (plus the first frame) and 8x in space: 21 x 60 x 104.
    latent_frames: int = 21
    latent_height: int = 60
    latent_width: int = 104
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"{self.name}: dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if any(size % patch for size, patch in zip(self.latent_shape, self.patch_size)):
            raise ValueError(f"{self.name}: latent grid {self.latent_shape} is not divisible by {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_frames, self.latent_height, self.latent_width)

    @property
    def rope_grid(self) -> tuple[int, int, int]:
        """Token grid (frames, height, width) after patchifying the latent."""
        return tuple(size // patch for size, patch in zip(self.latent_shape, self.patch_size))

    @property
    def seq_len(self) -> int:
        frames, height, width = self.rope_grid
        return frames * height * width


@dataclass(frozen=True)
class Cosmos3Config:
    """The Qwen3-style MoT backbone of Cosmos3 (diffusers' ``Cosmos3OmniTransformer``).

    ``gen_seq_len`` is the number of generation (video) tokens, ``prefix_len`` the number of
    understanding (text) tokens whose K/V the generation tokens attend to.
    """

    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    eps: float = 1e-6
    gen_seq_len: int = 28520
    prefix_len: int = 512
    rope_theta: float = 5_000_000.0
    # mRoPE split of the head_dim // 2 frequencies into (time, height, width).
    rope_axes_dim: tuple[int, int, int] = (24, 20, 20)
    vocab_size: int = 151936
    latent_channel: int = 48
    latent_patch_size: int = 2

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: {self.num_heads} q heads do not group over {self.num_kv_heads} kv heads")
        if sum(self.rope_axes_dim) != self.head_dim // 2:
            raise ValueError(f"{self.name}: rope_axes_dim {self.rope_axes_dim} must sum to head_dim // 2")


@dataclass(frozen=True)
class FluxConfig:
    """A Flux.1 text-to-image transformer (diffusers' ``FluxTransformer2DModel``): ``num_layers``
    double-stream (MMDiT) blocks, then ``num_single_layers`` single-stream blocks."""

    name: str
    num_heads: int
    head_dim: int
    num_layers: int
    num_single_layers: int
    # 2x2-packed VAE latent channels (16 x 4).
    in_channels: int = 64
    text_len: int = 512
    text_dim: int = 4096
    pooled_dim: int = 768
    guidance_embeds: bool = True
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    # Image token grid: a 1024x1024 image, 8x VAE, 2x2 packing -> 64 x 64 tokens.
    grid_height: int = 64
    grid_width: int = 64

    def __post_init__(self):
        if sum(self.rope_axes_dim) != self.head_dim:
            raise ValueError(f"{self.name}: rope_axes_dim {self.rope_axes_dim} must sum to head_dim")

    @property
    def seq_len(self) -> int:
        return self.grid_height * self.grid_width


_CONFIGS = {
    config.name: config
    for config in (
        WanConfig(
            name="wan-tiny",
            dim=64,
            num_heads=4,
            ffn_dim=128,
            num_layers=2,
            text_len=8,
            text_dim=32,
            freq_dim=32,
            in_channels=4,
            out_channels=4,
            latent_frames=2,
            latent_height=8,
            latent_width=8,
        ),
        WanConfig(name="wan-1.3b", dim=1536, num_heads=12, ffn_dim=8960, num_layers=30),
        WanConfig(name="wan-14b", dim=5120, num_heads=40, ffn_dim=13824, num_layers=40),
        Cosmos3Config(
            name="cosmos3-tiny",
            hidden_size=128,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=256,
            num_layers=2,
            gen_seq_len=24,
            prefix_len=8,
            rope_axes_dim=(6, 5, 5),
            vocab_size=512,
            latent_channel=4,
        ),
        # Heads divisible by 2 and 4 ranks: the sequence-parallel (Ulysses) tests and benchmark.
        Cosmos3Config(
            name="cosmos3-sp-tiny",
            hidden_size=64,
            num_heads=8,
            num_kv_heads=4,
            head_dim=16,
            intermediate_size=64,
            num_layers=1,
            gen_seq_len=16,
            prefix_len=5,
            rope_axes_dim=(4, 2, 2),
            vocab_size=16,
            latent_channel=4,
        ),
        Cosmos3Config(
            name="cosmos3",
            hidden_size=4096,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            intermediate_size=12288,
            num_layers=36,
        ),
        FluxConfig(
            name="flux-tiny",
            num_heads=2,
            head_dim=16,
            num_layers=1,
            num_single_layers=1,
            in_channels=8,
            text_len=8,
            text_dim=32,
            pooled_dim=16,
            rope_axes_dim=(4, 6, 6),
            grid_height=4,
            grid_width=6,
        ),
        FluxConfig(name="flux-dev", num_heads=24, head_dim=128, num_layers=19, num_single_layers=38),
    )
}

CONFIG_NAMES = tuple(_CONFIGS)


def get_config(name: str, num_layers: int | None = None) -> WanConfig | Cosmos3Config | FluxConfig:
    """The named config, with ``num_layers`` overridden when given (benchmarks build a few layers)."""
    try:
        config = _CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(CONFIG_NAMES)}") from None
    if num_layers is not None:
        config = dataclasses.replace(config, num_layers=num_layers)
    return config
