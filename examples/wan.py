"""Wan 2.1 text-to-video: the stock diffusers transformer through WanPipeline's denoising loop,
eager, Inductor and diffopt side by side.

    python examples/wan.py --tiny                    # wan-tiny, fp32 on the CPU: seconds
    python examples/wan.py                           # Wan 2.1 1.3B, 480x832, 81 frames, 10 steps, bf16 on CUDA
    python examples/wan.py --regional                # the same, only the 30 blocks compiled: seconds of compile
    python examples/wan.py --config wan-14b --regional --steps 4
    python examples/wan.py --model ~/Wan2.1-T2V-1.3B-Diffusers   # or .../transformer: a local checkpoint

Without ``--model`` the transformer is built at the named config with random weights (nothing is
downloaded). The loop is WanPipeline's, on the transformer alone: the prompt and the negative
prompt are random embeddings of the text encoder's output shape (no text encoder), and the
loop stops at the latents (no VAE). Same initial latents and text for every backend.
"""
from __future__ import annotations

import torch
from _common import Defaults, Denoising, compare, load_or_build, parse_args, random_generator

from diffopt.models import get_config
from diffopt.models.diffusers_models import build_diffusers_wan

DEFAULTS = Defaults(
    config="wan-1.3b",
    tiny_config="wan-tiny",
    size=(480, 832, 81),
    tiny_size=(64, 64, 5),
    steps=10,
    tiny_steps=3,
    guidance_scale=5.0,
)
# Wan's VAE: 4x in time after the first frame, 8x in space.
VAE_TEMPORAL, VAE_SPATIAL = 4, 8
# WanPipeline's max_sequence_length: UMT5 embeddings are padded to 512 tokens.
TEXT_LEN = 512


def latent_shape(args, config) -> tuple[int, ...]:
    """WanPipeline.prepare_latents' shape for one video; sizes it would round are refused instead."""
    _, patch_h, patch_w = config.patch_size
    multiple = (VAE_SPATIAL * patch_h, VAE_SPATIAL * patch_w)
    if args.height % multiple[0] or args.width % multiple[1] or (args.frames - 1) % VAE_TEMPORAL:
        raise SystemExit(f"--height/--width must be multiples of {multiple[0]}/{multiple[1]} and --frames "
                         f"{VAE_TEMPORAL}k+1 (got {args.height}x{args.width}, {args.frames} frames)")
    frames = (args.frames - 1) // VAE_TEMPORAL + 1
    return (1, config.in_channels, frames, args.height // VAE_SPATIAL, args.width // VAE_SPATIAL)


def main(argv=None):
    args = parse_args(__doc__, DEFAULTS, argv)
    model, source = load_or_build(args, "WanTransformer3DModel", build_diffusers_wan)
    config = model.config
    shape = latent_shape(args, config)
    text_len = TEXT_LEN if args.model else get_config(args.config).text_len
    generator = random_generator(args.seed)
    # float32 latents, as WanPipeline keeps them; the transformer gets them in its dtype.
    initial_latents = torch.randn(shape, generator=generator).to(args.device)
    text = torch.randn(2, 1, text_len, config.text_dim, generator=generator)
    prompt, negative_prompt = text.to(args.device, args.dtype)
    # WanPipeline's documented setting: flow_shift 3.0 for 480p, 5.0 for 720p.
    flow_shift = 5.0 if args.height >= 720 else 3.0
    guided = args.guidance_scale > 1.0  # WanPipeline.do_classifier_free_guidance

    def step(transformer, scheduler, latents, t):
        latent_input = latents.to(args.dtype)
        timestep = t.expand(latents.shape[0])

        def predict(text):
            return transformer(
                hidden_states=latent_input, timestep=timestep, encoder_hidden_states=text, return_dict=False
            )[0]

        noise_pred = predict(prompt)
        if guided:
            noise_uncond = predict(negative_prompt)
            noise_pred = noise_uncond + args.guidance_scale * (noise_pred - noise_uncond)
        return scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    patch = config.patch_size
    tokens = (shape[2] // patch[0]) * (shape[3] // patch[1]) * (shape[4] // patch[2])
    denoising = Denoising(
        title=f"Wan 2.1 text-to-video: {args.height}x{args.width}, {args.frames} frames",
        pipeline="WanPipeline",
        source=source,
        about=[
            f"latents {list(shape)} (float32) -> {tokens} tokens per call",
            f"text: random embeddings [1, {text_len}, {config.text_dim}] for the prompt and the negative prompt "
            "(no text encoder); no VAE: the loop stops at the latents",
        ],
        model=model,
        latents=initial_latents,
        flow_shift=flow_shift,
        guided=guided,
        step=step,
    )
    return compare(denoising, args)


if __name__ == "__main__":
    main()
