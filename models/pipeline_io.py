"""Saving and loading class-conditional DiT pipelines as local diffusers directories (bundled models, fixtures).

Why a loader: ``DiTPipeline`` annotates its ``id2label`` argument ``dict[int, str]`` and
``from_pretrained`` logs "Expected types for id2label ..." when the value it read from
``model_index.json`` has other key types. JSON object keys are always strings, so no file content
can satisfy that check (diffusers' own DiT checkpoints trip it too). ``DiTPipeline`` itself turns the
keys into ints, so the directory stays the standard layout any diffusers user can load (labels
included); our code loads it with :func:`load_dit_pipeline`, which hands ``id2label`` over with int
keys, and nothing is logged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def save_dit_pipeline(pipe: Any, out: str | Path, labels: Sequence[str]) -> None:
    """``save_pretrained`` plus ``id2label`` in model_index.json, which DiTPipeline reads back but does
    not write itself; with it ``pipe.get_label_ids(["seven"])`` works after loading."""
    pipe.save_pretrained(out)
    index_path = Path(out) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["id2label"] = {str(i): name for i, name in enumerate(labels)}  # JSON keys are strings
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def read_id2label(model: str | Path) -> dict[int, str] | None:
    """The class names by id of a pipeline directory or hub id, with the int keys ``DiTPipeline`` expects;
    ``None`` if its model_index.json has none."""
    from diffusers import DiTPipeline

    labels = DiTPipeline.load_config(model).get("id2label")
    return {int(key): str(name) for key, name in labels.items()} if labels else None


def load_dit_pipeline(model: str | Path, **kwargs: Any) -> Any:
    """``DiTPipeline.from_pretrained`` with the model's ``id2label`` passed in the expected type."""
    from diffusers import DiTPipeline

    id2label = read_id2label(model)
    if id2label is not None:
        kwargs.setdefault("id2label", id2label)
    return DiTPipeline.from_pretrained(model, **kwargs)
