"""Classifier-free guidance as a wrapper that turns a U-Net call into a ModelFn (x, t) -> eps or v."""
from __future__ import annotations

from typing import Callable

import torch

from ldm.sampling.denoiser import ModelFn

# (x, t, context) -> raw model output
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rescale_noise_cfg(guided: torch.Tensor, cond_out: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. (2023) 3.4: pull the guided output's per-sample std back toward the conditional
    output's, which undoes the over-exposure large guidance causes (diffusers' rescale_noise_cfg)."""
    dims = list(range(1, cond_out.ndim))
    rescaled = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def classifier_free_guidance(unet: UNetFn, cond: torch.Tensor, uncond: torch.Tensor | None,
                             guidance_scale: float, guidance_rescale: float = 0.0) -> ModelFn:
    """A ModelFn applying classifier-free guidance to the raw model output, as diffusers' pipeline does.

    cond/uncond: context of shape [B, ...] for x of shape [B, ...]; uncond holds the negative prompt.
    One batched call per step with the negative half first, like diffusers. guidance_scale <= 1
    means no guidance (and no unconditional pass), also like diffusers.
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if guidance_scale <= 1.0:
        def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            _check_batch(x, cond)
            return unet(x, t, cond)
        return conditional
    if uncond is None:
        raise ValueError(f"guidance_scale {guidance_scale} > 1 needs unconditional (negative prompt) context")
    if uncond.shape != cond.shape:
        raise ValueError(f"negative context shape {tuple(uncond.shape)} != prompt context shape {tuple(cond.shape)}")
    context = torch.cat([uncond, cond])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_batch(x, cond)
        out_uncond, out_cond = unet(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0.0:
            out = rescale_noise_cfg(out, out_cond, guidance_rescale)
        return out
    return guided


def _check_batch(x: torch.Tensor, cond: torch.Tensor) -> None:
    if x.shape[0] != cond.shape[0]:
        raise ValueError(f"latent batch {x.shape[0]} != text context batch {cond.shape[0]}")
