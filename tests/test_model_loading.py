"""Model directories load with their label names and without diffusers' "Expected types for id2label" warning."""

import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from diffusers import DiTPipeline

from models.pipeline_io import load_dit_pipeline
from service.engine.loading import load_pipeline
from service.settings import DEFAULT_MODEL


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def id2label_complaints() -> Iterator[Callable[[], list[str]]]:
    """A function returning what has been logged or warned about id2label so far in the test.

    diffusers' loggers do not propagate to the root logger, so caplog would not see them; the level is
    pinned to WARNING because other code in the session (bench.cache) may have turned diffusers down.
    """
    logger = logging.getLogger("diffusers")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            def complaints() -> list[str]:
                messages = [r.getMessage() for r in handler.records] + [str(w.message) for w in caught]
                return [m for m in messages if "id2label" in m]

            yield complaints
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _service_loader(path: Path) -> Any:
    return load_pipeline(str(path), device="cpu", dtype="float32")


LOADERS: dict[str, Callable[[Path], Any]] = {
    "models.pipeline_io.load_dit_pipeline": load_dit_pipeline,
    "service.engine.loading.load_pipeline": _service_loader,
}


@pytest.fixture(params=["bundled digits-dit", "saved by save_dit_pipeline"])
def model_dir(request, tiny_dit_dir) -> Path:
    return Path(DEFAULT_MODEL) if request.param == "bundled digits-dit" else tiny_dit_dir


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_model_directory_loads_with_its_labels_and_no_id2label_warning(model_dir, loader, id2label_complaints):
    pipe = LOADERS[loader](model_dir)
    assert pipe.get_label_ids(["seven", "zero"]) == [7, 0]
    assert not id2label_complaints(), id2label_complaints()


def test_plain_from_pretrained_still_logs_the_warning_our_loaders_avoid(tiny_dit_dir, id2label_complaints):
    # model_index.json can only hold string keys; DiTPipeline annotates dict[int, str]. If a diffusers
    # release stops complaining, this fails: then load_dit_pipeline and load_pipeline's id2label can go.
    pipe = DiTPipeline.from_pretrained(tiny_dit_dir)
    assert pipe.get_label_ids(["seven"]) == [7]
    assert any("Expected types for id2label" in m for m in id2label_complaints())
