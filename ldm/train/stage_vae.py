"""Stage 1: the KL autoencoder, with an optional patch discriminator switched on after a warm-up.

At the end the latent scaling factor is measured on the data (1 / std of sampled latents, as LDM
does) and written with the weights into a diffusers-layout VAE folder.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn

from ldm.models.autoencoder import AutoencoderKL
from ldm.io.diffusers_config import vae_config_to_diffusers
from ldm.io.weights import write_json, write_safetensors
from ldm.train.components import VAE_WEIGHTS
from ldm.train.config import VAEStageConfig
from ldm.train.data import CaptionDataset
from ldm.train.ema import EMA
from ldm.train.grid import save_grid
from ldm.train.optim import make_optimizer, make_scheduler
from ldm.train.order import StepDraws
from ldm.train.vae_loss import (PatchDiscriminator, adaptive_weight, hinge_d_loss, logits_without_param_grads,
                       reconstruction_loss)

logger = logging.getLogger(__name__)

GAN_BETAS = (0.5, 0.9)  # LDM's Adam betas for both players once a discriminator is involved


class _Reconstruct(nn.Module):
    """encode -> sample with given eps -> decode in one forward, so DDP sees one call per step and the
    posterior noise comes from the step's draws (sliced from the global batch) like everything else."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        return self.vae.decode(z), posterior.kl()


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def posterior_std(vae: AutoencoderKL, batches: Iterable[torch.Tensor], generator: torch.Generator) -> float:
    """Std of z ~ q(z|x) over the image batches (1/scaling_factor), accumulated in float64."""
    total, total_sq, count = 0.0, 0.0, 0
    for x in batches:
        z = vae.encode(x).sample(generator).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    mean = total / count
    return max(total_sq / count - mean * mean, 0.0) ** 0.5


class VAEStage:
    def __init__(self, cfg: VAEStageConfig, accelerator: Accelerator, output_dir: Path,
                 dataset: CaptionDataset) -> None:
        self.cfg, self.accelerator, self.output_dir, self.dataset = cfg, accelerator, Path(output_dir), dataset
        vae = AutoencoderKL(cfg.vae).train()
        gan = cfg.loss.disc_start is not None
        betas = GAN_BETAS if gan else None
        model = _Reconstruct(vae)
        opt = make_optimizer(model.parameters(), cfg.optim, betas=betas)
        sched = make_scheduler(opt, cfg.optim, cfg.train.max_steps)
        self.model, opt, sched = accelerator.prepare(model, opt, sched)
        self.models, self.optimizers, self.schedulers = [self.model], [opt], [sched]
        self.disc = None
        if gan:
            disc = PatchDiscriminator(cfg.vae.out_channels, cfg.loss.disc_channels, cfg.loss.disc_layers)
            d_opt = make_optimizer(disc.parameters(), cfg.optim, lr=cfg.loss.disc_learning_rate, betas=betas)
            d_sched = make_scheduler(d_opt, cfg.optim, cfg.train.max_steps)
            self.disc, d_opt, d_sched = accelerator.prepare(disc, d_opt, d_sched)
            self.models.append(self.disc)
            self.optimizers.append(d_opt)
            self.schedulers.append(d_sched)
        self.ema = None
        if cfg.ema.enabled:
            self.ema = EMA(self.vae, cfg.ema.decay, cfg.ema.warmup)
            accelerator.register_for_checkpointing(self.ema)
        f = cfg.vae.downscale
        self.latent_shape = (cfg.vae.latent_channels, cfg.data.resolution // f, cfg.data.resolution // f)

    @property
    def vae(self) -> AutoencoderKL:
        return self.accelerator.unwrap_model(self.model).vae

    def loss(self, batch: dict[str, Any], draws: StepDraws, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        lc = self.cfg.loss
        x = batch["pixels"].to(self.accelerator.device)
        recon, kl = self.model(x, draws.randn(*self.latent_shape).to(x.device))
        rec = reconstruction_loss(x, recon, lc)
        kl = kl.float().mean()
        loss = rec + lc.kl_weight * kl
        logs = {"rec_loss": rec.item(), "kl": kl.item()}
        if self.disc is not None:
            on = step >= lc.disc_start
            with self.accelerator.autocast():
                g_adv = -logits_without_param_grads(self.accelerator.unwrap_model(self.disc), recon).float().mean()
                # one discriminator call for real and fake keeps DDP at one forward per backward
                logits = self.disc(torch.cat([x, recon.detach()])).float()
            d_loss = hinge_d_loss(*logits.chunk(2))
            if on:
                weight = lc.disc_weight * adaptive_weight(rec, g_adv, self.vae.decoder.conv_out.weight)
                loss = loss + weight * g_adv
                logs["disc_weight"] = weight.item()
            # before disc_start the discriminator term is multiplied by 0, not left out: every parameter
            # still gets a (zero) gradient, which DDP requires
            loss = loss + (1.0 if on else 0.0) * d_loss
            logs.update(g_adv=g_adv.item(), d_loss=d_loss.item())
        return loss, logs

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.vae)

    def _eval_vae(self) -> AutoencoderKL:
        vae = copy.deepcopy(self.vae)
        if self.ema is not None:
            self.ema.copy_to(vae)
        return vae.eval().requires_grad_(False)

    @torch.no_grad()
    def validate(self, step: int, vae: AutoencoderKL | None = None) -> None:
        vae = vae or self._eval_vae()
        n = min(self.cfg.validation_images, len(self.dataset))
        x = torch.stack([self.dataset.pixels(i, False)[0] for i in range(n)]).to(self.accelerator.device)
        recon = vae.decode(vae.encode(x).mode())
        path = save_grid(_to_pil(x) + _to_pil(recon), self.output_dir / "samples" / f"step-{step:08d}.png", columns=n)
        logger.info("reconstructions (top: input, bottom: decoded): %s", path)

    def latent_std(self, vae: AutoencoderKL) -> float:
        """Std of z ~ q(z|x) over up to `scale_samples` images: LDM's recipe for the scaling factor."""
        n, bs = min(self.cfg.scale_samples, len(self.dataset)), self.cfg.train.batch_size
        batches = (torch.stack([self.dataset.pixels(i, False)[0] for i in range(start, min(n, start + bs))])
                   .to(self.accelerator.device) for start in range(0, n, bs))
        return posterior_std(vae, batches, torch.Generator().manual_seed(self.cfg.train.seed))

    def finish(self) -> None:
        state = self.accelerator.get_state_dict(self.model)  # a collective under FSDP/ZeRO-3
        if not self.accelerator.is_main_process:
            return
        vae = AutoencoderKL(copy.deepcopy(self.cfg.vae))  # its scaling_factor is about to change
        vae.load_state_dict({k.removeprefix("vae."): v.float() for k, v in state.items()})
        if self.ema is not None:
            self.ema.copy_to(vae)
        vae = vae.to(self.accelerator.device).eval().requires_grad_(False)
        std = self.latent_std(vae)
        if not std > 0:
            raise ValueError("the trained encoder's latents have zero variance: cannot set a scaling factor")
        vae.config.scaling_factor = 1.0 / std
        logger.info("latent std %.5g: scaling_factor = %.5g", std, vae.config.scaling_factor)
        write_safetensors(self.output_dir / VAE_WEIGHTS, vae.state_dict())
        write_json(self.output_dir / "config.json", vae_config_to_diffusers(vae.config))
        logger.info("VAE written to %s", self.output_dir)
        self.validate(self.cfg.train.max_steps, vae)
