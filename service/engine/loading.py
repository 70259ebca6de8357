"""Loading a diffusers pipeline and wrapping it in an ``Engine`` (used by the API and the worker)."""

from __future__ import annotations

from typing import Any

import torch

from service.engine.engine import Engine
from service.settings import Settings


def load_pipeline(model: str, device: str, dtype: str) -> Any:
    """Load a diffusers pipeline from a local directory or hub id (``from_pretrained``), on ``device``."""
    from diffusers import DiffusionPipeline

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    # components saved as absent (e.g. SD3 without its T5 encoder) must be passed as None explicitly
    index = DiffusionPipeline.load_config(model)
    overrides: dict[str, Any] = {
        name: None
        for name, value in index.items()
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is None and value[1] is None
    }
    # DiTPipeline annotates id2label dict[int, str], but JSON keys are strings: handed over as read, it makes
    # from_pretrained log "Expected types for id2label" on every load. Passed with int keys, nothing is logged.
    labels = index.get("id2label")
    if isinstance(labels, dict):
        overrides["id2label"] = {int(key): name for key, name in labels.items()}
    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_threads(device: str) -> int:
    """Torch threads when ``--threads`` is unset: on CPU one fewer than torch's choice (at least one).

    The HTTP server, image encoding and the Redis loop need a core too: on 2 cores, one torch thread
    served mixed traffic 15-40% faster than two (bench/README.md, "Mixed traffic results"), where a
    forward's cost barely shrank with its batch. On accelerators the threads only run the host side,
    and torch's choice stays.
    """
    available = torch.get_num_threads()
    return max(1, available - 1) if device == "cpu" else available


def build_engine(settings: Settings) -> Engine:
    """Load the configured pipeline and wrap it in an engine (not started)."""
    from service.engine.families import runner_for

    device = settings.resolved_device()
    torch.set_num_threads(settings.threads or default_threads(device))
    pipe = load_pipeline(settings.model, device, settings.resolved_dtype())
    runner = runner_for(pipe, torch.device(device), pipe.transformer.dtype)
    return Engine(
        runner,
        settings.served_model_name,
        settings.max_batch_size,
        settings.max_queue,
        idle_release_seconds=settings.idle_release_seconds,
    )
