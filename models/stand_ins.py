"""Text-encoder and tokenizer stand-ins built from configs: conditioning of the real shape, no download.

A pipeline needs a tokenizer and text encoders to run, and none can be fetched here. These are
word-level tokenizers and one-layer T5/CLIP encoders at any output width: the tiny test pipelines use
them at width 32, ``bench.shapes`` at the published widths (T5-XXL's 4096, CLIP-L's 768, CLIP-G's 1280),
so the transformer sees prompt embeddings of the real size. Their outputs mean nothing.
"""

from __future__ import annotations

from typing import Any

WORDS = ["a", "an", "the", "cat", "dog", "red", "blue", "green", "photo", "of", "on", "tree", "car", "sky"]


def word_tokenizer(max_length: int = 16) -> Any:
    """A word-level fast tokenizer over ``WORDS`` with pad/eos/unk/bos tokens and ``max_length``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<|startoftext|>": 3}
    for word in WORDS:
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        model_max_length=max_length,
    )


def t5_encoder(d_model: int = 32) -> Any:
    """A one-layer T5 encoder with ``d_model`` output channels over the stand-in vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(WORDS) + 4,
            d_model=d_model,
            d_ff=64,
            d_kv=8,
            num_layers=1,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def clip_encoder(hidden: int = 32, projection: bool = False, max_positions: int = 16) -> Any:
    """A one-layer CLIP text encoder of width ``hidden`` (with a projection of the same width when asked)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        projection_dim=hidden,
        pad_token_id=0,
        bos_token_id=3,
        eos_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
