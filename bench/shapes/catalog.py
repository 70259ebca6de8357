"""The published transformer shapes ``bench.shapes`` builds, and what each one stands for.

Configs are those of the public checkpoints' ``transformer/config.json``; only the transformer is at
full size. Text encoders and the VAE are one-layer stand-ins with the real output widths (the
transformer sees conditioning of the real shape: T5's 4096 channels, CLIP's pooled 768/2048, 120 to
512 text tokens), because the benchmark times the denoising loop, not prompt encoding or decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """One published model shape.

    Args:
        name: the ``--shape`` name.
        family: the engine family (``dit``, ``pixart``, ``sd3``, ``flux``).
        transformer_class: the diffusers transformer class.
        config: the transformer's config (the published one, or the stated reduction).
        depth_fields: config keys holding block counts (``--layers`` scales them).
        size: the native image size in pixels.
        steps: the step count the benchmark runs by default (small: the CPU must finish in minutes).
        guidance: the guidance scale of the family's pipeline default.
        text_tokens: prompt tokens the text encoders emit (the real pipeline's maximum).
        note: how the shape differs from the published model, if at all.
    """

    name: str
    family: str
    transformer_class: str
    config: dict[str, Any]
    depth_fields: tuple[str, ...]
    size: int
    steps: int
    guidance: float
    text_tokens: int = 0
    note: str = ""
    published: dict[str, Any] = field(default_factory=dict)
    """Block counts of the published model where ``config`` reduces them (reported beside the results)."""


SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape(
            name="dit-xl-2",
            family="dit",
            transformer_class="DiTTransformer2DModel",
            config=dict(
                num_attention_heads=16,
                attention_head_dim=72,
                in_channels=4,
                out_channels=8,
                num_layers=28,
                sample_size=32,
                patch_size=2,
                num_embeds_ada_norm=1000,
                norm_type="ada_norm_zero",
                norm_elementwise_affine=False,
            ),
            depth_fields=("num_layers",),
            size=256,
            steps=20,
            guidance=4.0,
            note="facebook/DiT-XL-2-256: 28 blocks of width 1152, 256 tokens; 675M parameters in the paper, 750M in "
            "diffusers' class (a timestep and label embedder in every block)",
        ),
        ModelShape(
            name="pixart-1024",
            family="pixart",
            transformer_class="PixArtTransformer2DModel",
            config=dict(
                num_attention_heads=16,
                attention_head_dim=72,
                in_channels=4,
                out_channels=8,
                num_layers=28,
                cross_attention_dim=1152,
                sample_size=128,
                patch_size=2,
                caption_channels=4096,
                norm_type="ada_norm_single",
                norm_elementwise_affine=False,
                norm_eps=1e-6,
                use_additional_conditions=True,
            ),
            depth_fields=("num_layers",),
            size=1024,
            steps=10,
            guidance=4.5,
            text_tokens=120,
            note="PixArt-alpha/PixArt-XL-2-1024-MS: 611M parameters, 4096 tokens",
        ),
        ModelShape(
            name="sd3-medium",
            family="sd3",
            transformer_class="SD3Transformer2DModel",
            config=dict(
                sample_size=128,
                patch_size=2,
                in_channels=16,
                num_layers=24,
                attention_head_dim=64,
                num_attention_heads=24,
                joint_attention_dim=4096,
                caption_projection_dim=1536,
                pooled_projection_dim=2048,
                out_channels=16,
                pos_embed_max_size=192,
            ),
            depth_fields=("num_layers",),
            size=1024,
            steps=10,
            guidance=7.0,
            text_tokens=256,
            note="stabilityai/stable-diffusion-3-medium: 2.0B parameters, 4096 image + 333 text tokens",
        ),
        ModelShape(
            name="flux-dev-2b",
            family="flux",
            transformer_class="FluxTransformer2DModel",
            config=dict(
                patch_size=1,
                in_channels=64,
                num_layers=3,
                num_single_layers=6,
                attention_head_dim=128,
                num_attention_heads=24,
                joint_attention_dim=4096,
                pooled_projection_dim=768,
                guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
            ),
            depth_fields=("num_layers", "num_single_layers"),
            size=1024,
            steps=10,
            guidance=3.5,
            text_tokens=512,
            note="black-forest-labs/FLUX.1-dev's width (3072) at 3 double + 6 single blocks of its 19 + 38: "
            "1.9B of 11.9B parameters (the full model's 48 GB of float32 weights do not fit 24 GiB)",
            published={"num_layers": 19, "num_single_layers": 38},
        ),
    )
}


def scaled_config(shape: ModelShape, layers: int | None) -> dict[str, Any]:
    """The shape's transformer config, with its block counts cut to ``layers`` in all (``None``: as is).

    For Flux the double/single ratio is kept (at least one of each)."""
    config = dict(shape.config)
    if layers is None:
        return config
    if len(shape.depth_fields) == 1:
        config[shape.depth_fields[0]] = layers
        return config
    double, single = (config[name] for name in shape.depth_fields)
    doubles = max(1, round(layers * double / (double + single)))
    config[shape.depth_fields[0]] = doubles
    config[shape.depth_fields[1]] = max(1, layers - doubles)
    return config
