"""How ``bench.cache`` runs a method: loading the pipelines, generating a fixed list of images, and
measuring each row (FLOPs of the counted run, interleaved timed runs, peak memory, overhead timers)."""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.cache.instrument import TransformerFlops, TransformerTimer
from bench.cache.variant import Variant
from bench.common import PeakMemory

log = logging.getLogger(__name__)


@dataclass
class ImageRunner:
    """Runs a DiT pipeline on a fixed list of (label, seed) in batches."""

    labels: list[int]
    seeds: list[int]
    steps: int
    guidance: float
    batch_size: int
    device: str

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(
        self,
        pipe,
        count: int | None = None,
        handle: Any = None,
        steps: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Images (n, c, h, w) float32 on CPU in [0, 1] for the first ``count`` samples, and seconds spent."""
        count = len(self.seeds) if count is None else count
        steps = steps or self.steps
        images, seconds = [], 0.0
        for start in range(0, count, self.batch_size):
            stop = min(count, start + self.batch_size)
            if handle is not None and hasattr(handle, "set_run"):
                set_run(handle, steps, self.guidance)
            generators = [torch.Generator().manual_seed(s) for s in self.seeds[start:stop]]
            self._sync()
            began = time.perf_counter()
            out = pipe(
                class_labels=self.labels[start:stop],
                guidance_scale=self.guidance,
                num_inference_steps=steps,
                generator=generators,
                output_type="pt",
            ).images
            self._sync()
            seconds += time.perf_counter() - began
            images.append(out.float().cpu())
            if on_batch is not None:
                on_batch(stop - start)
        return torch.cat(images), seconds


def set_run(handle: Any, steps: int, guidance: float) -> None:
    """Tell a FastCache handle the run's step count and guidance scale (its rule adapts to both)."""
    handle.set_run(num_steps=steps, guidance_scale=guidance)


@dataclass
class Measured:
    images: torch.Tensor
    flops: float
    ratios: list[float] = field(default_factory=list)
    method_seconds: list[float] = field(default_factory=list)
    reference_seconds: list[float] = field(default_factory=list)
    peak_mem: int = 0
    deterministic: bool = True
    timer: TransformerTimer | None = None


def share_parameters_clone(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` that shares its parameters and buffers (no extra weight memory)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    import diffusers
    from diffusers import DiTPipeline

    from models.pipeline_io import load_dit_pipeline

    diffusers.utils.logging.set_verbosity_error()
    pipe = load_dit_pipeline(model, dtype=dtype)
    if not isinstance(pipe, DiTPipeline):
        raise SystemExit(f"{model} is not a DiTPipeline directory")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def load_judge(args: argparse.Namespace, sample_images: torch.Tensor):
    """The bundled model's judge (class accuracy, FID), or None (with the reason logged): the digits
    judge for 32x32 digits, the canvas judge for 64x64 canvases, by the classifier shipped with the model."""
    from models.digits_dit.data import IMAGE_SIZE, DigitClassifier
    from models.digits_dit.judge import DigitsJudge

    directory = Path(args.judge) if args.judge else Path(args.model) / "classifier"
    if not (directory / "config.json").is_file():
        log.warning("no digit classifier at %s: class_accuracy and fid are null", directory)
        return None
    size = sample_images.shape[-1]
    if sample_images.shape[1] == 1 and size == IMAGE_SIZE:
        return DigitsJudge(DigitClassifier.load(directory))
    from models.canvas_dit.data import CANVAS_SIZE, CanvasClassifier
    from models.canvas_dit.judge import CanvasJudge

    if sample_images.shape[1] == 1 and size == CANVAS_SIZE:
        return CanvasJudge(CanvasClassifier.load(directory))
    log.warning(
        "images of shape %s are neither %dx%d digits nor %dx%d canvases: class_accuracy and fid are null",
        tuple(sample_images.shape[1:]),
        IMAGE_SIZE,
        IMAGE_SIZE,
        CANVAS_SIZE,
        CANVAS_SIZE,
    )
    return None


def bench_pipeline(ref_pipe: Any) -> Any:
    """The pipeline the methods run on: a structural copy of the reference's transformer sharing its
    weights, so no cache hook ever touches the uncached reference pipeline."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline(
        transformer=share_parameters_clone(ref_pipe.transformer), vae=ref_pipe.vae, scheduler=ref_pipe.scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def counted_run(
    gen: ImageRunner, pipe: Any, variant: Variant, warm_steps: int, on_batch: Callable[[int], None] | None = None
) -> tuple[Measured, Any]:
    """Attach ``variant`` to ``pipe``'s transformer, warm it up (one image of ``warm_steps`` steps: fits
    the cache's cost model, warms the hooks' code paths) and generate every image under the FLOP
    counter. Returns the measurement and the attached handle (``None`` for the reference), which the
    caller removes."""
    handle = None if variant.attach is None else variant.attach(pipe.transformer)
    try:
        if handle is not None:
            gen.run(pipe, count=1, handle=handle, steps=warm_steps)
        counter = TransformerFlops(pipe.transformer)
        try:
            images, _ = gen.run(pipe, handle=handle, on_batch=on_batch)
        finally:
            counter.remove()
    except BaseException:
        if handle is not None:
            handle.remove()
        raise
    return Measured(images=images, flops=float(counter.total)), handle


def measure_variants(
    variants: list[Variant],
    gen: ImageRunner,
    ref_pipe: Any,
    bench_pipe: Any,
    args: argparse.Namespace,
    device: str,
) -> tuple[dict[tuple, Measured], Measured, float]:
    """Every row's measurement (rows with equal keys measured once), the uncached reference's, and the
    seconds it all took.

    Per row: the counted run (``counted_run``), then ``args.repeats`` timed runs of the first
    ``args.timing_samples`` images, each paired with a timed uncached run (the order alternates), peak
    memory over the method's timed runs, and one more run with timers in every block."""
    from tqdm.auto import tqdm

    memory = PeakMemory(device)
    warm_steps = min(args.steps, 3)
    # one unit of work per image and method; each method's image count is spread over its runs
    per_method_units = args.samples + 2 * args.repeats * args.timing_samples
    bar = tqdm(
        total=len(variants) * args.samples,
        desc="methods x samples",
        unit="img",
        file=sys.stderr,
        disable=args.no_progress,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
    )

    done = {"units": 0, "shown": 0}

    def advance(n: int, whole_method: bool = False) -> None:
        done["units"] += per_method_units if whole_method else n
        target = min(bar.total, done["units"] * args.samples // per_method_units)
        bar.update(target - done["shown"])
        done["shown"] = target

    # warm the reference pipeline (kernels, allocator) before anything is timed
    gen.run(ref_pipe, count=1, steps=warm_steps)

    measured: dict[tuple, Measured] = {}
    reference: Measured | None = None
    started = time.perf_counter()
    for variant in variants:
        bar.set_postfix_str(f"{variant.method}: {variant.label}")
        if variant.key in measured:
            log.info(
                "%s %s computes the same as an earlier row: reusing its measurement", variant.method, variant.label
            )
            advance(0, whole_method=True)
            continue
        pipe = ref_pipe if variant.attach is None else bench_pipe
        result, handle = counted_run(gen, pipe, variant, warm_steps, on_batch=advance)
        try:
            memory.reset()
            for repeat in range(args.repeats):
                order = ("ref", "method") if repeat % 2 == 0 else ("method", "ref")
                times = {}
                for which in order:
                    if which == "ref":
                        ref_images, times["ref"] = gen.run(ref_pipe, count=args.timing_samples, on_batch=advance)
                        if reference is not None and not torch.equal(
                            ref_images, reference.images[: args.timing_samples]
                        ):
                            log.warning("the uncached reference changed between runs: results are not comparable")
                    else:
                        with memory.window():
                            timed_images, times["method"] = gen.run(
                                pipe, count=args.timing_samples, handle=handle, on_batch=advance
                            )
                        if not torch.equal(timed_images, result.images[: args.timing_samples]):
                            result.deterministic = False
                result.ratios.append(times["ref"] / max(times["method"], 1e-12))
                result.method_seconds.append(times["method"])
                result.reference_seconds.append(times["ref"])
            result.peak_mem = memory.peak
            # one more run with timers in every block: where the method's wall-clock goes
            timer = TransformerTimer(pipe.transformer, device)
            try:
                gen.run(pipe, count=args.timing_samples, handle=handle)
            finally:
                timer.remove()
            result.timer = timer
        finally:
            if handle is not None:
                handle.remove()
        if variant.attach is None:
            reference = result
        measured[variant.key] = result
    bar.close()
    memory.close()
    if reference is None:
        raise RuntimeError("the uncached reference row is missing")
    return measured, reference, time.perf_counter() - started
