"""Training loops and the stage runner shared by the bundled models (``models/*_dit/train.py``).

Each model's ``train.py`` says what its data is (a function that draws a batch from a
``torch.Generator``) and how big its networks are; the loops here do the rest: the judge's classifier,
the VAE (with its latent scaling factor), the DiT in the VAE's latent space with classifier-free-guidance
label dropout and EMA, the uncached evaluation, and the ``--stages`` command line with its
``training_report.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

NULL_CLASS = 1000  # DiTPipeline hard-codes 1000 as the unconditional class id
LABEL_DROPOUT = 0.1  # share of training samples whose label is replaced by NULL_CLASS (for guidance)

BatchFn = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
"""Draws one training batch, (inputs, integer labels), from the generator it is given."""


def fit_classifier(model: torch.nn.Module, next_batch: BatchFn, steps: int, seed: int, lr: float = 2e-3) -> None:
    """Train ``model`` with cross-entropy on ``steps`` batches of ``next_batch`` (AdamW, one-cycle lr)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="classifier")
    for _ in bar:
        images, labels = next_batch(gen)
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()


@torch.no_grad()
def accuracy_on(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> float:
    """Share of ``images`` that ``model`` (in eval mode) classifies as their label."""
    predictions = torch.cat([model(images[i : i + chunk]).argmax(1) for i in range(0, len(images), chunk)])
    return (predictions == labels).float().mean().item()


def fit_vae(
    vae,
    next_images: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    seed: int,
    kl_weight: float = 1e-4,
    lr: float = 1e-3,
) -> None:
    """Train an ``AutoencoderKL`` on L1 + L2 reconstruction of posterior samples plus a small KL term."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        x = next_images(gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}")
    vae.eval()


@torch.no_grad()
def set_latent_scaling(vae, images: torch.Tensor, chunk: int = 256) -> float:
    """Set the VAE's ``scaling_factor`` to 1 / std of the latents of ``images``; return it."""
    latents = torch.cat([vae.encode(images[i : i + chunk]).latent_dist.mean for i in range(0, len(images), chunk)])
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    return scaling


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, chunk: int = 256) -> float:
    """PSNR in dB (images in [-1, 1] compared in [0, 1]) of the VAE's reconstruction of ``images``."""
    recon = torch.cat(
        [
            vae.decode(vae.encode(images[i : i + chunk]).latent_dist.mean).sample.clamp(-1, 1)
            for i in range(0, len(images), chunk)
        ]
    )
    mse = F.mse_loss((recon + 1) / 2, (images + 1) / 2).item()
    return 10 * math.log10(1.0 / mse)


def build_ddim_scheduler(prediction_type: str = "epsilon"):
    """The DDIM scheduler of the bundled models: 1000 linear-beta steps, epsilon (or v) prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )


def fit_latent_dit(
    model,
    scheduler,
    next_latents: BatchFn,
    steps: int,
    seed: int,
    batch_size: int,
    lr: float,
    ema_decay: float,
    save: Callable[[torch.nn.Module], None],
    save_every: int = 2000,
    min_snr_gamma: float | None = None,
    lr_decay: bool = True,
    bf16: bool = False,
    max_seconds: float | None = None,
    warmup_steps: int | None = None,
) -> dict:
    """Train a class-conditional ``DiTTransformer2DModel``; ``save`` gets the EMA model.

    The network predicts what ``scheduler.config.prediction_type`` says: the noise (``epsilon``, MSE
    to the noise) or ``v_prediction`` (MSE to v = sqrt(a) * noise - sqrt(1 - a) * z0).

    ``next_latents(gen)`` gives ``batch_size`` scaled clean latents and their labels. AdamW with a
    linear warm-up of ``warmup_steps`` (default ``min(500, steps // 10)``, at least 1), then cosine
    decay to 10% of ``lr`` (or, without ``lr_decay``, constant ``lr``, leaving the averaging to the
    EMA), gradient clipping 1.0, EMA of the weights (what ``save`` receives), labels dropped to
    ``NULL_CLASS`` for 10% of samples.

    * ``min_snr_gamma`` caps the weight of the nearly clean timesteps (Min-SNR, Hang et al. 2023). In
      terms of the clean-latent error ||z0 - z0_hat||^2, epsilon MSE weighs a timestep by SNR and v MSE
      by SNR + 1; the cap makes these min(SNR, gamma) for epsilon and min(SNR, gamma) + 1 for v. The
      "+ 1" matters: it keeps the nearly pure-noise timesteps, where the class and the layout of the
      image are decided, at full weight, while epsilon weighs them by their SNR (~3e-4 at t = 900).
    * ``bf16`` runs the forward pass under bfloat16 autocast (weights, optimizer and loss stay fp32).
    * ``max_seconds`` stops early, saving the EMA, once the wall clock passes it. With a constant ``lr``
      and a fixed ``warmup_steps`` the first N steps of any run are the same, so a stopped run is
      reproduced by ``steps = N``.

    Returns the steps done, the final smoothed loss and the measured speed.
    """
    alphas_cumprod = scheduler.alphas_cumprod
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    if not v_prediction and scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    model.train()
    # diffusers gives every block its own label embedder, each dropping labels independently in train
    # mode; drop labels once per sample instead, consistently across blocks, as DiT was trained.
    for module in model.modules():
        if module.__class__.__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(500, steps // 10) if warmup_steps is None else warmup_steps)
    if lr_decay:

        def lr_at(s: int) -> float:  # linear warm-up, then cosine decay to a tenth
            return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    else:

        def lr_at(s: int) -> float:  # linear warm-up, then constant
            return min(1.0, (s + 1) / warmup)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="dit")
    running = None
    done = 0
    start = time.time()
    for step in bar:
        z0, labels = next_latents(gen)
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        labels = torch.where(torch.rand(batch_size, generator=gen) < LABEL_DROPOUT, NULL_CLASS, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(zt, timestep=t, class_labels=labels).sample.float()
        target = a.sqrt() * noise - (1 - a).sqrt() * z0 if v_prediction else noise
        if min_snr_gamma is None:
            loss = F.mse_loss(pred, target)
        else:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            if v_prediction:
                weight = (snr.clamp(max=min_snr_gamma) + 1) / (snr + 1)
            else:
                weight = snr.clamp(max=min_snr_gamma) / snr
            loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        done = step + 1
        out_of_time = max_seconds is not None and time.time() - start > max_seconds
        if done % save_every == 0 or done == steps or out_of_time:
            save(ema)
        if out_of_time:
            break
    seconds = time.time() - start
    return {
        "steps_done": done,
        "final_loss_smoothed": round(running, 5),
        "train_seconds": round(seconds, 1),
        "steps_per_second": round(done / seconds, 4),
    }


@torch.no_grad()
def generate_labelled(
    pipe, samples: int, guidance_scale: float, steps: int, chunk: int = 50, seed_base: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` images with labels cycling 0-9, uncached, in chunks with fixed seeds; images in [0, 1]."""
    labels = [i % 10 for i in range(samples)]
    images = []
    for start in tqdm(range(0, samples, chunk), desc=f"eval guidance {guidance_scale}"):
        gen = torch.Generator().manual_seed(seed_base + start)
        images.append(
            pipe(
                labels[start : start + chunk],
                guidance_scale=guidance_scale,
                num_inference_steps=steps,
                generator=gen,
                output_type="pt",
            ).images
        )
    return torch.cat(images), torch.tensor(labels)


def evaluate_pipeline(
    out: Path, judge, samples: int, guidance_scales: Sequence[float], fid_key: str, steps: int = 50
) -> dict:
    """Class accuracy and the judge's FID of ``samples`` uncached images per guidance scale.

    ``judge`` has ``class_accuracy(images, labels)``, ``fid_to_real(images)`` and
    ``fid_real_train_vs_test()`` (the metric's floor, reported as ``real_test_fid``).
    """
    from models.pipeline_io import load_dit_pipeline

    pipe = load_dit_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    results: dict = {}
    for g in guidance_scales:
        images, labels = generate_labelled(pipe, samples, g, steps)
        results[str(g)] = {
            "class_accuracy": judge.class_accuracy(images, labels),
            fid_key: judge.fid_to_real(images),
            "samples": samples,
            "steps": steps,
        }
    results["real_test_fid"] = judge.fid_real_train_vs_test()
    return results


def stage_parser(description: str, out: Path, **defaults) -> argparse.ArgumentParser:
    """The ``train.py`` command line shared by the bundled models; ``defaults`` override option defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--stages", default="classifier,vae,dit,eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--dit-steps", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--eval-guidance", default="1.5,2.0,3.0", help="guidance scales to evaluate")
    parser.add_argument("--threads", type=int, default=2)
    parser.set_defaults(**defaults)
    return parser


def run_stages(args: argparse.Namespace, stages: Mapping[str, Callable[[], dict]]) -> dict:
    """Run ``args.stages`` in order; each stage returns entries merged into ``training_report.json``.

    The report keeps what earlier runs measured, so stages can be run one at a time. Each stage's wall
    clock lands under ``seconds``.
    """
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "training_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for stage in args.stages.split(","):
        if stage not in stages:
            raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(stages)}")
        start = time.time()
        entries = stages[stage]()
        report.update(entries)
        report.setdefault("seconds", {})[stage] = round(time.time() - start, 1)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({stage: entries}, default=str)[:400], flush=True)
    return report
