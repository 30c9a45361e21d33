"""A zoo of stock diffusers transformers at tiny configs, with random weights (issue 12).

Each entry builds an unmodified diffusers model (one or two blocks, two heads of 16 channels)
and keyword inputs as its pipeline would pass them, and says which QK-norm + RoPE forms its
attention has (``FORMS``, read from its source). :func:`check` compiles a model with diffopt
(``qk_norm_rope`` on for CPU) and compares it with eager: the same check runs on any model
(``python scripts/zoo.py`` for the table, ``--model module:function`` for one of your own).

Forms (issue 12's classes): ``bshd`` RMSNorm per head then RoPE on ``[B, S, H, D]``
(fused before issue 12); ``A`` interleaved pairs with per-channel tables; ``B`` norm, then
``cat([text, image], seq)``, then RoPE of the concatenation; ``C`` the rotation in
``[B, H, S, D]`` layout (a transpose before or after the norm); ``D`` 2x2 rotation-matrix
tables; ``E`` float64/complex128 tables or q/k upcast to float64 for the rotation;
``hidden`` the norm across heads (Wan); ``complex`` a complex multiply; ``per_stream`` text and
image streams rotated each with its own tables, then concatenated; ``partial_seq`` only some
tokens rotated (text tokens passed through); ``graph_break`` Dynamo breaks the graph between the
norm and the rotation; ``layer_norm`` / ``no_norm``: LayerNorm or no norm on q and k (RoPE only).
``none``: no QK-norm + RoPE (a negative control).
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

H, D = 2, 16  # heads, head dim: every model below
WIDTH = H * D


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _build(cls_name: str, seed: int = 0, **config: Any) -> nn.Module:
    import diffusers

    from .diffusers_models import _perturb_norm_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, cls_name)(**config)
    _perturb_norm_weights(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


# --- the models: (model, kwargs) each ------------------------------------------------------


def flux(g):
    model = _build("FluxTransformer2DModel", in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=D,
                   num_attention_heads=H, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       pooled_projections=_randn(g, 1, 12), timestep=torch.tensor([0.5]),
                       img_ids=img_ids.reshape(12, 3), txt_ids=torch.zeros(5, 3), return_dict=False)


def chroma(g):
    model = _build("ChromaTransformer2DModel", in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=D,
                   num_attention_heads=H, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
                   approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([0.5]), img_ids=img_ids.reshape(12, 3), txt_ids=torch.zeros(5, 3),
                       return_dict=False)


def flux2(g):
    model = _build("Flux2Transformer2DModel", in_channels=8, num_layers=1,
                   num_single_layers=1, attention_head_dim=D, num_attention_heads=H, joint_attention_dim=24,
                   timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    t, hh, ww = torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([t, hh, ww, torch.zeros_like(t)], -1).reshape(1, 12, 4)
    txt_ids = torch.stack([torch.zeros(5)] * 3 + [torch.arange(5.0)], -1)[None]
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def hunyuan_video(g):
    model = _build("HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=H,
                   attention_head_dim=D, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                   text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(4, 6, 6), guidance_embeds=False)
    return model, dict(hidden_states=_randn(g, 1, 4, 2, 2, 3), timestep=torch.tensor([500]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), encoder_attention_mask=torch.ones(1, 5),
                       pooled_projections=_randn(g, 1, 12), return_dict=False)


def qwenimage(g):
    model = _build("QwenImageTransformer2DModel", patch_size=1, in_channels=8, out_channels=8, num_layers=1,
                   attention_head_dim=D, num_attention_heads=H, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.5]),
                       img_shapes=[(1, 3, 4)], return_dict=False)


def ltx(g):
    model = _build("LTXVideoTransformer3DModel", in_channels=8, out_channels=8, num_attention_heads=H,
                   attention_head_dim=D, cross_attention_dim=WIDTH, num_layers=1, caption_channels=24)
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 5), num_frames=1,
                       height=3, width=4, return_dict=False)


def cogvideox(g):
    # CogVideoX 1.5-style: rotary embeddings, given by the pipeline as [S, D] cos/sin.
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    model = _build("CogVideoXTransformer3DModel", num_attention_heads=H, attention_head_dim=D, in_channels=4,
                   out_channels=4, time_embed_dim=16, text_embed_dim=24, num_layers=1, sample_width=4,
                   sample_height=4, sample_frames=5, patch_size=2, max_text_seq_length=5,
                   use_rotary_positional_embeddings=True)
    cos, sin = get_3d_rotary_pos_embed(D, ((0, 0), (2, 2)), (2, 2), 2)
    return model, dict(hidden_states=_randn(g, 1, 2, 4, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([500]), image_rotary_emb=(cos, sin), return_dict=False)


def mochi(g):
    model = _build("MochiTransformer3DModel", patch_size=2, num_attention_heads=H, attention_head_dim=D, num_layers=1,
                   pooled_projection_dim=16, in_channels=4, text_embed_dim=24, time_embed_dim=8,
                   max_sequence_length=5)
    return model, dict(hidden_states=_randn(g, 1, 4, 2, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 5), return_dict=False)


def lumina2(g):
    model = _build("Lumina2Transformer2DModel", sample_size=4, patch_size=2, in_channels=4, hidden_size=WIDTH,
                   num_layers=1, num_refiner_layers=1, num_attention_heads=H, num_kv_heads=1, multiple_of=16,
                   axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=24)
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), encoder_attention_mask=torch.ones(1, 5).bool(),
                       return_dict=False)


def hidream(g):
    model = _build("HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                   num_single_layers=1, attention_head_dim=D, num_attention_heads=H, caption_channels=[24, 24],
                   text_emb_dim=12, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(4, 6, 6),
                   max_resolution=(8, 8), llama_layers=[0, 0])
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), timesteps=torch.tensor([500]),
                       encoder_hidden_states_t5=_randn(g, 1, 5, 24), encoder_hidden_states_llama3=_randn(g, 2, 1, 5, 24),
                       pooled_embeds=_randn(g, 1, 12), return_dict=False)


def _wan_like(cls_name, g):
    model = _build(cls_name, patch_size=(1, 2, 2), num_attention_heads=H, attention_head_dim=D, in_channels=4,
                   out_channels=4, text_dim=24, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    return model, dict(hidden_states=_randn(g, 1, 4, 2, 4, 4), timestep=torch.tensor([500]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), return_dict=False)


def wan(g):
    return _wan_like("WanTransformer3DModel", g)


def skyreels_v2(g):
    return _wan_like("SkyReelsV2Transformer3DModel", g)


def cosmos(g):
    model = _build("CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=H,
                   attention_head_dim=D, num_layers=1, mlp_ratio=2.0, text_embed_dim=24, adaln_lora_dim=8,
                   max_size=(4, 8, 8), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
                   concat_padding_mask=False)
    return model, dict(hidden_states=_randn(g, 1, 4, 2, 4, 4), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), return_dict=False)


def cogview4(g):
    model = _build("CogView4Transformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                   attention_head_dim=D, num_attention_heads=H, text_embed_dim=24, time_embed_dim=8,
                   condition_dim=4, pos_embed_max_size=8, sample_size=8, rope_axes_dim=(8, 8))
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([500]), original_size=torch.tensor([[32.0, 32.0]]),
                       target_size=torch.tensor([[32.0, 32.0]]), crop_coords=torch.tensor([[0.0, 0.0]]),
                       return_dict=False)


def hunyuan_dit(g):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    model = _build("HunyuanDiT2DModel", num_attention_heads=H, attention_head_dim=D, in_channels=4, patch_size=2,
                   sample_size=4, hidden_size=WIDTH, num_layers=1, cross_attention_dim=24, cross_attention_dim_t5=24,
                   pooled_projection_dim=12, text_len=5, text_len_t5=5, use_style_cond_and_image_meta_size=False)
    rotary = get_2d_rotary_pos_embed(D, ((0, 0), (2, 2)), (2, 2))
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), timestep=torch.tensor([500.0]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), text_embedding_mask=torch.ones(1, 5),
                       encoder_hidden_states_t5=_randn(g, 1, 5, 24), text_embedding_mask_t5=torch.ones(1, 5),
                       image_rotary_emb=rotary, return_dict=False)


def allegro(g):
    model = _build("AllegroTransformer3DModel", patch_size=2, patch_size_t=1, num_attention_heads=H,
                   attention_head_dim=24, in_channels=4, out_channels=4, num_layers=1, cross_attention_dim=48,
                   sample_height=4, sample_width=4, sample_frames=2, caption_channels=24)
    return model, dict(hidden_states=_randn(g, 1, 4, 2, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([500]), return_dict=False)


def sd3(g):  # qk norm, no RoPE: a negative control
    model = _build("SD3Transformer2DModel", sample_size=4, patch_size=2, in_channels=4, num_layers=1,
                   attention_head_dim=D, num_attention_heads=H, joint_attention_dim=24, caption_projection_dim=WIDTH,
                   pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm")
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       pooled_projections=_randn(g, 1, 12), timestep=torch.tensor([500]), return_dict=False)


def pixart(g):  # no qk norm, no RoPE: a negative control
    model = _build("PixArtTransformer2DModel", num_attention_heads=H, attention_head_dim=D, in_channels=4,
                   out_channels=4, num_layers=1, norm_num_groups=4, cross_attention_dim=WIDTH, sample_size=4,
                   patch_size=2, caption_channels=24)
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                       return_dict=False)


def sana(g):  # linear attention, no RoPE: a negative control
    model = _build("SanaTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=H,
                   attention_head_dim=D, num_layers=1, num_cross_attention_heads=H, cross_attention_head_dim=D,
                   cross_attention_dim=WIDTH, caption_channels=24, sample_size=4, patch_size=2)
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([500]), return_dict=False)


@dataclasses.dataclass(frozen=True)
class Entry:
    build: Callable[[torch.Generator], tuple[nn.Module, dict]]
    forms: tuple[str, ...]  # QK-norm + RoPE forms in its attention (see the module docstring)


ZOO: dict[str, Entry] = {
    "flux": Entry(flux, ("A", "B")),
    "chroma": Entry(chroma, ("A", "B")),
    "flux2": Entry(flux2, ("A", "B")),
    "hunyuan_video": Entry(hunyuan_video, ("A", "partial_seq", "B")),
    "qwenimage": Entry(qwenimage, ("complex", "per_stream")),
    "ltx": Entry(ltx, ("hidden", "A")),
    "cogvideox": Entry(cogvideox, ("C", "A", "partial_seq", "layer_norm")),
    "mochi": Entry(mochi, ("bshd", "graph_break")),
    "lumina2": Entry(lumina2, ("complex", "E")),
    "hidream": Entry(hidream, ("D",)),
    "wan": Entry(wan, ("hidden",)),
    "skyreels_v2": Entry(skyreels_v2, ("hidden",)),
    "cosmos": Entry(cosmos, ("C",)),
    "cogview4": Entry(cogview4, ("C", "partial_seq", "layer_norm")),
    "hunyuan_dit": Entry(hunyuan_dit, ("C", "A", "layer_norm")),
    "allegro": Entry(allegro, ("C", "no_norm")),
    "sd3": Entry(sd3, ("none",)),
    "pixart": Entry(pixart, ("none",)),
    "sana": Entry(sana, ("none",)),
}


# --- the check ------------------------------------------------------------------------------


def _floats(value: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check(model: nn.Module, kwargs: dict, dtype: torch.dtype = torch.float32, inductor: bool = False) -> dict:
    """Compile ``model`` with diffopt (``qk_norm_rope`` on for CPU) and run it on ``kwargs`` next to eager.

    Returns ``fired`` (qk_norm_rope rewrites), ``declined`` (its reasons, deduplicated), ``error`` (max
    |compiled - eager| over max |eager|, over all float outputs) and ``raised`` (a pass that raised)."""
    import diffopt
    from diffopt.testing import cast_floats

    model = model.to(dtype)
    kwargs = cast_floats(kwargs, dtype)
    options = {"passes": {"qk_norm_rope": {"devices": ["cpu", "cuda"]}}, "inductor": inductor}
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(**kwargs)
        report = diffopt.explain(model, options=options, **kwargs)
    torch._dynamo.reset()
    got = report.output
    errors = []
    for g, w in zip(_floats(got), _floats(want)):
        scale = w.double().abs().max().item() or 1.0
        errors.append((g.double() - w.double()).abs().max().item() / scale)
    raised = [run.error for run in report.runs if run.error and run.pass_name == "qk_norm_rope"]
    return {
        "fired": report.matches("qk_norm_rope"),
        "declined": sorted({d.reason for d in report.declines if d.pass_name == "qk_norm_rope"}),
        "error": max(errors) if errors else float("nan"),
        "raised": raised,
    }


def load(spec: str) -> Callable[[torch.Generator], tuple[nn.Module, dict]]:
    """A builder by zoo name, or ``module:function`` returning (model, kwargs) from a torch.Generator."""
    if spec in ZOO:
        return ZOO[spec].build
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
