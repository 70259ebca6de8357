"""The bundled canvas model (256 latent tokens) loads as a standard DiTPipeline and generates on CPU."""

from pathlib import Path

import torch

from models.pipeline_io import load_dit_pipeline

MODEL = Path(__file__).resolve().parents[1] / "models" / "canvas-dit"


def test_canvas_model_loads_and_draws_one_64x64_image_from_256_tokens():
    pipe = load_dit_pipeline(MODEL)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.transformer.config
    assert (cfg.sample_size // cfg.patch_size) ** 2 == 256
    image = pipe(
        pipe.get_label_ids(["seven"]),
        guidance_scale=2.0,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert image.shape == (1, 1, 64, 64)
    assert torch.isfinite(image).all()
