"""The bundled default model: a standard DiTPipeline directory that runs on CPU, calibrated, with its judge."""

from pathlib import Path

import pytest
import torch

from fastcache_core import FastCacheConfig, apply_fastcache
from fastcache_core.profile import CALIBRATION_FILENAME
from models.digits_dit.data import DigitClassifier, load_digits_split
from models.pipeline_io import load_dit_pipeline
from service.settings import DEFAULT_MODEL

MODEL = Path(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def pipe():
    p = load_dit_pipeline(MODEL)
    p.set_progress_bar_config(disable=True)
    return p


def test_the_service_default_is_the_bundled_model():
    assert Path(__file__).resolve().parents[1] / "models" / "digits-dit" == MODEL


def test_label_names_map_to_class_ids(pipe):
    assert pipe.get_label_ids(["seven", "zero"]) == [7, 0]


def test_generates_on_cpu_and_labels_change_the_image(pipe):
    images = pipe(
        [3, 8],
        guidance_scale=1.5,
        num_inference_steps=8,
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)],
        output_type="pt",
    ).images
    assert images.shape == (2, 1, 32, 32)
    assert torch.isfinite(images).all()
    assert (images[0] - images[1]).abs().mean() > 0.02  # same noise, different digit


def test_latent_space_has_64_tokens_per_sample(pipe):
    cfg = pipe.transformer.config
    assert (cfg.sample_size // cfg.patch_size) ** 2 >= 64


def test_calibration_ships_beside_the_model_and_loads(pipe):
    assert (MODEL / "transformer" / CALIBRATION_FILENAME).is_file()
    cache = apply_fastcache(pipe.transformer, FastCacheConfig())
    try:
        assert cache.calibrated
        assert cache.profile.metadata.get("default_params", {}).get("tolerance") is not None
    finally:
        cache.remove()


def test_classifier_is_accurate_on_held_out_digits():
    classifier = DigitClassifier.load(MODEL / "classifier")
    data = load_digits_split()
    with torch.no_grad():
        accuracy = (classifier(data.test_images).argmax(1) == data.test_labels).float().mean().item()
    assert accuracy >= 0.97


def test_model_directory_fits_the_size_budget():
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 25 * 1024 * 1024
