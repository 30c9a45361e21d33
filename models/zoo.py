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
``D_sum``: 2x2 rotation-matrix tables applied as ``(M * x_).sum(-1)`` (Kandinsky); ``feature_map``: a
ReLU (linear attention's feature map) between the norm and the rotation; ``per_head_tables``: tables that
differ per head (LTX-2 split RoPE); ``partial_dim``: only the first channels of each head rotated;
``data_dependent_len``: the rotated token count is read from a tensor (``.item()``); ``cross_tables``: q
and k of a cross-attention rotated by different tables.
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
    _fill_zero_init(model, torch.Generator().manual_seed(seed + 2))
    return model.eval()


def _fill_zero_init(model: nn.Module, generator: torch.Generator) -> None:
    # Zero-initialised weights (adaLN-zero modulation, output projections: PRX, Kandinsky, ERNIE-Image,
    # LongCat-Audio) make the attention invisible in the output, and a numerics check that cannot fail.
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and not param.any():
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _image_ids() -> torch.Tensor:
    """Flux-style (t, h, w) ids of a 3 x 4 latent: [12, 3]."""
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    return ids.reshape(12, 3)


# --- the models: (model, kwargs) each ------------------------------------------------------


def flux(g):
    model = _build("FluxTransformer2DModel", in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=D,
                   num_attention_heads=H, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       pooled_projections=_randn(g, 1, 12), timestep=torch.tensor([0.5]),
                       img_ids=_image_ids(), txt_ids=torch.zeros(5, 3), return_dict=False)


def chroma(g):
    model = _build("ChromaTransformer2DModel", in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=D,
                   num_attention_heads=H, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
                   approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1)
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([0.5]), img_ids=_image_ids(), txt_ids=torch.zeros(5, 3),
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


def _wan_like(cls_name, g, **config):
    model = _build(cls_name, patch_size=(1, 2, 2), num_attention_heads=H, attention_head_dim=D, in_channels=4,
                   out_channels=4, text_dim=24, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32, **config)
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


# --- issue 12 reach: the other diffusers transformers with QK-norm + RoPE ---------------------


def prx(g):
    model = _build("PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=24, hidden_size=WIDTH,
                   mlp_ratio=2.0, num_heads=H, depth=1, axes_dim=[8, 8])
    return model, dict(hidden_states=_randn(g, 1, 4, 6, 8), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), attention_mask=torch.ones(1, 5).bool(),
                       return_dict=False)


def _flux_like(cls_name, g, **config):
    model = _build(cls_name, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=D,
                   num_attention_heads=H, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), **config)
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([0.5]), img_ids=_image_ids(), txt_ids=torch.zeros(5, 3),
                       return_dict=False)


def bria(g):
    return _flux_like("BriaTransformer2DModel", g)


def bria_fibo(g):
    model, kwargs = _flux_like("BriaFiboTransformer2DModel", g, text_encoder_dim=24)
    return model, dict(kwargs, text_encoder_layers=[_randn(g, 1, 5, 24) for _ in range(2)])


def longcat_image(g):
    return _flux_like("LongCatImageTransformer2DModel", g, pooled_projection_dim=24)


def ovis_image(g):
    return _flux_like("OvisImageTransformer2DModel", g, out_channels=8)


def flux3(g):
    model = _build("Flux3Transformer2DModel", in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1,
                   attention_head_dim=D, num_attention_heads=H, joint_attention_dim=24, timestep_channels=16,
                   mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4))
    t, hh, ww = torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([t, hh, ww, torch.zeros_like(t)], -1).reshape(12, 4)
    txt_ids = torch.stack([torch.zeros(5)] * 3 + [torch.arange(5.0)], -1)
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def bria_fibo2(g):
    model = _build("BriaFibo2Transformer2DModel", in_channels=4, patch_size=2, dim=WIDTH, n_layers=1,
                   n_refiner_layers=1, n_heads=H, cap_feat_dim=24, injection_layer_ids=(0,), perceiver_num_layers=1,
                   min_num_gist_tokens=2, max_num_gist_tokens=4, gist_step=2, gist_min_text_len=2,
                   gist_max_text_len=8, axes_dims=(4, 6, 6), axes_lens=(64, 64, 64))
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 6), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(g, 1, 2, 5, 24), return_dict=False)


def z_image(g):
    model = _build("ZImageTransformer2DModel", in_channels=4, dim=WIDTH, n_layers=1, n_refiner_layers=1, n_heads=H,
                   n_kv_heads=H, cap_feat_dim=24, axes_dims=[4, 6, 6], axes_lens=[64, 64, 64])
    return model, dict(x=[_randn(g, 4, 1, 4, 6)], t=torch.tensor([0.5]), cap_feats=[_randn(g, 5, 24)],
                       return_dict=False)


def qwenimage21(g):
    model = _build("QwenImage21Transformer2DModel", patch_size=1, in_channels=8, out_channels=8, num_layers=1,
                   attention_head_dim=D, num_attention_heads=H, context_in_dim=24, axes_dims_rope=(4, 6, 6))
    # the vision-language sequence: 5 text slots, then 3 image slots of 2 x 2 latent tokens each
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 24),
                       encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.5]),
                       img_shapes=[[(1, 3, 4)]], img_mask=torch.tensor([[False] * 5 + [True] * 3]),
                       return_dict=False)


def nucleus_moe(g):
    model = _build("NucleusMoEImageTransformer2DModel", patch_size=1, in_channels=8, out_channels=8, num_layers=2,
                   attention_head_dim=D, num_attention_heads=H, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
                   mlp_ratio=2.0, moe_enabled=False)
    return model, dict(hidden_states=_randn(g, 1, 12, 8), img_shapes=[(1, 3, 4)],
                       encoder_hidden_states=_randn(g, 1, 5, 24), encoder_hidden_states_mask=torch.ones(1, 5),
                       timestep=torch.tensor([0.5]), return_dict=False)


def _text_and_image_positions() -> torch.Tensor:
    """(t, h, w) positions of 5 text tokens (all 0) then a 3 x 4 image: [17, 3]."""
    return torch.cat([torch.zeros(5, 3), _image_ids()])


def krea2(g):
    model = _build("Krea2Transformer2DModel", in_channels=8, num_layers=1, attention_head_dim=D, num_attention_heads=H,
                   num_key_value_heads=1, intermediate_size=64, timestep_embed_dim=16, text_hidden_dim=24,
                   num_text_layers=2, text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
                   num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))
    return model, dict(hidden_states=_randn(g, 1, 12, 8), encoder_hidden_states=_randn(g, 1, 5, 2, 24),
                       timestep=torch.tensor([0.5]), position_ids=_text_and_image_positions(), return_dict=False)


def ideogram4(g):
    from diffusers.models.transformers.transformer_ideogram4 import (IMAGE_POSITION_OFFSET, LLM_TOKEN_INDICATOR,
                                                                     OUTPUT_IMAGE_INDICATOR)

    model = _build("Ideogram4Transformer2DModel", in_channels=8, num_layers=1, attention_head_dim=D,
                   num_attention_heads=H, intermediate_size=64, adaln_dim=16, llm_features_dim=24,
                   mrope_section=(4, 2, 2))
    positions = torch.cat([torch.arange(5.0)[:, None].expand(5, 3), _image_ids() + IMAGE_POSITION_OFFSET])
    indicator = torch.tensor([[LLM_TOKEN_INDICATOR] * 5 + [OUTPUT_IMAGE_INDICATOR] * 12])
    return model, dict(hidden_states=_randn(g, 1, 17, 8), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(g, 1, 17, 24), position_ids=positions.long()[None],
                       segment_ids=torch.zeros(1, 17, dtype=torch.long), indicator=indicator, return_dict=False)


def ernie_image(g):
    model = _build("ErnieImageTransformer2DModel", hidden_size=WIDTH, num_attention_heads=H, num_layers=1,
                   ffn_hidden_size=64, in_channels=4, out_channels=4, patch_size=1, text_in_dim=24,
                   rope_axes_dim=(4, 6, 6))
    return model, dict(hidden_states=_randn(g, 1, 4, 3, 4), timestep=torch.tensor([0.5]),
                       text_bth=_randn(g, 1, 5, 24), text_lens=torch.tensor([5]), return_dict=False)


def _hunyuan_inputs(g, **extra):
    return dict(hidden_states=_randn(g, 1, 4, 2, 2, 3), timestep=torch.tensor([500.0]),
                encoder_hidden_states=_randn(g, 1, 5, 24), encoder_attention_mask=torch.ones(1, 5),
                return_dict=False, **extra)


def hunyuan_video15(g):
    model = _build("HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=H,
                   attention_head_dim=D, num_layers=1, num_refiner_layers=1, text_embed_dim=24, text_embed_2_dim=24,
                   image_embed_dim=24, rope_axes_dim=(4, 6, 6), task_type="t2v")
    return model, _hunyuan_inputs(g, encoder_hidden_states_2=_randn(g, 1, 5, 24),
                                  encoder_attention_mask_2=torch.ones(1, 5), image_embeds=_randn(g, 1, 3, 24))


def hunyuan_image(g):
    model = _build("HunyuanImageTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=H,
                   attention_head_dim=D, num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=24,
                   rope_axes_dim=(8, 8))
    kwargs = _hunyuan_inputs(g)
    return model, dict(kwargs, hidden_states=kwargs["hidden_states"][:, :, 0])


def hunyuan_framepack(g):
    model = _build("HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=H,
                   attention_head_dim=D, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                   text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(4, 6, 6), guidance_embeds=False,
                   image_proj_dim=24, has_image_proj=True, has_clean_x_embedder=True)
    # diffusers 0.42 needs all three history inputs once the clean-latent embedder exists
    return model, dict(hidden_states=_randn(g, 1, 4, 1, 8, 8), timestep=torch.tensor([500]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), encoder_attention_mask=torch.ones(1, 5),
                       pooled_projections=_randn(g, 1, 12), image_embeds=_randn(g, 1, 3, 24),
                       indices_latents=torch.tensor([7]), latents_clean=_randn(g, 1, 4, 1, 8, 8),
                       indices_latents_clean=torch.tensor([0]), latents_history_2x=_randn(g, 1, 4, 2, 8, 8),
                       indices_latents_history_2x=torch.tensor([1, 2]), latents_history_4x=_randn(g, 1, 4, 4, 8, 8),
                       indices_latents_history_4x=torch.tensor([3, 4, 5, 6]), return_dict=False)


def motif_video(g):
    model = _build("MotifVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=H,
                   attention_head_dim=D, num_layers=1, num_single_layers=1, patch_size=1, text_embed_dim=24,
                   rope_axes_dim=(4, 6, 6))
    return model, _hunyuan_inputs(g)


def joyimage(g):
    model = _build("JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=WIDTH,
                   num_attention_heads=H, text_dim=24, num_layers=1, rope_dim_list=[4, 6, 6])
    return model, dict(hidden_states=_randn(g, 1, 4, 2, 4, 4), timestep=torch.tensor([500]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), return_dict=False)


def joyimage_edit_plus(g):
    model = _build("JoyImageEditPlusTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=WIDTH,
                   num_attention_heads=H, text_dim=24, num_layers=1, rope_dim_list=[4, 6, 6])
    # packed patches [B, tokens, C, pt, ph, pw] of one 1 x 2 x 2 component
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 1, 2, 2), timestep=torch.tensor([500]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), shape_list=[[(1, 2, 2)]], return_dict=False)


def chronoedit(g):
    return _wan_like("ChronoEditTransformer3DModel", g)


def wan_vace(g):
    model, kwargs = _wan_like("WanVACETransformer3DModel", g, vace_layers=[0], vace_in_channels=4)
    return model, dict(kwargs, control_hidden_states=_randn(g, 1, 4, 2, 4, 4))


def wan_animate(g):
    model = _build("WanAnimateTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=H, attention_head_dim=D,
                   in_channels=12, latent_channels=4, out_channels=4, text_dim=24, freq_dim=16, ffn_dim=32,
                   num_layers=1, image_dim=24, rope_max_seq_len=32, motion_encoder_size=16, motion_style_dim=16,
                   motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
                   inject_face_latents_blocks=1)
    return model, dict(hidden_states=_randn(g, 1, 12, 2, 4, 4), timestep=torch.tensor([500]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), encoder_hidden_states_image=_randn(g, 1, 3, 24),
                       pose_hidden_states=_randn(g, 1, 4, 1, 4, 4), face_pixel_values=_randn(g, 1, 3, 1, 16, 16),
                       return_dict=False)


def anyflow(g):
    model, kwargs = _wan_like("AnyFlowTransformer3DModel", g)
    return model, dict(kwargs, hidden_states=kwargs["hidden_states"].transpose(1, 2),  # [B, F, C, H, W]
                       timestep=torch.tensor([[500, 500]]), r_timestep=torch.tensor([[250, 250]]))


def helios(g):
    model = _build("HeliosTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=H, attention_head_dim=D,
                   in_channels=4, out_channels=4, text_dim=24, freq_dim=16, ffn_dim=32, num_layers=1,
                   rope_dim=(4, 6, 6), has_multi_term_memory_patch=False)
    return model, dict(hidden_states=_randn(g, 1, 4, 2, 4, 4), timestep=torch.tensor([500]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), return_dict=False)


def sana_video(g):  # linear attention: ReLU between the norm and the rotation
    model = _build("SanaVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=H,
                   attention_head_dim=D, num_layers=1, num_cross_attention_heads=H, cross_attention_head_dim=D,
                   cross_attention_dim=WIDTH, caption_channels=24, sample_size=4, patch_size=(1, 2, 2),
                   rope_max_seq_len=32)
    return model, dict(hidden_states=_randn(g, 1, 4, 2, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([500]), return_dict=False)


def _ltx2(g, **config):
    model = _build("LTX2VideoTransformer3DModel", in_channels=8, out_channels=8, num_attention_heads=H,
                   attention_head_dim=D, cross_attention_dim=WIDTH, audio_in_channels=4, audio_out_channels=4,
                   audio_num_attention_heads=H, audio_attention_head_dim=8, audio_cross_attention_dim=16,
                   num_layers=1, caption_channels=24, **config)
    return model, dict(hidden_states=_randn(g, 1, 12, 8), audio_hidden_states=_randn(g, 1, 4, 4),
                       encoder_hidden_states=_randn(g, 1, 5, 24), audio_encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.full((1, 12), 500.0), audio_timestep=torch.tensor([500.0]),
                       encoder_attention_mask=torch.ones(1, 5), audio_encoder_attention_mask=torch.ones(1, 5),
                       num_frames=1, height=3, width=4, audio_num_frames=4, return_dict=False)


def ltx2(g):
    return _ltx2(g)


def ltx2_split(g):  # split RoPE: per-head tables, applied by in-place addcmul_
    return _ltx2(g, rope_type="split", rope_double_precision=False)


def kandinsky5(g):
    model = _build("Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=24, in_text_dim2=12, time_dim=16,
                   out_visual_dim=4, model_dim=WIDTH, ff_dim=64, num_text_blocks=1, num_visual_blocks=1,
                   axes_dims=(4, 6, 6))
    return model, dict(hidden_states=_randn(g, 1, 2, 4, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       timestep=torch.tensor([500.0]), pooled_projections=_randn(g, 1, 12),
                       visual_rope_pos=[torch.arange(2), torch.arange(2), torch.arange(2)],
                       text_rope_pos=torch.arange(5), return_dict=False)


def kandinsky6(g):
    model = _build("Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=24, in_text_dim2=12,
                   time_dim=16, model_dim=WIDTH, ff_dim=64, num_text_blocks=1, num_visual_blocks=1,
                   axes_dims=(4, 6, 6), visual_cond=False, in_audio_dim=4, out_audio_dim=4)
    return model, dict(hidden_states=_randn(g, 1, 2, 4, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       pooled_projections=_randn(g, 1, 12), timestep=torch.tensor([500.0]), return_dict=False)


def minimax_h3(g):
    # head dim 24: its rotary tables are 2 * 3 * rope_freq_dim wide
    model = _build("MiniMaxH3Transformer3DModel", num_attention_heads=H, attention_head_dim=24, hidden_size=48,
                   num_layers=1, num_refiner_layers=1, ffn_dim=64, in_channels=4, audio_in_channels=4,
                   patch_size=(1, 2, 2), text_dim=24, freq_dim=16, time_embed_hidden_dim=32, time_embed_dim=16,
                   rope_freq_dim=4)
    n_text, n_video, n_audio = 5, 8, 3  # one packed sequence: text, video (2 x 2 x 2), audio rows
    seq = n_text + n_video + n_audio
    video = torch.stack(torch.meshgrid(*[torch.arange(2.0)] * 3, indexing="ij"), -1).reshape(n_video, 3) + 1
    positions = torch.cat([torch.zeros(n_text, 3), video, torch.arange(n_audio)[:, None].expand(n_audio, 3)])
    return model, dict(hidden_states=_randn(g, 1, n_video, 16), audio_hidden_states=_randn(g, 1, n_audio, 4),
                       encoder_hidden_states=_randn(g, 1, n_text, 24), timestep=torch.tensor([0.5]),
                       timestep_indices=torch.zeros(seq, dtype=torch.long),
                       token_tags=torch.tensor([1] * n_text + [0] * n_video + [2] * n_audio),
                       position_ids=positions.long(), text_indices=torch.arange(n_text),
                       video_indices=torch.arange(n_text, n_text + n_video),
                       audio_indices=torch.arange(n_text + n_video, seq), return_dict=False)


def stable_audio3(g):
    model = _build("StableAudio3DiTModel", io_channels=8, patch_size=1, embed_dim=WIDTH, depth=1, num_heads=H,
                   cond_token_dim=24, global_cond_dim=12, local_add_cond_dim=4, timestep_features_dim=16,
                   ff_mult=2.0, num_memory_tokens=4)
    return model, dict(hidden_states=_randn(g, 1, 8, 12), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), global_hidden_states=_randn(g, 1, 12),
                       return_dict=False)


def ace_step(g):
    model = _build("AceStepTransformer1DModel", hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=H, num_key_value_heads=1, head_dim=D, in_channels=12,
                   audio_acoustic_hidden_dim=4, patch_size=2, sliding_window=4)
    return model, dict(hidden_states=_randn(g, 1, 12, 4), timestep=torch.tensor([0.5]),
                       timestep_r=torch.tensor([0.25]), encoder_hidden_states=_randn(g, 1, 5, WIDTH),
                       context_latents=_randn(g, 1, 12, 8), return_dict=False)


def longcat_audio(g):
    model = _build("LongCatAudioDiTTransformer", dit_dim=WIDTH, dit_depth=1, dit_heads=H, dit_text_dim=24,
                   latent_dim=4, ff_mult=2.0)
    return model, dict(hidden_states=_randn(g, 1, 12, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool), timestep=torch.tensor([0.5]),
                       latent_cond=_randn(g, 1, 12, 4), return_dict=False)


def easyanimate(g):  # LayerNorm on q and k
    model = _build("EasyAnimateTransformer3DModel", num_attention_heads=H, attention_head_dim=D, in_channels=4,
                   out_channels=4, patch_size=2, sample_width=4, sample_height=4, num_layers=1, mmdit_layers=1,
                   time_embed_dim=16, text_embed_dim=24)
    return model, dict(hidden_states=_randn(g, 1, 4, 2, 4, 4), timestep=torch.tensor([500]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), return_dict=False)


def glm_image(g):  # LayerNorm on q and k
    model = _build("GlmImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                   attention_head_dim=D, num_attention_heads=H, text_embed_dim=24, time_embed_dim=8, condition_dim=4,
                   prior_vq_quantizer_codebook_size=16)
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), encoder_hidden_states=_randn(g, 1, 5, 24),
                       prior_token_id=torch.randint(0, 16, (1, 4), generator=g),
                       prior_token_drop=torch.zeros(1, dtype=torch.bool), timestep=torch.tensor([500]),
                       target_size=torch.tensor([[32.0, 32.0]]), crop_coords=torch.tensor([[0.0, 0.0]]),
                       return_dict=False)


def lumina_next(g):  # LayerNorm across heads on q and k
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    model = _build("LuminaNextDiT2DModel", sample_size=4, patch_size=2, in_channels=4, hidden_size=WIDTH, num_layers=1,
                   num_attention_heads=H, num_kv_heads=H, multiple_of=16, cross_attention_dim=24, learn_sigma=False)
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=_randn(g, 1, 5, 24), encoder_mask=torch.ones(1, 5),
                       image_rotary_emb=get_2d_rotary_pos_embed_lumina(D, 8, 8), cross_attention_kwargs={},
                       return_dict=False)


def omnigen(g):  # RoPE, no q/k norm: a negative control
    model = _build("OmniGenTransformer2DModel", in_channels=4, patch_size=2, hidden_size=WIDTH, num_attention_heads=H,
                   num_key_value_heads=H, intermediate_size=64, num_layers=1, vocab_size=64, pad_token_id=0,
                   max_position_embeddings=256, original_max_position_embeddings=64, pos_embed_max_size=8,
                   rope_scaling={"short_factor": [1.0] * (D // 2), "long_factor": [2.0] * (D // 2)},
                   time_step_dim=16)
    tokens = 5 + 1 + 4  # text, time, image
    return model, dict(hidden_states=_randn(g, 1, 4, 4, 4), timestep=torch.tensor([0.5]),
                       input_ids=torch.randint(0, 64, (1, 5), generator=g), input_img_latents=[],
                       input_image_sizes={}, attention_mask=torch.ones(1, tokens, tokens),
                       position_ids=torch.arange(tokens)[None], return_dict=False)


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
    # issue 12 reach: the rest of diffusers' transformers with q/k RMSNorm + RoPE
    "prx": Entry(prx, ("C", "D")),
    "bria": Entry(bria, ("A", "B")),
    "bria_fibo": Entry(bria_fibo, ("A", "B")),
    "longcat_image": Entry(longcat_image, ("A", "B")),
    "ovis_image": Entry(ovis_image, ("A", "B")),
    "flux3": Entry(flux3, ("A",)),
    "bria_fibo2": Entry(bria_fibo2, ("complex",)),
    "z_image": Entry(z_image, ("complex",)),
    "qwenimage21": Entry(qwenimage21, ("complex",)),
    "nucleus_moe": Entry(nucleus_moe, ("complex", "per_stream")),
    "krea2": Entry(krea2, ("A",)),
    "ideogram4": Entry(ideogram4, ("bshd",)),
    "ernie_image": Entry(ernie_image, ("bshd",)),
    "hunyuan_video15": Entry(hunyuan_video15, ("A",)),
    "hunyuan_image": Entry(hunyuan_image, ("A", "partial_seq")),
    "hunyuan_framepack": Entry(hunyuan_framepack, ("A", "partial_seq", "data_dependent_len")),
    "motif_video": Entry(motif_video, ("A", "partial_seq")),
    "joyimage": Entry(joyimage, ("A",)),
    "joyimage_edit_plus": Entry(joyimage_edit_plus, ("A",)),
    "chronoedit": Entry(chronoedit, ("hidden",)),
    "wan_vace": Entry(wan_vace, ("hidden",)),
    "wan_animate": Entry(wan_animate, ("hidden",)),
    "helios": Entry(helios, ("hidden",)),
    "anyflow": Entry(anyflow, ("hidden", "E")),
    "sana_video": Entry(sana_video, ("hidden", "feature_map")),
    "ltx2": Entry(ltx2, ("hidden", "A")),
    "ltx2_split": Entry(ltx2_split, ("hidden", "per_head_tables")),
    "kandinsky5": Entry(kandinsky5, ("D_sum",)),
    "kandinsky6": Entry(kandinsky6, ("D_sum",)),
    "minimax_h3": Entry(minimax_h3, ("bshd",)),
    "stable_audio3": Entry(stable_audio3, ("bshd", "partial_dim")),
    "ace_step": Entry(ace_step, ("bshd",)),
    "longcat_audio": Entry(longcat_audio, ("hidden", "cross_tables")),
    "easyanimate": Entry(easyanimate, ("C", "partial_seq", "layer_norm")),
    "glm_image": Entry(glm_image, ("partial_seq", "layer_norm")),
    "lumina_next": Entry(lumina_next, ("complex", "layer_norm")),
    "omnigen": Entry(omnigen, ("no_norm",)),
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
