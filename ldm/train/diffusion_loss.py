"""The denoising objective: noise the latents at a random timestep, regress eps or v.

Optional pieces, each off by default: min-SNR-gamma weighting (Hang et al. 2023), which stops the
low-noise timesteps from dominating the gradient; debiased estimation (Yu et al. 2024, kohya's
--debiased_estimation_loss), which weights each sample by 1/sqrt(SNR) and so gives the high-noise
timesteps, where an eps loss is tiny but the layout of the image is decided, a real share of the
gradient; noise offset (a per-channel constant in the noise), which lets a model learn to change the
overall brightness of an image.

Edit pairs (a source image, and what the caption makes of it) train img2img directly: the source is
noised and the target is the one whose x0 is the edited image, so "keep where things are, change what
the caption says" is learnt at the noise levels img2img starts from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.train.order import StepDraws


def noised_inputs(latents: torch.Tensor, alphas_cumprod: torch.Tensor, draws: StepDraws, num_timesteps: int,
                  prediction_type: str, noise_offset: float = 0.0, source: torch.Tensor | None = None,
                  edit: torch.Tensor | None = None, edit_min_timestep: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target, alpha_bar_t) for a batch of scaled latents; the draws are taken in a fixed order.

    `source` (default: `latents`) is what gets noised. The target is then taken with the noise
    eps' = eps + sqrt(SNR) (source - latents), for which x_t = sqrt(abar) latents + sqrt(1 - abar) eps':
    the prediction that meets it has `latents` as its x0. Rows whose source equals their latents get
    exactly the plain objective. Rows flagged in `edit` (bool, [B]) draw t in [edit_min_timestep, T)
    instead: the same draw, rescaled, so the draws stay in their fixed order.
    """
    b, c = latents.shape[:2]
    t = draws.randint(num_timesteps).to(latents.device)
    if edit is not None and edit_min_timestep:
        shifted = edit_min_timestep + t * (num_timesteps - edit_min_timestep) // num_timesteps
        t = torch.where(edit.to(t.device), shifted, t)
    noise = draws.randn(*latents.shape[1:]).to(latents.device, latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * draws.randn(c, 1, 1).to(latents.device, latents.dtype)
    abar = alphas_cumprod.to(latents.device)[t].float()
    a = abar.sqrt().view(b, 1, 1, 1).to(latents.dtype)
    s = (1 - abar).sqrt().view(b, 1, 1, 1).to(latents.dtype)
    if source is not None:
        x_t = a * source + s * noise
        noise = noise + (a / s) * (source - latents)  # exactly + 0 where the source is the image itself
    else:
        x_t = a * latents + s * noise
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = a * noise - s * latents
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x_t, t, target, abar


def _snr(abar: torch.Tensor) -> torch.Tensor:
    return abar / (1 - abar)


def min_snr_weights(abar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min(SNR, gamma) / SNR for eps targets; / (SNR + 1) for v targets, whose loss already carries SNR + 1."""
    snr = _snr(abar)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def debiased_weights(abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """1 / sqrt(SNR) for eps targets, 1 / (SNR + 1) for v targets, with SNR clipped at 1000 as kohya does
    (at t = 0 the SNR is nearly unbounded)."""
    snr = _snr(abar).clamp(max=1000.0)
    return 1 / (snr + 1) if prediction_type == "v_prediction" else snr.rsqrt()


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, abar: torch.Tensor, prediction_type: str,
                   min_snr_gamma: float | None = None, debiased: bool = False) -> torch.Tensor:
    """Mean squared error per sample (in fp32), optionally min-SNR and/or debiased weighted (the weights
    multiply, as in kohya's trainer), averaged over the batch."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(abar, min_snr_gamma, prediction_type)
    if debiased:
        per_sample = per_sample * debiased_weights(abar, prediction_type)
    return per_sample.mean()
