"""Host-side profile of one compiled denoising step (CUDA): which Python functions take the time.

    python scripts/profile_step_cpu.py [inductor|diffopt]
"""
import cProfile
import dataclasses
import pstats
import sys

import torch

from diffopt.models import DenoiseStep, get_config
from diffopt.models.loop import loop_example_inputs, make_timesteps

backend = sys.argv[1] if len(sys.argv) > 1 else "diffopt"
config = dataclasses.replace(get_config("wan-1.3b"), num_layers=6, latent_frames=1)
model = DenoiseStep(config).to("cuda", torch.bfloat16).eval()
latents, _, encoder_hidden_states = loop_example_inputs(config, dtype=torch.bfloat16, device="cuda")
timesteps = make_timesteps(8).to("cuda")
step = torch.compile(model, backend=backend)
with torch.no_grad():
    for t in timesteps[:4]:
        step(latents, t.expand(1), encoder_hidden_states)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for t in timesteps[4:]:
        step(latents, t.expand(1), encoder_hidden_states)
    torch.cuda.synchronize()
    profiler.disable()
pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
