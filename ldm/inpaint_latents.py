"""Inpainting in latent space, as diffusers' StableDiffusionInpaintPipeline does it, for both kinds of model:

- a 9-channel inpainting U-Net reads the mask and the masked image's latents beside the noisy latents
  (`Conditioning.concat`);
- an ordinary 4-channel U-Net samples freely, and after every step the known region is replaced by the
  input's latents noised to the level the step landed on (at the last step: the clean latents).

Random draws follow diffusers' order: the image's latents (not for a 9-channel model at strength 1),
the noise, then the masked image's latents. Strength 1 starts from pure noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.models.autoencoder import AutoencoderKL
from ldm.sampling.plan import SamplingPlan, add_noise

# (step index, x after that step in VE space) -> None; may change x in place
AfterStep = Callable[[int, torch.Tensor], None]


@dataclass
class InpaintStart:
    x: torch.Tensor  # the sampler's starting latents
    concat: torch.Tensor | None  # 9-channel models: [batch, 1 + C, h, w] mask and masked-image latents
    after_step: AfterStep | None  # 4-channel models: re-impose the known region


def pixels_of(image: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1], as diffusers' image processor makes it."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1


def inpaint_start(vae: AutoencoderKL, encode: Callable[[torch.Tensor], torch.Tensor], image: Image.Image,
                  mask: Image.Image, fill: str, *, unet_channels: int, batch: int, plan: SamplingPlan,
                  strength: float, generator: torch.Generator, device: torch.device) -> InpaintStart:
    """`image` and its hard `mask` at the generation size; `encode(pixels)` samples the scaled posterior."""
    latent_channels = vae.config.latent_channels
    nine = unet_channels == 2 * latent_channels + 1
    if not nine and unet_channels != latent_channels:
        raise ValueError(f"a U-Net with {unet_channels} input channels is neither an ordinary nor an inpainting model")
    pixels = pixels_of(image).to(device)
    hard = torch.from_numpy((np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32))[None, None]
    hard = hard.to(device)
    f = vae.config.downscale
    shape = (batch, latent_channels, image.height // f, image.width // f)
    from_noise = strength == 1.0
    init = encode(pixels) if not (nine and from_noise) else None
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    masked_latents = encode(pixels * (hard < 0.5))
    latent_mask = F.interpolate(hard, size=shape[2:])  # nearest, as diffusers
    if init is not None:
        if fill == "latent-nothing":  # A1111's masked content: zeros where the mask is
            init = init * (1 - latent_mask)
        elif fill == "latent-noise":
            fresh = torch.randn(init.shape, generator=generator, dtype=torch.float32).to(device)
            init = init * (1 - latent_mask) + fresh * latent_mask
        init = init.repeat(batch // init.shape[0], 1, 1, 1)
    x = noise * plan.init_noise_sigma if from_noise else add_noise(init, noise, plan)
    if nine:
        concat = torch.cat([latent_mask, masked_latents], dim=1).repeat(batch, 1, 1, 1)
        return InpaintStart(x, concat, None)
    sigmas = plan.sigmas.tolist()

    def keep_known(i: int, x: torch.Tensor) -> None:
        known = init + sigmas[i + 1] * noise  # the VE form of diffusers' add_noise at the next timestep
        x.copy_((1 - latent_mask) * known + latent_mask * x)

    return InpaintStart(x, None, keep_known)
