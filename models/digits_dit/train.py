"""Train the bundled default model: a class-conditional DiT on handwritten digits, on CPU.

    python -m models.digits_dit.train --out models/digits-dit

Produces a standard diffusers ``DiTPipeline`` directory (transformer, VAE, DDIM scheduler, id2label)
plus ``classifier/`` (the digit classifier used for class accuracy and digits FID). Every stage is
seeded and shows a progress bar. Stages: ``classifier``, ``vae``, ``dit`` (each reuses the output of
the earlier ones when it already exists in ``--out``), ``eval``. The loops are in ``models.training``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.digits_dit.data import LABEL_NAMES, DigitClassifier, load_digits_split
from models.pipeline_io import save_dit_pipeline
from models.training import (
    NULL_CLASS,
    accuracy_on,
    build_ddim_scheduler,
    evaluate_pipeline,
    fit_classifier,
    fit_latent_dit,
    fit_vae,
    reconstruction_psnr,
    run_stages,
    set_latent_scaling,
    stage_parser,
)

__all__ = [
    "NULL_CLASS",
    "build_scheduler",
    "build_transformer",
    "build_vae",
    "evaluate",
    "main",
    "train_classifier",
    "train_dit",
    "train_vae",
]

build_scheduler = build_ddim_scheduler


def train_classifier(out: Path, steps: int, seed: int) -> float:
    """Train the digit classifier; return its held-out accuracy."""
    torch.manual_seed(seed)
    data = load_digits_split()
    model = DigitClassifier()

    def next_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(data.train_labels), (128,), generator=gen)
        # small random shifts make the classifier robust to the slight misplacement of generated digits
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
        return torch.roll(data.train_images[idx], shifts=shift, dims=(2, 3)), data.train_labels[idx]

    fit_classifier(model, next_batch, steps, seed)
    model.save(out / "classifier")
    return accuracy_on(model, data.test_images, data.test_labels)


def build_vae(sample_size: int = 32, mid_block_attention: bool = True):
    """The digits VAE: 1 -> 4 channels, 2x downsampling (two down blocks of 32 and 64 channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size,
        mid_block_add_attention=mid_block_attention,
    )


def train_vae(out: Path, steps: int, seed: int, kl_weight: float = 1e-4) -> float:
    """Train the VAE, set its latent scaling factor, save it; return held-out reconstruction PSNR."""
    torch.manual_seed(seed)
    data = load_digits_split()
    vae = build_vae()

    def next_images(gen: torch.Generator) -> torch.Tensor:
        return data.train_images[torch.randint(0, len(data.train_labels), (64,), generator=gen)]

    fit_vae(vae, next_images, steps, seed, kl_weight=kl_weight)
    set_latent_scaling(vae, data.train_images)
    vae.save_pretrained(out / "vae")
    return reconstruction_psnr(vae, data.test_images)


def build_transformer():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=32,
    )


def train_dit(out: Path, steps: int, seed: int, batch_size: int, lr: float, ema_decay: float) -> dict:
    """Train the DiT in the VAE's latent space with 10% label dropout for guidance; save the pipeline."""
    from diffusers import AutoencoderKL, DiTPipeline

    torch.manual_seed(seed)
    data = load_digits_split()
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    with torch.no_grad():
        posterior = vae.encode(data.train_images).latent_dist
        lat_mean, lat_std = posterior.mean, posterior.std
    scaling = vae.config.scaling_factor
    scheduler = build_scheduler()
    model = build_transformer()

    def next_latents(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(data.train_labels), (batch_size,), generator=gen)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        return z0, data.train_labels[idx]

    def save(ema: torch.nn.Module) -> None:
        save_dit_pipeline(DiTPipeline(transformer=ema, vae=vae, scheduler=scheduler), out, LABEL_NAMES)

    return fit_latent_dit(model, scheduler, next_latents, steps, seed, batch_size, lr, ema_decay, save)


def evaluate(out: Path, samples: int, guidance_scales: list[float], steps: int = 50) -> dict:
    """Generate ``samples`` digits per guidance scale and measure class accuracy and digits FID."""
    from models.digits_dit.judge import DigitsJudge

    return evaluate_pipeline(out, DigitsJudge.from_model_dir(out), samples, guidance_scales, "digits_fid", steps)


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, Path("models/digits-dit")).parse_args(argv)
    run_stages(
        args,
        {
            "classifier": lambda: {
                "classifier_test_accuracy": train_classifier(args.out, args.classifier_steps, args.seed)
            },
            "vae": lambda: {"vae_test_psnr_db": train_vae(args.out, args.vae_steps, args.seed)},
            "dit": lambda: {
                "dit": {
                    "steps": args.dit_steps,
                    "batch_size": args.batch_size,
                    "lr": args.lr,
                    **train_dit(args.out, args.dit_steps, args.seed, args.batch_size, args.lr, args.ema_decay),
                }
            },
            "eval": lambda: {
                "eval": evaluate(args.out, args.eval_samples, [float(g) for g in args.eval_guidance.split(",")])
            },
        },
    )


if __name__ == "__main__":
    main()
