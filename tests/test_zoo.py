"""The zoo (issue 12): stock diffusers transformers at tiny configs, random weights, through diffopt.

Each model fires ``qk_norm_rope`` as often as its attention has fusable QK-norm + RoPE sites (``FIRES``:
rewrites per model, a joint-attention block counting once), negative controls never, and every compiled
model agrees with eager. ``python scripts/zoo.py`` prints the same check as a table, also for models not
listed here (``--model module:function``).
"""
import pytest
import torch

pytest.importorskip("diffusers")

from diffopt.models import zoo  # noqa: E402

# Rewrites per model (each fuses q and k of one attention). Where a model has QK-norm + RoPE that is not
# fused, the comment says why.
FIRES = {
    "flux": 2,  # double block (joint: cat of text and image, then RoPE) + single block
    "chroma": 2,
    "flux2": 2,
    "hunyuan_video": 2,  # double block; single block: image tokens rotated, text concatenated unrotated
    "qwenimage": 2,  # image and text streams, each with its own tables
    "ltx": 1,  # across-heads norm, per-channel interleaved tables
    "wan": 1,
    "skyreels_v2": 1,
    "cosmos": 1,  # [B, H, S, D] rotation
    # Their token-slice RoPE (q[:, :, text:] = rope(q[:, :, text:])) is recognised, but both norm q and k with
    # nn.LayerNorm (qk_norm="layer_norm" hard-wired in diffusers), not RMSNorm: nothing for the op to fuse.
    "cogvideox": 0,
    "cogview4": 0,
    "hunyuan_dit": 0,  # LayerNorm on q and k, not RMSNorm
    "allegro": 0,  # no q/k norm
    "mochi": 0,  # a graph break between the norm and the rotation (data-dependent token selection)
    "lumina2": 0,  # complex128 freqs: the rotation is float64 (class E declines)
    "hidream": 0,  # class D is recognised, but the MoE's graph break makes freqs a graph input (unprovable)
    "sd3": 0,  # negative controls: no RoPE
    "pixart": 0,
    "sana": 0,
    # issue 12 reach
    "prx": 1,  # image q and k, [B, H, S, D], 2x2 rotation-matrix tables (class D); text keys are normed, not rotated
    "bria": 2,
    "bria_fibo": 2,
    "longcat_image": 2,
    "ovis_image": 2,
    "flux3": 3,  # text-mode and image-mode double blocks, single block
    "bria_fibo2": 2,  # noise refiner, main layer
    "z_image": 3,  # noise refiner, context refiner, main layer
    "qwenimage21": 1,
    "nucleus_moe": 3,  # image q/k of each block; the text keys (k only) of the two blocks, paired (same tables)
    "krea2": 1,  # the text-fusion blocks have no RoPE
    "ideogram4": 1,
    "ernie_image": 1,
    "hunyuan_video15": 1,
    "hunyuan_image": 2,  # double block; single block (image tokens rotated, text tokens passed through)
    # double block; the single block's text length is data-dependent (encoder_attention_mask.sum() read with
    # .item()), so the token slice's bounds are unknown at compile time: it declines
    "hunyuan_framepack": 1,
    "motif_video": 2,
    "joyimage": 1,
    "joyimage_edit_plus": 1,
    "chronoedit": 1,
    "wan_vace": 2,  # main block + VACE block
    "wan_animate": 1,
    "helios": 1,
    "ltx2": 4,  # video and audio self-attention; audio<->video cross-attention (q and k of each direction read
    # different tables: the pass pairs the two directions' sites that share tables)
    "ace_step": 2,
    "stable_audio3": 2,  # differential attention: two q/k pairs, each with RoPE on the first channels
    "minimax_h3": 1,  # the text refiner has no RoPE
    "longcat_audio": 1,  # self-attention; cross-attention rotates q and k by different tables: no partner
    "anyflow": 0,  # float64 rotation (class E declines)
    "sana_video": 0,  # linear attention: a ReLU between the norm and the rotation, nothing to fuse
    "ltx2_split": 0,  # split RoPE: tables differ per head (one frequency per channel of all heads)
    "kandinsky5": 2,  # the rotation matrix applied as (M * x_).sum(-1)
    "kandinsky6": 2,
    "easyanimate": 0,  # LayerNorm on q and k
    "glm_image": 0,
    "lumina_next": 0,
    "omnigen": 0,  # RoPE, no q/k norm
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def run(name, dtype=torch.float32, inductor=False):
    model, kwargs = zoo.ZOO[name].build(torch.Generator().manual_seed(0))
    return zoo.check(model, kwargs, dtype, inductor)


@pytest.mark.parametrize("name", sorted(FIRES))
def test_zoo_fp32(name):
    row = run(name)
    assert not row["raised"], row["raised"]
    assert row["fired"] == FIRES[name], row["declined"]
    assert row["error"] <= TOL[torch.float32], row


@pytest.mark.parametrize("name", ["flux", "cosmos", "ltx", "qwenimage", "hunyuan_video", "prx", "z_image", "ltx2"])
def test_zoo_bf16(name):
    row = run(name, torch.bfloat16)
    assert row["fired"] == FIRES[name] and row["error"] <= TOL[torch.bfloat16], row


@pytest.mark.parametrize("name", ["flux", "cosmos", "hunyuan_video"])
def test_zoo_inductor(name):
    row = run(name, inductor=True)
    assert row["fired"] == FIRES[name] and row["error"] <= TOL[torch.float32], row


def test_zoo_covers_the_classes():
    # at least ten models with the pattern, among them each class that fuses, and negative controls
    with_pattern = [name for name in FIRES if zoo.ZOO[name].forms != ("none",)]
    assert len(with_pattern) >= 10
    fused_forms = {form for name, n in FIRES.items() if n for form in zoo.ZOO[name].forms}
    assert {"A", "B", "C", "hidden", "complex", "partial_seq"} <= fused_forms
    assert any(zoo.ZOO[name].forms == ("none",) for name in FIRES)


@pytest.mark.parametrize("name", ["cogvideox", "cogview4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zoo_token_slice_with_rms_norm(name, dtype):
    # CogVideoX's and CogView4's own attention processors (norm over all tokens, then
    # q[:, :, text:] = rope(q[:, :, text:])) with their LayerNorms swapped for RMSNorms: one rewrite per block
    from diffusers.models.normalization import RMSNorm

    model, kwargs = zoo.ZOO[name].build(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    blocks = [m for m in model.modules() if isinstance(getattr(m, "norm_q", None), torch.nn.LayerNorm)]
    assert blocks
    for block in blocks:
        size = block.norm_q.normalized_shape[0]
        block.norm_q, block.norm_k = RMSNorm(size, eps=1e-6), RMSNorm(size, eps=1e-6)
        with torch.no_grad():
            for norm in (block.norm_q, block.norm_k):
                norm.weight.copy_(torch.randn(size, generator=g))
    row = zoo.check(model, kwargs, dtype)
    assert not row["raised"] and row["fired"] == len(blocks), row
    assert row["error"] <= TOL[dtype], row
