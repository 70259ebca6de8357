"""A minimal per-sample DiT denoising loop over FastCache's batch-runner API, for tests.

Each sample has its own generator, scheduler, guidance scale and ``CacheParams``; samples may start
at different loop iterations (``start``), which exercises joining a running batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fastcache_core import CacheParams, FastCache, SampleStats

NULL_CLASS = 1000


@dataclass
class DiTSample:
    label: int
    seed: int
    params: CacheParams
    guidance: float = 2.0
    start: int = 0


def denoise(
    pipe, cache: FastCache, samples: list[DiTSample], steps: int
) -> tuple[list[torch.Tensor], list[SampleStats]]:
    """Run ``samples`` through ``pipe.transformer`` together; return each one's decoded image (1, C, H, W)
    and its cache counters."""
    transformer = pipe.transformer
    size, channels = transformer.config.sample_size, transformer.config.in_channels
    state = []
    for i, s in enumerate(samples):
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(steps)
        latents = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(s.seed))
        sid = ("test", id(samples), i)
        cache.add_sample(sid, s.params, num_steps=steps, guidance_scale=s.guidance if s.guidance > 1 else None)
        state.append({"sid": sid, "scheduler": scheduler, "latents": latents, "step": 0})
    iteration = 0
    with torch.no_grad():
        while any(st["step"] < steps for st in state):
            active = [
                (s, st) for s, st in zip(samples, state, strict=True) if s.start <= iteration and st["step"] < steps
            ]
            iteration += 1
            if not active:
                continue
            rows, x, t, labels = [], [], [], []
            for branch in (0, 1):
                for s, st in active:
                    if branch == 1 and s.guidance <= 1:
                        continue
                    rows.append((st["sid"], branch))
                    x.append(st["latents"])
                    t.append(st["scheduler"].timesteps[st["step"]])
                    labels.append(s.label if branch == 0 else NULL_CLASS)
            cache.bind(rows)
            out = transformer(torch.cat(x), timestep=torch.stack(t), class_labels=torch.tensor(labels)).sample
            for s, st in active:
                cond = out[rows.index((st["sid"], 0))][None]
                eps = cond
                if s.guidance > 1:
                    uncond = out[rows.index((st["sid"], 1))][None]
                    eps = uncond + s.guidance * (cond - uncond)
                timestep = st["scheduler"].timesteps[st["step"]]
                st["latents"] = st["scheduler"].step(eps, timestep, st["latents"]).prev_sample
                st["step"] += 1
        cache.bind(None)
        images, stats = [], []
        for st in state:
            stats.append(cache.remove_sample(st["sid"]))
            latents = st["latents"] / pipe.vae.config.scaling_factor
            images.append((pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1))
    return images, stats
