"""Judging generated canvases: class accuracy and "canvas FID" with the canvas model's own classifier.

Same measures as :class:`models.digits_dit.judge.DigitsJudge`, on 64x64 canvases: the reference set is
a fixed set of canvases drawn from the TEST digits (every test digit three times, random place and
size), and the metric's floor compares an equally drawn set of TRAIN-digit canvases with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastcache_core.quality import frechet_distance
from models.canvas_dit.data import CanvasClassifier, load_canvas_source
from models.digits_dit.judge import DigitsJudge

REFERENCE_REPEATS = 3  # canvases per test digit in the FID reference set
REFERENCE_SEED = 12345  # placement of the reference canvases (not a training seed)


class CanvasJudge(DigitsJudge):
    """Class accuracy and canvas FID for images of the canvas model, (n, 1, 64, 64) in [0, 1]."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        self.classifier = classifier.eval()
        test = load_canvas_source("test")
        self.real_test_images, self.real_test_labels = test.fixed_set(REFERENCE_REPEATS * len(test), REFERENCE_SEED)
        self._real_test_features = self.features((self.real_test_images + 1) / 2)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> CanvasJudge:
        """Load the classifier shipped in ``<model_dir>/classifier``."""
        return cls(CanvasClassifier.load(Path(model_dir) / "classifier"))

    def real_test_accuracy(self) -> float:
        """The classifier's accuracy on the reference canvases of held-out digits."""
        return self.class_accuracy((self.real_test_images + 1) / 2, self.real_test_labels)

    def fid_real_train_vs_test(self) -> float:
        """The floor of the metric: canvases of training digits against the reference canvases."""
        train = load_canvas_source("train")
        images, _ = train.fixed_set(len(self.real_test_images), REFERENCE_SEED)
        return frechet_distance(self.features((images + 1) / 2), self._real_test_features)
