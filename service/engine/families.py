"""Per-family request preparation, batched transformer step and decoding for the serving engine.

A ``FamilyRunner`` turns one requested image into a ``Sample`` (its own latents, scheduler, seed and
conditioning rows), runs one transformer forward for any set of samples (each at its own timestep,
with its own guidance scale) and decodes finished samples. It reuses the pipeline's own helpers
(text encoders, latent packing, VAE) so results match what the diffusers pipeline would compute.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastcache_core.cache import FastCache
from service.engine.serving_defaults import apply_serving_defaults
from service.model_limits import GenerationSpec, InvalidField, ModelLimits, resolve_label, validate_spec

# the wire types and the validation live in the torch-free ``service.model_limits``; re-exported for the engine
__all__ = [
    "RUNNERS",
    "FamilyRunner",
    "GenerationSpec",
    "InvalidField",
    "ModelLimits",
    "Sample",
    "resolve_label",
    "runner_for",
    "validate_spec",
]


@dataclass
class Sample:
    """One image being denoised: its own latents, scheduler and conditioning rows."""

    sample_id: Hashable
    spec: GenerationSpec
    latents: torch.Tensor
    scheduler: Any
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step >= len(self.scheduler.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        timestep: torch.Tensor = self.scheduler.timesteps[self.step]
        return timestep


def _limits(
    family: str, steps: int, guidance: float, native: int, multiple: int, max_size: int, negative_prompt: bool
) -> ModelLimits:
    """Limits of a text model: square native size, smallest size two multiples."""
    return ModelLimits(
        family=family,
        default_steps=steps,
        default_guidance_scale=guidance,
        default_width=native,
        default_height=native,
        size_multiple=multiple,
        min_size=2 * multiple,
        max_size=max_size,
        supports_negative_prompt=negative_prompt,
    )


class FamilyRunner:
    """Base runner; subclasses fill in the family specifics."""

    family = "generic"

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.transformer = pipe.transformer
        self._limits = apply_serving_defaults(self.family_limits(), pipe)

    # -- what the model serves
    def limits(self) -> ModelLimits:
        return self._limits

    def family_limits(self) -> ModelLimits:
        """The family's defaults and size rules, before the model directory's own serving defaults."""
        raise NotImplementedError

    def compat_key(self, spec: GenerationSpec) -> tuple[Hashable, ...]:
        """Samples with equal keys can share a transformer forward."""
        return (spec.width, spec.height)

    def validate(self, spec: GenerationSpec) -> None:
        validate_spec(self.limits(), spec)

    # -- denoising
    def prepare(self, sample_id: Hashable, spec: GenerationSpec) -> Sample:
        raise NotImplementedError

    def _scheduler(self, steps: int, **kwargs: Any) -> Any:
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(steps, device=self.device, **kwargs)
        return scheduler

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def forward(self, samples: list[Sample], cache: FastCache | None) -> list[torch.Tensor]:
        """One transformer forward for all ``samples``; each sample's guided model output. ``cache`` is told
        which sample each row is (``None``: no cache is attached, as in ``bench.shapes``' reference)."""
        rows: list[tuple[Hashable, int]] = []
        latents: list[torch.Tensor] = []
        timesteps: list[torch.Tensor] = []
        conds: dict[str, list[torch.Tensor]] = {}
        for branch in (0, 1):
            for s in samples:
                cond = s.cond if branch == 0 else s.uncond
                if cond is None:
                    continue
                rows.append((s.sample_id, branch))
                x = s.latents
                if hasattr(s.scheduler, "scale_model_input"):
                    x = s.scheduler.scale_model_input(x, s.timestep)
                latents.append(x)
                timesteps.append(self.model_timestep(s))
                for name, value in cond.items():
                    conds.setdefault(name, []).append(value)
        bind = cache.bind if cache is not None else (lambda rows: None)
        bind(rows)
        try:
            output = self.call_transformer(
                torch.cat(latents), torch.cat(timesteps), {k: torch.cat(v) for k, v in conds.items()}, samples[0]
            )
        finally:
            bind(None)
        results = []
        for s in samples:
            out = output[rows.index((s.sample_id, 0))][None]
            if s.uncond is not None:
                uncond = output[rows.index((s.sample_id, 1))][None]
                out = uncond + s.spec.guidance_scale * (out - uncond)
            results.append(out)
        return results

    def model_timestep(self, sample: Sample) -> torch.Tensor:
        return sample.timestep.reshape(1).to(self.device)

    def call_transformer(
        self, latents: torch.Tensor, timesteps: torch.Tensor, conds: dict[str, torch.Tensor], first: Sample
    ) -> torch.Tensor:
        raise NotImplementedError

    def step(self, sample: Sample, model_output: torch.Tensor) -> None:
        sample.latents = sample.scheduler.step(model_output, sample.timestep, sample.latents).prev_sample
        sample.step += 1

    @torch.no_grad()
    def decode(self, samples: list[Sample]) -> list[Image.Image]:
        raise NotImplementedError

    def _uses_guidance(self, spec: GenerationSpec) -> bool:
        return spec.guidance_scale > 1.0

    def cache_guidance(self, spec: GenerationSpec) -> float | None:
        """The classifier-free guidance scale the sample's two rows are combined with, for the cache's
        methods (``None``: the sample has one row)."""
        return spec.guidance_scale if self._uses_guidance(spec) else None


class DiTRunner(FamilyRunner):
    """Class-conditional DiT: the prompt is a label name or id; the null class 1000 is unconditional."""

    family = "dit"
    NULL_CLASS = 1000

    def family_limits(self) -> ModelLimits:
        cfg = self.transformer.config
        vae_factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        native = cfg.sample_size * vae_factor
        multiple = cfg.patch_size * vae_factor
        labels = dict(self.pipe.labels) if getattr(self.pipe, "labels", None) else None
        # small (CPU) DiTs over-saturate at DiT-XL's guidance 4: 1.5 suits them
        return ModelLimits(
            family="dit",
            default_steps=50,
            default_guidance_scale=1.5 if native <= 64 else 4.0,
            default_width=native,
            default_height=native,
            size_multiple=multiple,
            min_size=2 * multiple,
            max_size=2 * native,
            supports_negative_prompt=False,
            labels=labels,
            num_classes=cfg.num_embeds_ada_norm,
        )

    def compat_key(self, spec: GenerationSpec) -> tuple[Hashable, ...]:
        return (spec.width, spec.height)

    def prepare(self, sample_id: Hashable, spec: GenerationSpec) -> Sample:
        cfg = self.transformer.config
        vae_factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        shape = (1, cfg.in_channels, spec.height // vae_factor, spec.width // vae_factor)
        latents = torch.randn(shape, generator=self._generator(spec.seed), dtype=torch.float32)
        latents = latents.to(self.device, self.dtype)
        label = torch.tensor([resolve_label(self.limits(), spec.prompt)], device=self.device)
        uncond = {"class_labels": torch.full_like(label, self.NULL_CLASS)} if self._uses_guidance(spec) else None
        return Sample(sample_id, spec, latents, self._scheduler(spec.steps), {"class_labels": label}, uncond)

    def model_timestep(self, sample: Sample) -> torch.Tensor:
        return sample.timestep.reshape(1).to(self.device)

    def call_transformer(
        self, latents: torch.Tensor, timesteps: torch.Tensor, conds: dict[str, torch.Tensor], first: Sample
    ) -> torch.Tensor:
        out: torch.Tensor = self.transformer(latents, timestep=timesteps, class_labels=conds["class_labels"]).sample
        channels = self.transformer.config.in_channels
        if self.transformer.config.out_channels // 2 == channels:
            out = out[:, :channels]  # learned sigma: keep the noise prediction
        return out

    @torch.no_grad()
    def decode(self, samples: list[Sample]) -> list[Image.Image]:
        latents = torch.cat([s.latents for s in samples]) / self.pipe.vae.config.scaling_factor
        images = (self.pipe.vae.decode(latents.to(self.pipe.vae.dtype)).sample / 2 + 0.5).clamp(0, 1)
        pil: list[Image.Image] = self.pipe.numpy_to_pil(images.cpu().permute(0, 2, 3, 1).float().numpy())
        return pil


class _TextRunner(FamilyRunner):
    """Shared parts of the text-conditioned families."""

    max_sequence_length = 120
    t5_tokenizer = "tokenizer"
    """The pipeline attribute holding the T5 tokenizer, whose length ``max_sequence_length`` caps."""

    def _vae_factor(self) -> int:
        factor: int = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return factor

    def _postprocess(self, images: torch.Tensor) -> list[Image.Image]:
        pil: list[Image.Image] = self.pipe.image_processor.postprocess(images, output_type="pil")
        return pil

    def _text_length(self) -> int:
        tokenizer = getattr(self.pipe, self.t5_tokenizer, None) or self.pipe.tokenizer
        return min(self.max_sequence_length, int(getattr(tokenizer, "model_max_length", self.max_sequence_length)))


class PixArtRunner(_TextRunner):
    family = "pixart"

    def family_limits(self) -> ModelLimits:
        cfg = self.transformer.config
        factor = self._vae_factor()
        native = cfg.sample_size * factor
        multiple = cfg.patch_size * factor
        return _limits("pixart", 20, 4.5, native, multiple, 2 * native, True)

    def prepare(self, sample_id: Hashable, spec: GenerationSpec) -> Sample:
        guidance = self._uses_guidance(spec)
        embeds, mask, neg_embeds, neg_mask = self.pipe.encode_prompt(
            spec.prompt,
            do_classifier_free_guidance=guidance,
            negative_prompt=spec.negative_prompt or "",
            device=self.device,
            max_sequence_length=self._text_length(),
        )
        factor = self._vae_factor()
        shape = (1, self.transformer.config.in_channels, spec.height // factor, spec.width // factor)
        latents = torch.randn(shape, generator=self._generator(spec.seed), dtype=torch.float32).to(
            self.device, self.dtype
        )
        scheduler = self._scheduler(spec.steps)
        latents = latents * scheduler.init_noise_sigma
        cond = {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}
        uncond = (
            {"encoder_hidden_states": neg_embeds.to(self.dtype), "encoder_attention_mask": neg_mask}
            if guidance
            else None
        )
        if self.transformer.config.use_additional_conditions:
            extra = {
                "resolution": torch.tensor([[spec.height, spec.width]], dtype=self.dtype, device=self.device),
                "aspect_ratio": torch.tensor([[spec.height / spec.width]], dtype=self.dtype, device=self.device),
            }
            cond.update(extra)
            if uncond is not None:
                uncond.update(extra)
        return Sample(sample_id, spec, latents, scheduler, cond, uncond)

    def call_transformer(
        self, latents: torch.Tensor, timesteps: torch.Tensor, conds: dict[str, torch.Tensor], first: Sample
    ) -> torch.Tensor:
        added = {"resolution": conds.get("resolution"), "aspect_ratio": conds.get("aspect_ratio")}
        out: torch.Tensor = self.transformer(
            latents,
            encoder_hidden_states=conds["encoder_hidden_states"],
            encoder_attention_mask=conds["encoder_attention_mask"],
            timestep=timesteps,
            added_cond_kwargs=added,
        ).sample
        channels = self.transformer.config.in_channels
        if self.transformer.config.out_channels // 2 == channels:
            out = out.chunk(2, dim=1)[0]
        return out

    @torch.no_grad()
    def decode(self, samples: list[Sample]) -> list[Image.Image]:
        latents = torch.cat([s.latents for s in samples]) / self.pipe.vae.config.scaling_factor
        return self._postprocess(self.pipe.vae.decode(latents.to(self.pipe.vae.dtype)).sample)


class SD3Runner(_TextRunner):
    family = "sd3"
    max_sequence_length = 256
    t5_tokenizer = "tokenizer_3"  # tokenizer_2 is CLIP-G (77 tokens): it must not cap T5's 256

    def family_limits(self) -> ModelLimits:
        cfg = self.transformer.config
        factor = self._vae_factor()
        native = cfg.sample_size * factor
        multiple = cfg.patch_size * factor
        max_size = (cfg.pos_embed_max_size or cfg.sample_size) * factor
        return _limits("sd3", 28, 7.0, native, multiple, max_size, True)

    def prepare(self, sample_id: Hashable, spec: GenerationSpec) -> Sample:
        guidance = self._uses_guidance(spec)
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=spec.prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=guidance,
            negative_prompt=spec.negative_prompt or "",
            max_sequence_length=self._text_length(),
        )
        factor = self._vae_factor()
        shape = (1, self.transformer.config.in_channels, spec.height // factor, spec.width // factor)
        latents = torch.randn(shape, generator=self._generator(spec.seed), dtype=torch.float32).to(
            self.device, self.dtype
        )
        kwargs = {}
        if self.pipe.scheduler.config.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            cfg = self.pipe.scheduler.config
            seq = (shape[2] // self.transformer.config.patch_size) * (shape[3] // self.transformer.config.patch_size)
            kwargs["mu"] = calculate_shift(
                seq,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        cond = {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}
        uncond = (
            {"encoder_hidden_states": neg_embeds.to(self.dtype), "pooled_projections": neg_pooled.to(self.dtype)}
            if guidance
            else None
        )
        return Sample(sample_id, spec, latents, self._scheduler(spec.steps, **kwargs), cond, uncond)

    def call_transformer(
        self, latents: torch.Tensor, timesteps: torch.Tensor, conds: dict[str, torch.Tensor], first: Sample
    ) -> torch.Tensor:
        out: torch.Tensor = self.transformer(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=conds["encoder_hidden_states"],
            pooled_projections=conds["pooled_projections"],
        ).sample
        return out

    @torch.no_grad()
    def decode(self, samples: list[Sample]) -> list[Image.Image]:
        cfg = self.pipe.vae.config
        latents = torch.cat([s.latents for s in samples]) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self._postprocess(self.pipe.vae.decode(latents.to(self.pipe.vae.dtype)).sample)


class FluxRunner(_TextRunner):
    """Flux: guidance-distilled (guidance enters as an embedding, no unconditional rows)."""

    family = "flux"
    max_sequence_length = 512
    t5_tokenizer = "tokenizer_2"

    def family_limits(self) -> ModelLimits:
        factor = self._vae_factor()
        multiple = factor * 2  # latents are packed 2x2
        return _limits("flux", 28, 3.5, 64 * multiple, multiple, 128 * multiple, False)

    def _uses_guidance(self, spec: GenerationSpec) -> bool:
        return False

    def prepare(self, sample_id: Hashable, spec: GenerationSpec) -> Sample:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=spec.prompt, prompt_2=None, device=self.device, max_sequence_length=self._text_length()
        )
        channels = self.transformer.config.in_channels // 4
        latents, image_ids = self.pipe.prepare_latents(
            1, channels, spec.height, spec.width, torch.float32, torch.device("cpu"), self._generator(spec.seed)
        )
        latents = latents.to(self.device, self.dtype)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        steps = spec.steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            latents.shape[1],
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=self.device)
        cond = {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}
        if self.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full((1,), spec.guidance_scale, device=self.device, dtype=torch.float32)
        sample = Sample(sample_id, spec, latents, scheduler, cond, None)
        sample.extra = {"txt_ids": text_ids.to(self.device), "img_ids": image_ids.to(self.device)}
        return sample

    def compat_key(self, spec: GenerationSpec) -> tuple[Hashable, ...]:
        return (spec.width, spec.height)

    def model_timestep(self, sample: Sample) -> torch.Tensor:
        return (sample.timestep.reshape(1) / 1000).to(self.device)

    def call_transformer(
        self, latents: torch.Tensor, timesteps: torch.Tensor, conds: dict[str, torch.Tensor], first: Sample
    ) -> torch.Tensor:
        out: torch.Tensor = self.transformer(
            hidden_states=latents,
            timestep=timesteps,
            guidance=conds.get("guidance"),
            pooled_projections=conds["pooled_projections"],
            encoder_hidden_states=conds["encoder_hidden_states"],
            txt_ids=first.extra["txt_ids"],
            img_ids=first.extra["img_ids"],
        ).sample
        return out

    @torch.no_grad()
    def decode(self, samples: list[Sample]) -> list[Image.Image]:
        cfg = self.pipe.vae.config
        spec = samples[0].spec
        latents = torch.cat([s.latents for s in samples])
        latents = self.pipe._unpack_latents(latents, spec.height, spec.width, self.pipe.vae_scale_factor)
        latents = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self._postprocess(self.pipe.vae.decode(latents.to(self.pipe.vae.dtype)).sample)


RUNNERS = {
    "DiTPipeline": DiTRunner,
    "PixArtAlphaPipeline": PixArtRunner,
    "PixArtSigmaPipeline": PixArtRunner,
    "StableDiffusion3Pipeline": SD3Runner,
    "FluxPipeline": FluxRunner,
}


def runner_for(pipe: Any, device: torch.device, dtype: torch.dtype) -> FamilyRunner:
    """The runner of a loaded diffusers pipeline; ``TypeError`` for pipelines this server cannot batch."""
    cls = RUNNERS.get(type(pipe).__name__)
    if cls is None:
        raise TypeError(f"unsupported pipeline {type(pipe).__name__}; supported: {', '.join(RUNNERS)}")
    return cls(pipe, device, dtype)
