"""Wan 2.1 transformer block, in the stock form the compiler rewrites.

Architecture of diffusers' ``WanTransformerBlock`` (adaLN-modulated self-attention with
3-axis interleaved RoPE, cross-attention over the text tokens, gelu-tanh FFN), with the
same source forms: separate ``to_q``/``to_k``/``to_v``, ``nn.RMSNorm`` across all heads
before the head split, RoPE as two strided stores into ``empty_like``, fp32 layer norms and
float-upcast residuals.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import WanConfig
from .rope import wan_rope_tables


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and parameter dtypes; returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def apply_interleaved_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x`` ``[B, S, H, D]`` by fp32 tables ``[1, S, 1, D]``."""
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    # The tables repeat each pair's value twice; one strided read of each is the per-pair value.
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x_even * cos - x_odd * sin
    out[..., 1::2] = x_even * sin + x_odd * cos
    return out.type_as(x)


class WanAttention(nn.Module):
    """Multi-head attention with q/k RMSNorm across all heads; self-attention when no context is given."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=True)
        self.to_k = nn.Linear(dim, dim, bias=True)
        self.to_v = nn.Linear(dim, dim, bias=True)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.Linear(dim, dim, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if context is None:
            context = hidden_states
        query = self.to_q(hidden_states)
        key = self.to_k(context)
        value = self.to_v(context)

        query = self.norm_q(query)
        key = self.norm_k(key)

        query = query.unflatten(2, (self.num_heads, -1))
        key = key.unflatten(2, (self.num_heads, -1))
        value = value.unflatten(2, (self.num_heads, -1))

        if rotary_emb is not None:
            query = apply_interleaved_rope(query, *rotary_emb)
            key = apply_interleaved_rope(key, *rotary_emb)

        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return self.to_out(out)


class WanFeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, ffn_dim, bias=True)
        self.proj_out = nn.Linear(ffn_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class WanBlock(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, config.num_heads, config.eps)
        self.norm2 = (
            FP32LayerNorm(dim, config.eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        )
        self.attn2 = WanAttention(dim, config.num_heads, config.eps)
        self.norm3 = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.ffn = WanFeedForward(dim, config.ffn_dim)
        # Per-block learned offsets of the six modulation vectors (shift/scale/gate for
        # attention and for the FFN), added to the shared timestep projection.
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """``hidden_states`` ``[B, S, dim]``, ``encoder_hidden_states`` ``[B, L, dim]``,
        ``temb`` ``[B, 6, dim]``, ``rotary_emb`` = ``(freqs_cos, freqs_sin)`` fp32 ``[1, S, 1, D]``."""
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)

        norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, rotary_emb=rotary_emb)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(norm_hidden_states, context=encoder_hidden_states)

        norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = self.ffn(norm_hidden_states)
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


class WanStack(nn.Module):
    """``config.num_layers`` Wan blocks sharing the text context, modulation and RoPE tables."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, temb, rotary_emb)
        return hidden_states


def wan_example_inputs(
    config: WanConfig,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(hidden_states, encoder_hidden_states, temb, rotary_emb)`` for ``WanBlock``/``WanStack``
    at ``config.seq_len`` video tokens and ``config.text_len`` text tokens.

    Built on the CPU from ``seed``, so identical on every device. The RoPE tables stay fp32
    whatever ``dtype`` is, as in the real model.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch_size, config.seq_len, config.dim, generator=generator)
    encoder_hidden_states = torch.randn(batch_size, config.text_len, config.dim, generator=generator)
    temb = torch.randn(batch_size, 6, config.dim, generator=generator)
    rotary_emb = wan_rope_tables(config.head_dim, config.rope_grid, config.rope_theta, device)
    return (
        hidden_states.to(device=device, dtype=dtype),
        encoder_hidden_states.to(device=device, dtype=dtype),
        temb.to(device=device, dtype=dtype),
        rotary_emb,
    )
