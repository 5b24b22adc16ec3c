"""Stage 2: the text-conditioned U-Net on frozen VAE latents and frozen text states (or fine-tuning
a whole model, fully or with LoRA). Ends by writing a complete model folder into the output dir."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ldm.io.model_files import ModelParts, save_diffusers_folder
from ldm.pipeline import Pipeline
from ldm.sampling.plan import plan_sampling
from ldm.sampling.schedule import NoiseSchedule
from ldm.models.unet import UNet
from ldm.train.cache import LatentCache, TextCache
from ldm.train.components import build_parts
from ldm.train.config import UNetStageConfig
from ldm.train.data import CaptionDataset
from ldm.train.diffusion_loss import diffusion_loss, noised_inputs
from ldm.train.ema import EMA
from ldm.train.grid import save_grid
from ldm.train.lora import add_lora, merged_unet, save_lora
from ldm.train.optim import make_optimizer, make_scheduler
from ldm.train.order import StepDraws

logger = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"


def check_schedule(schedule: NoiseSchedule, cfg: UNetStageConfig) -> None:
    """Refuse now what would otherwise fail after hours: an eps model on a zero-terminal-SNR schedule
    (its x0 is undefined at abar = 0, and min-SNR / debiased weights turn NaN / inf there), and a
    validation sampler that cannot sample this schedule (heun on zero terminal SNR)."""
    if schedule.rescale_betas_zero_snr and schedule.prediction_type != "v_prediction":
        raise ValueError("schedule.rescale_betas_zero_snr needs schedule.prediction_type: v_prediction "
                         "(an epsilon model cannot give x0 from pure noise)")
    if not 0 <= cfg.diffusion.edit_min_timestep < schedule.num_train_timesteps:
        raise ValueError(f"diffusion.edit_min_timestep must be below the schedule's "
                         f"{schedule.num_train_timesteps} timesteps, got {cfg.diffusion.edit_min_timestep}")
    if cfg.validation.prompts:
        try:
            cfg.validation.settings(cfg.data.resolution)
            plan_sampling(schedule, cfg.validation.sampler, cfg.validation.steps)
        except ValueError as e:
            raise ValueError(f"validation: {e}") from None


class UNetStage:
    def __init__(self, cfg: UNetStageConfig, accelerator: Accelerator, output_dir: Path,
                 dataset: CaptionDataset) -> None:
        self.cfg, self.accelerator, self.output_dir = cfg, accelerator, Path(output_dir)
        device = accelerator.device
        # build_parts may fill in data.resolution from the model, which the dataset shares
        self.parts = build_parts(cfg, self.output_dir.name)
        self.vae = self.parts.vae.to(device)
        self.text = self.parts.text_encoder.to(device)
        self.schedule = self.parts.schedule
        check_schedule(self.schedule, cfg)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(device)
        unet = self.parts.unet
        if cfg.lora.enabled:
            add_lora(unet, cfg.lora)
        else:
            unet.requires_grad_(True)
        unet.gradient_checkpointing = cfg.train.gradient_checkpointing
        unet.train()
        optimizer = make_optimizer(unet.parameters(), cfg.optim)
        scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.unet, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
        self.models, self.optimizers, self.schedulers = [self.unet], [optimizer], [scheduler]
        self.ema = None
        if cfg.ema.enabled:
            self.ema = EMA(accelerator.unwrap_model(self.unet), cfg.ema.decay, cfg.ema.warmup)
            accelerator.register_for_checkpointing(self.ema)
        trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        logger.info("U-Net: %.2fM trainable parameters%s", trainable / 1e6, " (LoRA)" if cfg.lora.enabled else "")
        f = self.vae.config.downscale
        self.latent_shape = (self.vae.config.latent_channels, cfg.data.resolution // f, cfg.data.resolution // f)
        progress = cfg.train.progress and accelerator.is_main_process
        self.latents = LatentCache(self.vae, dataset, cfg.train.batch_size, device, progress) \
            if cfg.cache_latents else None
        self.texts = TextCache(self.text, {c for r in dataset.records for c in r.captions}, progress=progress) \
            if cfg.cache_text else None

    def _posterior(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        if self.latents is not None:
            return tuple(t.to(device) for t in self.latents.lookup(batch["index"], batch["flip"]))
        posterior = self.vae.encode(batch["pixels"].to(device))
        return posterior.mean.float(), posterior.std.float()

    def _source_posterior(self, batch: dict[str, Any], mean: torch.Tensor, std: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sources' posterior; rows without a source keep their image's (`mean`, `std`), which
        uncached runs therefore do not encode twice."""
        device = self.accelerator.device
        if self.latents is not None:
            return tuple(t.to(device) for t in self.latents.lookup(batch["index"], batch["flip"], source=True))
        has = batch["has_source"].to(device)
        posterior = self.vae.encode(batch["source_pixels"].to(device)[has])
        mean, std = mean.clone(), std.clone()
        mean[has], std[has] = posterior.mean.float(), posterior.std.float()
        return mean, std

    def _latents(self, batch: dict[str, Any], draws: StepDraws) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents of each row's image, of its edit source), one posterior sample each; the sources are None
        when no row of the batch is an edit pair."""
        # eps of the posterior sample is drawn first and always, so cached and uncached runs draw alike
        eps = draws.randn(*self.latent_shape).to(self.accelerator.device)
        mean, std = self._posterior(batch)
        latents = self.vae.scale_latents(mean + std * eps)
        if not batch["has_source"].any():
            return latents, None
        mean, std = self._source_posterior(batch, mean, std)
        return latents, self.vae.scale_latents(mean + std * eps)  # the same eps: one draw per row

    def loss(self, batch: dict[str, Any], draws: StepDraws, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            latents, source = self._latents(batch, draws)
            edit = None
            if source is not None:
                # an edit pair whose caption was dropped says nothing about the edit: the empty caption (what
                # CFG's unconditional branch reads) learns to denoise the source as it is
                edit = batch["has_source"].to(latents.device) & torch.tensor([c != "" for c in batch["captions"]],
                                                                              device=latents.device)
                latents = torch.where(edit.view(-1, 1, 1, 1), latents, source)
            if self.texts is not None:
                states = self.texts.lookup(batch["captions"]).to(self.accelerator.device)
            else:
                states = self.text.encode(batch["captions"]).states.float()
        x_t, t, target, abar = noised_inputs(latents, self.alphas_cumprod, draws, self.schedule.num_train_timesteps,
                                             self.schedule.prediction_type, self.cfg.diffusion.noise_offset,
                                             source, edit, self.cfg.diffusion.edit_min_timestep)
        pred = self.unet(x_t, t, states)
        return diffusion_loss(pred, target, abar, self.schedule.prediction_type, self.cfg.diffusion.min_snr_gamma,
                              self.cfg.diffusion.debiased_estimation), {}

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.accelerator.unwrap_model(self.unet))

    def _eval_unet(self, state: dict[str, torch.Tensor] | None = None) -> UNet:
        """A fresh copy of the trained U-Net (EMA weights if any), leaving the training weights untouched.
        `state`: a full state dict gathered by accelerate (needed when the model is sharded)."""
        if state is None:
            unet = copy.deepcopy(self.accelerator.unwrap_model(self.unet))
        else:
            unet = UNet(self.parts.unet.config)
            if self.cfg.lora.enabled:
                add_lora(unet, self.cfg.lora)
            unet.load_state_dict(state)
        if self.ema is not None:
            self.ema.copy_to(unet)
        unet.gradient_checkpointing = False
        return unet.eval().requires_grad_(False)

    def validate(self, step: int, unet: UNet | None = None) -> None:
        v = self.cfg.validation
        if not v.prompts:
            return
        parts = ModelParts(unet or self._eval_unet(), self.vae, self.text, self.schedule, self.parts.name, "")
        pipe = Pipeline(parts, device=self.accelerator.device)
        pipe.progress = False
        result = pipe.generate(v.settings(self.cfg.data.resolution))
        path = save_grid(result.images, self.output_dir / "samples" / f"step-{step:08d}.png", list(v.prompts))
        logger.info("validation grid: %s", path)

    def finish(self) -> None:
        """Writes the model folder (EMA weights if any; LoRA merged, and also saved on its own)."""
        state = self.accelerator.get_state_dict(self.unet)  # a collective under FSDP/ZeRO-3: every rank calls it
        if not self.accelerator.is_main_process:
            return
        unet = self._eval_unet({k: v.float().cpu() for k, v in state.items()})
        if self.cfg.lora.enabled:
            lora_file = save_lora(unet, self.output_dir / LORA_FILE, self.cfg.lora)
            logger.info("LoRA weights: %s", lora_file)
            unet = merged_unet(unet, lora_file)
        parts = ModelParts(unet, self.vae, self.text, self.schedule, self.parts.name, "")
        save_diffusers_folder(parts, self.output_dir)
        logger.info("model written to %s", self.output_dir)
        self.validate(self.cfg.train.max_steps, unet)
