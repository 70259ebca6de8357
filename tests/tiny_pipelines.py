"""Tiny diffusers pipelines built in-process from small configs of the real classes (no download).

Each builder returns a ready pipeline with seeded random weights on CPU in float32. Text pipelines
get the word-level tokenizer and small T5/CLIP text encoders of ``models.stand_ins``.
"""

from __future__ import annotations

import torch

from models.stand_ins import clip_encoder as _clip
from models.stand_ins import t5_encoder as _t5
from models.stand_ins import word_tokenizer


def tiny_vae(in_channels: int = 3, latent_channels: int = 4, shift: bool = False):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.0 if shift else None,
        scaling_factor=1.0,
    )


def tiny_dit_pipeline(seed: int = 0, num_layers: int = 2, sample_size: int = 8):
    """DiTPipeline: 2 blocks, width 32, latent ``sample_size`` (patch 2), 10 labels."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=32,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    labels = {
        i: name
        for i, name in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    }
    return _ready(DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler, id2label=labels))


def tiny_pixart_pipeline(seed: int = 0):
    """PixArtAlphaPipeline: 2 blocks, width 32, latent 8x8 (patch 2), T5 context of 16 tokens."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        caption_channels=32,
        norm_num_groups=32,
        use_additional_conditions=False,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    return _ready(
        PixArtAlphaPipeline(
            tokenizer=word_tokenizer(16),
            text_encoder=_t5(),
            vae=tiny_vae(),
            transformer=transformer,
            scheduler=scheduler,
        )
    )


def tiny_sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: 2 joint blocks, width 32, latent 8x8 (patch 2), two CLIP encoders, no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    )
    return _ready(
        StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=tiny_vae(shift=True),
            text_encoder=_clip(projection=True),
            tokenizer=word_tokenizer(16),
            text_encoder_2=_clip(projection=True),
            tokenizer_2=word_tokenizer(16),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    )


def tiny_flux_pipeline(seed: int = 0):
    """FluxPipeline: 1 double + 1 single block, width 32, latent 8x8 (packed 2x2), CLIP + T5 encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    return _ready(
        FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=tiny_vae(latent_channels=4, shift=True),
            text_encoder=_clip(),
            tokenizer=word_tokenizer(16),
            text_encoder_2=_t5(),
            tokenizer_2=word_tokenizer(16),
            transformer=transformer,
        )
    )


def _ready(pipe):
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


BUILDERS = {
    "dit": tiny_dit_pipeline,
    "pixart": tiny_pixart_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
}
