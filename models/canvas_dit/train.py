"""Train the canvas DiT: one handwritten digit at a random place and size on a 64x64 dark canvas, on CPU.

    python -m models.canvas_dit.train --out models/canvas-dit

Produces a standard diffusers ``DiTPipeline`` directory (transformer, VAE, DDIM scheduler, id2label)
plus ``classifier/`` (the canvas classifier used for class accuracy and canvas FID). The VAE is the
digits VAE's architecture (2x downsampling, 4 latent channels) without its mid-block attention, so a
64x64 canvas becomes a 32x32x4 latent; the DiT's patch 2 makes that 16x16 = 256 tokens. Canvases are
drawn on the fly from the TRAIN digits (``models.canvas_dit.data``), so the DiT never sees the same
canvas twice. Stages: ``classifier``, ``vae``, ``dit``, ``eval``, and ``grid`` (a PNG of samples at
``--grid-out``, for looking at). The loops are in ``models.training``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.canvas_dit.data import CANVAS_SIZE, LABEL_NAMES, CanvasClassifier, load_canvas_source
from models.digits_dit.train import build_vae
from models.pipeline_io import save_dit_pipeline
from models.training import (
    accuracy_on,
    build_ddim_scheduler,
    evaluate_pipeline,
    fit_classifier,
    fit_latent_dit,
    fit_vae,
    generate_labelled,
    reconstruction_psnr,
    run_stages,
    set_latent_scaling,
    stage_parser,
)

VAE_FACTOR = 2
PATCH_SIZE = 2
HEAD_DIM = 32
TEST_SEED = 1  # placement of the held-out canvases that measure the classifier and the VAE
SCALING_SEED = 2  # placement of the training canvases that set the latent scaling factor


def build_canvas_vae():
    """The digits VAE layout for 64x64 canvases, without mid-block attention.

    Attention over the 32x32 = 1,024 latent positions was most of the encoder's cost, and a digit's
    strokes are local; without it the VAE is convolutional, so where a digit sits does not change how
    it is encoded.
    """
    return build_vae(sample_size=CANVAS_SIZE, mid_block_attention=False)


def build_transformer(width: int, depth: int):
    """A DiT of ``depth`` blocks and ``width`` channels on the 32x32x4 latent, patch 2: 256 tokens."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=width // HEAD_DIM,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        num_layers=depth,
        sample_size=CANVAS_SIZE // VAE_FACTOR,
        patch_size=PATCH_SIZE,
        num_embeds_ada_norm=1000,
        norm_num_groups=32,
    )


def held_out_canvases() -> tuple[torch.Tensor, torch.Tensor]:
    """Three canvases per TEST digit, at fixed places and sizes."""
    test = load_canvas_source("test")
    return test.fixed_set(3 * len(test), TEST_SEED)


def train_classifier(out: Path, steps: int, seed: int, batch_size: int = 128) -> float:
    """Train the canvas classifier on TRAIN-digit canvases; return its accuracy on held-out canvases."""
    torch.manual_seed(seed)
    train = load_canvas_source("train")
    model = CanvasClassifier()
    fit_classifier(model, lambda gen: train.sample(batch_size, gen), steps, seed)
    model.save(out / "classifier")
    return accuracy_on(model, *held_out_canvases())


def train_vae(out: Path, steps: int, seed: int, batch_size: int) -> float:
    """Train the VAE on TRAIN-digit canvases, set its scaling factor, save it; return held-out PSNR."""
    torch.manual_seed(seed)
    train = load_canvas_source("train")
    vae = build_canvas_vae()
    fit_vae(vae, lambda gen: train.sample(batch_size, gen)[0], steps, seed)
    set_latent_scaling(vae, train.fixed_set(len(train), SCALING_SEED)[0])
    vae.save_pretrained(out / "vae")
    return reconstruction_psnr(vae, held_out_canvases()[0])


def train_dit(out: Path, args) -> dict:
    """Train the DiT on latents of fresh TRAIN-digit canvases; save the pipeline (EMA weights) to ``out``."""
    from diffusers import AutoencoderKL, DiTPipeline

    torch.manual_seed(args.seed)
    train = load_canvas_source("train")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval().requires_grad_(False)
    scaling = vae.config.scaling_factor
    scheduler = build_ddim_scheduler(args.prediction_type)
    model = build_transformer(args.width, args.depth)
    if args.dit_init:
        # continue from a saved pipeline's (EMA) transformer; the optimizer starts afresh with its warm-up
        from diffusers import DiTTransformer2DModel

        model.load_state_dict(DiTTransformer2DModel.from_pretrained(args.dit_init / "transformer").state_dict())

    def next_latents(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        canvases, labels = train.sample(args.batch_size, gen)
        # posterior means, not samples: after its short training the VAE's posterior std is still about
        # half the latents' spread, noise the DiT would otherwise have to learn to draw
        with torch.no_grad():
            return vae.encode(canvases).latent_dist.mean * scaling, labels

    def save(ema: torch.nn.Module) -> None:
        save_dit_pipeline(DiTPipeline(transformer=ema, vae=vae, scheduler=scheduler), out, LABEL_NAMES)

    max_seconds = args.dit_max_minutes * 60 if args.dit_max_minutes else None
    measured = fit_latent_dit(
        model,
        scheduler,
        next_latents,
        args.dit_steps,
        args.seed,
        args.batch_size,
        args.lr,
        args.ema_decay,
        save,
        save_every=250,
        min_snr_gamma=args.min_snr_gamma,
        lr_decay=args.lr_decay,
        bf16=args.bf16,
        max_seconds=max_seconds,
        warmup_steps=args.warmup_steps,
    )
    return {
        "steps": args.dit_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_schedule": "linear warm-up, " + ("cosine to 10%" if args.lr_decay else "constant"),
        "warmup_steps": args.warmup_steps,
        "ema_decay": args.ema_decay,
        "min_snr_gamma": args.min_snr_gamma,
        "bf16_autocast": args.bf16,
        "prediction_type": args.prediction_type,
        "width": args.width,
        "depth": args.depth,
        "init": str(args.dit_init) if args.dit_init else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        **measured,
    }


def evaluate(out: Path, samples: int, guidance_scales: list[float], steps: int = 50) -> dict:
    """Generate ``samples`` canvases per guidance scale; class accuracy and canvas FID by the canvas judge."""
    from models.canvas_dit.judge import CanvasJudge

    judge = CanvasJudge.from_model_dir(out)
    results = evaluate_pipeline(out, judge, samples, guidance_scales, "canvas_fid", steps)
    results["classifier_reference_accuracy"] = judge.real_test_accuracy()
    return results


def write_grid(out: Path, path: Path, guidance_scale: float, per_digit: int = 8, steps: int = 50) -> None:
    """A PNG of ``per_digit`` uncached samples per digit (rows zero..nine), for a human to look at."""
    import numpy as np
    from PIL import Image

    from models.pipeline_io import load_dit_pipeline

    pipe = load_dit_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    images, _ = generate_labelled(pipe, 10 * per_digit, guidance_scale, steps, chunk=10 * per_digit)
    # labels cycle 0-9: column j of row d is image j * 10 + d; a 2-pixel grey frame separates tiles
    tiles = torch.nn.functional.pad(images[:, 0], (2, 2, 2, 2), value=0.5)
    side = tiles.shape[-1]
    grid = tiles.reshape(per_digit, 10, side, side).permute(1, 2, 0, 3).reshape(10 * side, per_digit * side)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clamp(0, 1).numpy() * 255).astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(
        __doc__,
        Path("models/canvas-dit"),
        vae_steps=400,
        dit_steps=6000,
        batch_size=32,
        lr=5e-4,
        ema_decay=0.998,
        classifier_steps=1000,
    )
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=128, help="DiT width (a multiple of 32)")
    parser.add_argument("--depth", type=int, default=6, help="DiT blocks")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="v_prediction")
    parser.add_argument(
        "--lr-decay",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="cosine decay of the learning rate over --dit-steps (for a final fine-tune)",
    )
    parser.add_argument("--min-snr-gamma", type=float, default=5.0)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for the DiT's forward pass",
    )
    parser.add_argument(
        "--dit-max-minutes",
        type=float,
        default=None,
        help="stop the DiT early (saving it) past this wall clock; the report says how many steps ran",
    )
    parser.add_argument(
        "--dit-init",
        type=Path,
        default=None,
        help="start the DiT from this pipeline directory's transformer (to train a shipped model further)",
    )
    parser.add_argument("--grid-out", type=Path, default=Path("canvas-samples.png"))
    parser.add_argument("--grid-guidance", type=float, default=2.0)
    parser.add_argument("--grid-per-digit", type=int, default=8)
    args = parser.parse_args(argv)
    run_stages(
        args,
        {
            "classifier": lambda: {
                "classifier_test_accuracy": train_classifier(args.out, args.classifier_steps, args.seed)
            },
            "vae": lambda: {"vae_test_psnr_db": train_vae(args.out, args.vae_steps, args.seed, args.vae_batch_size)},
            "dit": lambda: {"dit": train_dit(args.out, args)},
            "eval": lambda: {
                "eval": evaluate(args.out, args.eval_samples, [float(g) for g in args.eval_guidance.split(",")])
            },
            "grid": lambda: write_grid(args.out, args.grid_out, args.grid_guidance, args.grid_per_digit) or {},
        },
    )


if __name__ == "__main__":
    main()
