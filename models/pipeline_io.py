"""Saving class-conditional DiT pipelines as local diffusers directories (bundled models, test fixtures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def save_dit_pipeline(pipe, out: Path, labels: Sequence[str]) -> None:
    """``save_pretrained`` plus ``id2label`` in model_index.json, which DiTPipeline reads back but does
    not write itself; with it ``pipe.get_label_ids(["seven"])`` works after ``from_pretrained``."""
    pipe.save_pretrained(out)
    index_path = Path(out) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["id2label"] = {str(i): name for i, name in enumerate(labels)}
    index_path.write_text(json.dumps(index, indent=2) + "\n")
