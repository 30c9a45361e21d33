"""Cosmos3 text-to-video: the stock diffusers transformer through Cosmos3OmniPipeline's denoising
loop, eager, Inductor and diffopt side by side.

    python examples/cosmos3.py --tiny                # cosmos3-tiny, fp32 on the CPU: seconds
    python examples/cosmos3.py --regional            # cosmos3 (36 layers), 720x1280, 121 frames, bf16 on CUDA
    python examples/cosmos3.py --layers 8            # 8 of the 36 layers, whole model compiled
    python examples/cosmos3.py --model ~/Cosmos3-Nano    # or .../transformer: a local checkpoint

Without ``--model`` the transformer is built at the named config with random weights (nothing is
downloaded). 720x1280 at 121 frames is 31 x 23 x 40 = 28520 generation tokens, the shape the
benchmarks use (the pipeline's default is 189 frames). The loop is the pipeline's text-to-video
loop on the transformer alone: the prompt and the negative prompt are random token ids (no
tokenizer), and the loop stops at the latents (no VAE). Same initial latents and text for every
backend.
"""
from __future__ import annotations


import torch
from _common import Defaults, Denoising, compare, load_or_build, parse_args

from diffopt.models import Cosmos3Config, get_config
from diffopt.models.diffusers_models import build_diffusers_cosmos3, diffusers_cosmos3_inputs

DEFAULTS = Defaults(
    config="cosmos3",
    tiny_config="cosmos3-tiny",
    size=(720, 1280, 121),
    tiny_size=(64, 192, 5),
    steps=5,
    tiny_steps=3,
    guidance_scale=6.0,
)
# Cosmos3's VAE (Wan 2.2's): 4x in time after the first frame, 16x in space.
VAE_TEMPORAL, VAE_SPATIAL = 4, 16
# diffusers' Cosmos3 text-to-video example sets this shift on the checkpoint's UniPC scheduler.
FLOW_SHIFT = 10.0


def config_of(model_config, name: str):
    """A ``Cosmos3Config`` for a loaded checkpoint (what the input builder reads of it)."""
    return Cosmos3Config(
        name=name,
        hidden_size=model_config.hidden_size,
        num_heads=model_config.num_attention_heads,
        num_kv_heads=model_config.num_key_value_heads,
        head_dim=model_config.head_dim,
        intermediate_size=model_config.intermediate_size,
        num_layers=model_config.num_hidden_layers,
        eps=model_config.rms_norm_eps,
        rope_theta=model_config.rope_theta,
        rope_axes_dim=tuple(model_config.rope_axes_dim),
        vocab_size=model_config.vocab_size,
        latent_channel=model_config.latent_channel,
        latent_patch_size=model_config.latent_patch_size,
    )


def latent_grid(args) -> tuple[int, int, int]:
    """The VAE latent's (frames, height, width) for the video; sizes the VAE cannot take are refused."""
    if args.height % VAE_SPATIAL or args.width % VAE_SPATIAL or (args.frames - 1) % VAE_TEMPORAL:
        raise SystemExit(f"--height/--width must be multiples of {VAE_SPATIAL} and --frames {VAE_TEMPORAL}k+1 "
                         f"(got {args.height}x{args.width}, {args.frames} frames)")
    return ((args.frames - 1) // VAE_TEMPORAL + 1, args.height // VAE_SPATIAL, args.width // VAE_SPATIAL)


def main(argv=None):
    args = parse_args(__doc__, DEFAULTS, argv)
    model, source = load_or_build(args, "Cosmos3OmniTransformer", build_diffusers_cosmos3)
    config = config_of(model.config, args.model) if args.model else get_config(args.config)
    grid = latent_grid(args)
    # The static packed inputs of the prompt and of the negative prompt: text token ids, mRoPE
    # position ids, sequence indexes. Both prompts are config.prefix_len tokens long; the
    # pipeline's differ in length, which would compile a second graph.
    prompt, negative_prompt = (
        diffusers_cosmos3_inputs(config, latent_shape=grid, dtype=torch.float32, device=args.device, seed=seed)
        for seed in (args.seed, args.seed + 1)
    )
    # The step-varying fields are spliced in per step, as the pipeline does: the latents (float32
    # [1, C, T, H, W], the same random draw for both) and the per-token timesteps.
    initial_latents = prompt.pop("vision_tokens")[0]
    del negative_prompt["vision_tokens"]
    noisy_tokens = prompt.pop("vision_timesteps").numel()
    del negative_prompt["vision_timesteps"]
    guided = args.guidance_scale != 1.0  # Cosmos3OmniPipeline.do_classifier_free_guidance

    def step(transformer, scheduler, latents, t):
        vision_tokens = [latents.to(args.dtype)]
        vision_timesteps = torch.full((noisy_tokens,), t.item(), device=args.device)

        # Text-to-video conditions on no frame: the pipeline's velocity mask is all ones, left out.
        def velocity(packed):
            preds_vision, _, _ = transformer(
                **packed, vision_tokens=vision_tokens, vision_timesteps=vision_timesteps, return_dict=False
            )
            return preds_vision[0].float()

        velocity_vision = velocity(prompt)
        if guided:
            uncond = velocity(negative_prompt)
            velocity_vision = uncond + args.guidance_scale * (velocity_vision - uncond)
        # UniPC's update wants a batch dim in front of the per-item latents (as in the pipeline).
        return scheduler.step(velocity_vision.unsqueeze(0), t, latents.unsqueeze(0), return_dict=False)[0].squeeze(0)

    denoising = Denoising(
        title=f"Cosmos3 text-to-video: {args.height}x{args.width}, {args.frames} frames",
        pipeline="Cosmos3OmniPipeline",
        source=source,
        about=[
            f"latents {list(initial_latents.shape)} (float32) -> {noisy_tokens} generation tokens after "
            f"{config.prefix_len} text tokens per call",
            f"text: random token ids, {config.prefix_len} for the prompt and {config.prefix_len} for the negative "
            "prompt (no tokenizer); no VAE: the loop stops at the latents",
        ],
        model=model,
        latents=initial_latents,
        flow_shift=FLOW_SHIFT,
        guided=guided,
        step=step,
    )
    return compare(denoising, args)


if __name__ == "__main__":
    main()
