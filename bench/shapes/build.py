"""Building a random-weight pipeline at a published shape (``catalog.py``), and saving it as a directory.

The transformer is the real diffusers class at the shape's config; the VAE is the family's real
autoencoder config (DiT/PixArt: sd-vae-ft-ema, SD3 and Flux: their 16-channel VAEs); tokenizers and
text encoders are the stand-ins of ``models.stand_ins`` at the real output widths. Weights are
seeded, so every run of a shape builds the same model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.shapes.catalog import ModelShape, scaled_config
from models.stand_ins import clip_encoder, t5_encoder, word_tokenizer

# the published VAEs' configs: (latent channels, scaling factor, shift factor)
_VAE = {
    "dit": (4, 0.18215, None),
    "pixart": (4, 0.18215, None),
    "sd3": (16, 1.5305, 0.0609),
    "flux": (16, 0.3611, 0.1159),
}


def vae(family: str) -> Any:
    """The family's autoencoder at its published config (four levels: 8x downsampling), random weights."""
    from diffusers import AutoencoderKL

    channels, scaling, shift = _VAE[family]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=channels,
        norm_num_groups=32,
        sample_size=1024 if family != "dit" else 256,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=family in ("dit", "pixart"),
        use_post_quant_conv=family in ("dit", "pixart"),
    )


def transformer(shape: ModelShape, layers: int | None = None) -> torch.nn.Module:
    """The shape's transformer (``layers``: block count override), random weights, eval mode."""
    import diffusers

    cls = getattr(diffusers, shape.transformer_class)
    return cls(**scaled_config(shape, layers)).eval()


def build_pipeline(shape: ModelShape, layers: int | None = None, seed: int = 0, text_tokens: int | None = None) -> Any:
    """A ready diffusers pipeline of ``shape`` on CPU in float32 (seeded random weights); ``text_tokens``
    caps the prompt length (default: the shape's)."""
    import diffusers

    tokens = text_tokens or shape.text_tokens
    torch.manual_seed(seed)
    model = transformer(shape, layers)
    family = shape.family
    if family == "dit":
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
        labels = {i: f"class {i}" for i in range(1000)}
        pipe = diffusers.DiTPipeline(transformer=model, vae=vae(family), scheduler=scheduler, id2label=labels)
    elif family == "pixart":
        pipe = diffusers.PixArtAlphaPipeline(
            tokenizer=word_tokenizer(tokens),
            text_encoder=t5_encoder(4096),
            vae=vae(family),
            transformer=model,
            scheduler=diffusers.DPMSolverMultistepScheduler(),
        )
    elif family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=model,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae(family),
            text_encoder=clip_encoder(768, projection=True, max_positions=77),
            tokenizer=word_tokenizer(min(77, tokens)),
            text_encoder_2=clip_encoder(1280, projection=True, max_positions=77),
            tokenizer_2=word_tokenizer(min(77, tokens)),
            text_encoder_3=t5_encoder(4096),
            tokenizer_3=word_tokenizer(tokens),
        )
    elif family == "flux":
        pipe = diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=vae(family),
            text_encoder=clip_encoder(768, max_positions=77),
            tokenizer=word_tokenizer(min(77, tokens)),
            text_encoder_2=t5_encoder(4096),
            tokenizer_2=word_tokenizer(tokens),
            transformer=model,
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def published_parameters(shape: ModelShape) -> int:
    """Parameters of the shape's transformer at its full config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = transformer(shape)
    return sum(p.numel() for p in model.parameters())


def save_pipeline(
    shape: ModelShape, out: str | Path, layers: int | None = None, seed: int = 0, text_tokens: int | None = None
) -> float:
    """Write the shape's random-weight pipeline as a diffusers directory (``fastcache-serve --model OUT``);
    returns the seconds it took. A DiT directory gets ``id2label`` so label names resolve."""
    from models.pipeline_io import save_dit_pipeline

    began = time.perf_counter()
    pipe = build_pipeline(shape, layers, seed, text_tokens)
    if shape.family == "dit":
        save_dit_pipeline(pipe, out, [f"class {i}" for i in range(1000)])
    else:
        pipe.save_pretrained(out)
    return time.perf_counter() - began
