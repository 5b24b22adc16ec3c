"""Samplers as small pure functions over a denoiser, k-diffusion style, equal to diffusers' schedulers.

Every sampler has the signature `sample_x(denoiser, x, sigmas, *, generator=None, callback=None, ...)`,
works on x in VE space (x = x0 + sigma * eps) and keeps its state in local variables (deterministic
samplers accept `generator` only to share that signature). `plan_sampling` turns a NoiseSchedule
into the exact noise levels and model timesteps the matching diffusers scheduler would use; `sample`
converts diffusers' latents to and from VE space around the sampler.

diffusers keeps DDIM, DDPM and DPM-Solver latents in VP space (x_vp = x_ve / sqrt(1 + sigma^2)) and
the Euler family's in VE space; that is the only reason `sample` needs to know which is which.

A zero-terminal-SNR schedule starts DDIM and DDPM at sigma = infinity (alphas_cumprod = 0), where
x_ve is not a number. At that level x holds the VP latent instead (x_ve / sigma, pure noise), the
denoiser reads it as such, and the first step takes the sigma -> infinity limit of its formula.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ldm.sampling.denoiser import DenoiserFn
from ldm.sampling.plan import SAMPLER_NAMES, SamplingPlan

Callback = Callable[[dict[str, Any]], None]  # k-diffusion's {"x", "i", "sigma", "sigma_hat", "denoised"}


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # like diffusers' randn_tensor: draw on the generator's device (a CPU generator stays reproducible
    # across devices), then move
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _ancestral(sigma: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """Split the step sigma -> sigma_to into a deterministic part (down) and fresh noise (up)."""
    # in ratio form, so that sigma = infinity (zero terminal SNR) gives the limit eta * sigma_to
    up = eta * sigma_to * math.sqrt(1 - (sigma_to / sigma) ** 2)
    return up, math.sqrt(max(sigma_to**2 - up**2, 0.0))  # max: rounding when sigma_to << sigma


def _clip(x0: torch.Tensor, clip: float | None) -> torch.Tensor:
    return x0 if clip is None else x0.clamp(-clip, clip)


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def sample_euler(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                 generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma. (No randomness.)"""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        _report(callback, i, x, s[i], denoised)
    return x


def sample_euler_ancestral(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           generator: torch.Generator | None = None,
                           callback: Callback | None = None) -> torch.Tensor:
    """Euler step down to sigma_down, then fresh noise up to sigma_{i+1} (eta = 1, like diffusers).
    Noise is drawn on every step, the last included, so the generator advances as diffusers'."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        up, down = _ancestral(s[i], s[i + 1], 1.0)
        x = x + (x - denoised) / s[i] * (down - s[i])
        x = x + _noise_like(x, generator) * up
        _report(callback, i, x, s[i], denoised)
    return x


def sample_heun(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, clip: float | None = None,
                generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, alg. 1): Euler, then average with the slope at sigma_{i+1};
    a plain Euler step into sigma = 0. `clip` clamps x0 (diffusers' clip_sample)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _clip(denoiser(x, s[i]), clip)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - _clip(denoiser(x_2, s[i + 1]), clip)) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, s[i], denoised)
    return x


def sample_dpmpp_2m(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                    generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in log-sigma time; first order on the first step and into
    sigma = 0, as diffusers' DPMSolverMultistep (solver_order=2, midpoint, final sigma zero)."""
    s = sigmas.tolist()
    old_denoised = None
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            d = denoised
            if old_denoised is not None:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old_denoised = denoised
        _report(callback, i, x, s[i], denoised)
    return x


def sample_ddim(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.0,
                sigmas_to: torch.Tensor | None = None, clip: float | None = None,
                generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2020); with eta = 0 it is exactly an Euler step in VE space.

    sigmas_to[i] is where step i lands (default sigmas[i+1]). diffusers' DDIM always steps back by
    num_train_timesteps // steps, which for "linspace"/"trailing" spacing lands beside the next
    timestep; it then reads that same VP sample as being at the next level, so we rescale to match.
    `clip` clamps x0 but, like diffusers, the direction term keeps the unclipped eps.
    """
    s = sigmas.tolist()
    to = s[1:] if sigmas_to is None else sigmas_to.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        eps = x if math.isinf(s[i]) else (x - denoised) / s[i]
        denoised = _clip(denoised, clip)
        up, down = _ancestral(s[i], to[i], eta)
        x = denoised + down * eps
        if eta > 0:
            x = x + _noise_like(x, generator) * up
        if to[i] != s[i + 1]:
            x = x * math.sqrt((1 + s[i + 1] ** 2) / (1 + to[i] ** 2))
        _report(callback, i, x, s[i], denoised)
    return x


def sample_ddpm(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, variance: str = "fixed_small",
                last_noise: bool = True, clip: float | None = None, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_{i+1} | x_i, x0) (Ho et al. 2020, eq. 7).

    In VE space its mean is x0 + (sigma_{i+1} / sigma_i)^2 (x - x0); "fixed_small" variance is the
    posterior's own, "fixed_large" is beta_t. diffusers draws noise whenever the timestep is > 0,
    so the last step draws (and adds ~nothing) unless it sits at t = 0: that is `last_noise`.
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = _clip(denoiser(x, sigma), clip)
        # ratio form: at sigma = infinity (zero terminal SNR) keep is 0 and each term takes its limit
        keep = (sigma_next / sigma) ** 2
        x = denoised + keep * (x - denoised)
        if i < len(s) - 2 or last_noise:
            if variance == "fixed_small":
                up = sigma_next * math.sqrt(1 - keep)
            else:
                up = math.sqrt((1 + sigma_next**2) * (1 - (1 + sigma_next**2) / (1 + sigma**2)))
            x = x + _noise_like(x, generator) * up
        _report(callback, i, x, sigma, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm, "ddim": sample_ddim, "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m,
}

def sample(sampler: str, denoiser: DenoiserFn, x: torch.Tensor, plan: SamplingPlan, *, eta: float = 0.0,
           generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Run `sampler` along `plan` from x, the latents diffusers' pipeline starts its loop with
    (txt2img: noise * plan.init_noise_sigma; img2img: add_noise). Returns the final latents,
    in the space diffusers hands to the VAE. eta applies to ddim only."""
    if sampler != plan.sampler:
        raise ValueError(f"plan was made for sampler {plan.sampler!r}, not {sampler!r}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta only applies to the ddim sampler, not {sampler!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    first, last = plan.sigmas[0].item(), plan.sigmas[-1].item()
    if plan.vp_latents and not math.isinf(first):  # at infinity x stays VP (module docstring)
        x = x * math.sqrt(1 + first**2)
    options: dict[str, Any] = {}
    if sampler == "ddim":
        options = {"eta": eta, "sigmas_to": plan.sigmas_to, "clip": plan.clip_sample_range}
    elif sampler == "ddpm":
        options = {"variance": plan.ddpm_variance, "last_noise": plan.ddpm_last_noise,
                   "clip": plan.clip_sample_range}
    elif sampler == "heun":
        options = {"clip": plan.clip_sample_range}
    x = SAMPLERS[sampler](denoiser, x, plan.sigmas, generator=generator, callback=callback, **options)
    return x / math.sqrt(1 + last**2) if plan.vp_latents else x
