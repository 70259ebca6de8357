"""A model directory may state its own serving defaults in fastcache_serving.json."""

import json
import shutil

import pytest
import torch

from models.pipeline_io import load_dit_pipeline
from service.engine.families import runner_for
from service.engine.serving_defaults import SERVING_DEFAULTS_FILE


def runner(path):
    return runner_for(load_dit_pipeline(path), torch.device("cpu"), torch.float32)


def test_family_defaults_apply_without_the_file(tiny_dit_dir):
    limits = runner(tiny_dit_dir).limits()
    assert limits.default_steps == 50 and limits.default_guidance_scale == 1.5


def test_the_file_overrides_the_family_defaults(tiny_dit_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dit_dir, model)
    (model / SERVING_DEFAULTS_FILE).write_text(json.dumps({"default_guidance_scale": 2.5, "default_steps": 30}))
    limits = runner(model).limits()
    assert limits.default_guidance_scale == 2.5 and limits.default_steps == 30


def test_unknown_keys_in_the_file_are_an_error(tiny_dit_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dit_dir, model)
    (model / SERVING_DEFAULTS_FILE).write_text(json.dumps({"guidance": 2.5}))
    with pytest.raises(ValueError, match="unknown keys"):
        runner(model)
