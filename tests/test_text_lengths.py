"""Prompt lengths the engine's text families encode: T5's own cap, not a CLIP tokenizer's."""

import torch

from fastcache_core.config import CacheParams
from models.stand_ins import t5_encoder, word_tokenizer
from service.engine.families import GenerationSpec, runner_for
from tests.tiny_pipelines import tiny_sd3_pipeline


def test_sd3_keeps_t5s_longer_prompt_beside_its_clip_encoders():
    from diffusers import StableDiffusion3Pipeline

    tiny = tiny_sd3_pipeline()  # CLIP tokenizers of 16 tokens
    components = {**tiny.components, "text_encoder_3": t5_encoder(32).eval(), "tokenizer_3": word_tokenizer(24)}
    runner = runner_for(StableDiffusion3Pipeline(**components), torch.device("cpu"), torch.float32)
    spec = GenerationSpec("a red cat", None, 2, 1.0, 0, 16, 16, CacheParams())
    sample = runner.prepare("sample", spec)
    # SD3 concatenates CLIP's tokens and T5's: 16 + 24 (T5 was cut to CLIP's 16 before)
    assert sample.cond["encoder_hidden_states"].shape[1] == 16 + 24
