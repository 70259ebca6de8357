"""Train the bundled default model: a class-conditional DiT on handwritten digits, on CPU.

    python -m models.digits_dit.train --out models/digits-dit

Produces a standard diffusers ``DiTPipeline`` directory (transformer, VAE, DDIM scheduler, id2label)
plus ``classifier/`` (the digit classifier used for class accuracy and digits FID). Every stage is
seeded and shows a progress bar. Stages: ``classifier``, ``vae``, ``dit`` (each reuses the output of
the earlier ones when it already exists in ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.digits_dit.data import LABEL_NAMES, DigitClassifier, load_digits_split
from models.pipeline_io import load_dit_pipeline, save_dit_pipeline

NULL_CLASS = 1000  # DiTPipeline hard-codes 1000 as the unconditional class id


def train_classifier(out: Path, steps: int, seed: int) -> float:
    """Train the digit classifier; return its held-out accuracy."""
    torch.manual_seed(seed)
    data = load_digits_split()
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="classifier"):
        idx = torch.randint(0, len(data.train_labels), (128,), generator=gen)
        images = data.train_images[idx]
        # small random shifts make the classifier robust to the slight misplacement of generated digits
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
        images = torch.roll(images, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(images), data.train_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.test_images).argmax(1) == data.test_labels).float().mean().item()
    model.save(out / "classifier")
    return accuracy


def build_vae():
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
        sample_size=32,
    )


def train_vae(out: Path, steps: int, seed: int, kl_weight: float = 1e-4) -> float:
    """Train the VAE, set its latent scaling factor, save it; return held-out reconstruction PSNR."""

    torch.manual_seed(seed)
    data = load_digits_split()
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        idx = torch.randint(0, len(data.train_labels), (64,), generator=gen)
        x = data.train_images[idx]
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
    with torch.no_grad():
        latents = vae.encode(data.train_images).latent_dist.mean
        scaling = 1.0 / latents.std().item()
        recon = vae.decode(vae.encode(data.test_images).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (data.test_images + 1) / 2).item()
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out / "vae")
    return 10 * math.log10(1.0 / mse)


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


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )


def train_dit(out: Path, steps: int, seed: int, batch_size: int, lr: float, ema_decay: float) -> None:
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
    alphas_cumprod = scheduler.alphas_cumprod
    model = build_transformer().train()
    # diffusers gives every block its own label embedder, each dropping labels independently in train
    # mode; drop labels once per sample instead, consistently across blocks, as DiT was trained.
    for module in model.modules():
        if module.__class__.__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(500, steps // 10)

    def lr_at(s: int) -> float:  # linear warm-up, then cosine decay to a tenth
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="dit")
    running = None
    for step in bar:
        idx = torch.randint(0, len(data.train_labels), (batch_size,), generator=gen)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        labels = data.train_labels[idx]
        labels = torch.where(torch.rand(batch_size, generator=gen) < 0.1, NULL_CLASS, labels)
        pred = model(zt, timestep=t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
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
        if (step + 1) % 2000 == 0 or step + 1 == steps:
            save_dit_pipeline(DiTPipeline(transformer=ema, vae=vae, scheduler=scheduler), out, LABEL_NAMES)


@torch.no_grad()
def evaluate(out: Path, samples: int, guidance_scales: list[float], steps: int = 50) -> dict:
    """Generate ``samples`` digits per guidance scale and measure class accuracy and digits FID."""
    from models.digits_dit.judge import DigitsJudge

    pipe = load_dit_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    judge = DigitsJudge.from_model_dir(out)
    results = {}
    for g in guidance_scales:
        labels = [i % 10 for i in range(samples)]
        images = []
        for start in tqdm(range(0, samples, 50), desc=f"eval guidance {g}"):
            chunk = labels[start : start + 50]
            gen = torch.Generator().manual_seed(1000 + start)
            images.append(
                pipe(chunk, guidance_scale=g, num_inference_steps=steps, generator=gen, output_type="pt").images
            )
        images = torch.cat(images)
        results[str(g)] = {
            "class_accuracy": judge.class_accuracy(images, torch.tensor(labels)),
            "digits_fid": judge.fid_to_real(images),
            "samples": samples,
            "steps": steps,
        }
    results["real_test_fid"] = judge.fid_real_train_vs_test()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/digits-dit"))
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    report_path = args.out / "training_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for stage in stages:
        start = time.time()
        if stage == "classifier":
            report["classifier_test_accuracy"] = train_classifier(args.out, args.classifier_steps, args.seed)
        elif stage == "vae":
            report["vae_test_psnr_db"] = train_vae(args.out, args.vae_steps, args.seed)
        elif stage == "dit":
            train_dit(args.out, args.dit_steps, args.seed, args.batch_size, args.lr, args.ema_decay)
            report["dit"] = {"steps": args.dit_steps, "batch_size": args.batch_size, "lr": args.lr}
        elif stage == "eval":
            report["eval"] = evaluate(args.out, args.eval_samples, [float(g) for g in args.eval_guidance.split(",")])
        else:
            raise SystemExit(f"unknown stage {stage!r}")
        report.setdefault("seconds", {})[stage] = round(time.time() - start, 1)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({stage: report.get(stage, report)}, indent=None, default=str)[:400])


if __name__ == "__main__":
    main()
