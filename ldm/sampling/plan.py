"""The sampling plan: the exact noise levels and model timesteps diffusers' scheduler for a sampler
would use, and the img2img starting latents (`add_noise`)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np
import torch

from ldm.sampling.schedule import NoiseSchedule, noise_levels, spaced_timesteps

SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m")
# which diffusers scheduler's timesteps and levels each sampler uses (see schedule.noise_levels)
_FAMILY = {"ddpm": "ddpm", "ddim": "ddim", "euler": "euler", "euler_ancestral": "euler", "heun": "euler",
           "dpmpp_2m": "dpm"}
_VP_LATENTS = {"ddpm", "ddim", "dpmpp_2m"}
_KARRAS_FROM_CONFIG = {"euler", "heun", "dpmpp_2m"}  # diffusers classes that read use_karras_sigmas
# Euler's and DPM-Solver's diffusers classes clamp abar_T to 2**-24; DDIM's and DDPM's keep it 0
_ZERO_SNR = {"euler", "euler_ancestral", "dpmpp_2m", "ddim", "ddpm"}
_CLIP_DEFAULT = {"ddim": True, "ddpm": True, "heun": False}  # classes that read clip_sample, and its default


@dataclass
class SamplingPlan:
    """Everything a sampler run needs besides the model: made by plan_sampling, read by sample."""
    sampler: str
    sigmas: torch.Tensor  # float64 [steps + 1], descending VE noise levels; the model runs at sigmas[:-1]
    timesteps: torch.Tensor  # float64 [steps]: the training timestep the model gets at each sigmas[i]
    init_noise_sigma: float  # what diffusers multiplies txt2img noise by
    vp_latents: bool  # diffusers holds this sampler's latents in VP space
    karras: bool
    sigmas_to: torch.Tensor | None = None  # ddim: where each step lands, when not sigmas[i+1]
    clip_sample_range: float | None = None  # ddim/ddpm/heun: clamp x0 to +-this
    ddpm_variance: str = "fixed_small"
    ddpm_last_noise: bool = True

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def model_evaluations(self) -> int:
        return 2 * self.steps - 1 if self.sampler == "heun" else self.steps


def plan_sampling(schedule: NoiseSchedule, sampler: str, steps: int, *, karras: bool | None = None,
                  strength: float | None = None) -> SamplingPlan:
    """The noise levels diffusers' scheduler for `sampler` would use with `steps` steps.

    karras=None follows the config's use_karras_sigmas for the samplers whose diffusers class reads
    it (euler, heun, dpmpp_2m); karras=True on ddim/ddpm/euler_ancestral is our own extension:
    Karras levels between the spaced schedule's first and last sigma, like Euler's.
    strength (img2img) keeps the tail of the schedule like diffusers' get_timesteps, but always at
    least one step, where diffusers would run none (diffusers issue #1867).
    """
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(sorted(SAMPLER_NAMES))})")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    total = schedule.num_train_timesteps
    if steps > total:
        raise ValueError(f"steps ({steps}) cannot exceed num_train_timesteps ({total})")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if schedule.rescale_betas_zero_snr and sampler not in _ZERO_SNR:
        # diffusers' Heun ignores the key: it would sample a schedule the model was not trained on
        raise ValueError(f"sampler {sampler} does not support zero-terminal-SNR schedules "
                         f"(rescale_betas_zero_snr); use one of {', '.join(sorted(_ZERO_SNR))}")
    family = _FAMILY[sampler]
    spacing = schedule.timestep_spacing or ("leading" if family in ("ddim", "ddpm") else "linspace")
    karras = bool(schedule.use_karras_sigmas and sampler in _KARRAS_FROM_CONFIG) if karras is None else karras
    ts = spaced_timesteps(schedule, steps, spacing, family)
    if karras and family in ("ddim", "ddpm") and schedule.rescale_betas_zero_snr and ts.max() == total - 1:
        raise ValueError(f"karras levels for {sampler} (our extension) need a finite first sigma; "
                         f"with {spacing} spacing this zero-terminal-SNR schedule starts at infinity")
    if ts.min() < 0 or ts.max() > total - 1:
        raise ValueError(f"{spacing} spacing with {steps} steps and steps_offset {schedule.steps_offset} gives "
                         f"timesteps outside [0, {total - 1}]; pick another step count")
    sigmas, timesteps, landing = noise_levels(schedule, family, steps, ts, karras)
    if sampler in _VP_LATENTS:
        init_noise_sigma = 1.0
    else:
        top = torch.from_numpy(sigmas.astype(np.float32)).max()  # float32 maths, as diffusers
        init_noise_sigma = float(top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5)
    start = 0
    if strength is not None:
        init_timestep = min(int(steps * strength), steps)
        start = min(max(steps - init_timestep, 0), len(timesteps) - 1)
    clip = None
    if sampler in _CLIP_DEFAULT:
        on = _CLIP_DEFAULT[sampler] if schedule.clip_sample is None else schedule.clip_sample
        clip = schedule.clip_sample_range if on else None
    to = None
    if not np.array_equal(landing, sigmas[1:]):
        to = torch.from_numpy(landing[start:])
    return SamplingPlan(
        sampler=sampler, sigmas=torch.from_numpy(sigmas[start:]), timesteps=torch.from_numpy(timesteps[start:]),
        init_noise_sigma=init_noise_sigma, vp_latents=sampler in _VP_LATENTS, karras=karras,
        sigmas_to=to, clip_sample_range=clip, ddpm_variance=schedule.ddpm_variance,
        ddpm_last_noise=bool(ts[-1] > 0))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, plan: SamplingPlan) -> torch.Tensor:
    """The img2img starting latents: `latents` noised to the plan's first level, in the same space
    (VP or VE) as diffusers' scheduler.add_noise returns for this sampler."""
    sigma = plan.sigmas[0].item()
    if math.isinf(sigma):  # zero terminal SNR, DDIM/DDPM: nothing of the image is left
        return noise.to(latents.dtype)
    if plan.vp_latents:
        scale = 1 / math.sqrt(1 + sigma**2)
        return scale * latents + (sigma * scale) * noise
    return latents + noise * sigma


def _switch_cutoff(plan: SamplingPlan, switch: float, num_train_timesteps: int) -> int:
    if plan.sampler == "heun":  # diffusers shifts second-order hand-offs by a step; not reproduced here
        raise ValueError("the base-to-refiner hand-off is not available with heun; pick another sampler")
    if not 0.0 < switch < 1.0:
        raise ValueError(f"refiner switch must be in (0, 1), got {switch}")
    # diffusers' denoising_end / denoising_start: a training timestep below which the refiner takes over
    return int(round(num_train_timesteps - switch * num_train_timesteps))


def plan_until(plan: SamplingPlan, switch: float, num_train_timesteps: int) -> SamplingPlan:
    """The base model's part of an ensemble of expert denoisers: the steps at timesteps >= the switch
    point, ending at the next level instead of at zero (diffusers' `denoising_end`)."""
    cutoff = _switch_cutoff(plan, switch, num_train_timesteps)
    n = int((plan.timesteps >= cutoff).sum())
    if n == 0 or n == plan.steps:
        raise ValueError(f"refiner switch {switch} with {plan.steps} steps leaves the "
                         f"{'base' if n == 0 else 'refiner'} no step; move the switch")
    to = None if plan.sigmas_to is None else plan.sigmas_to[:n]
    return replace(plan, sigmas=plan.sigmas[:n + 1], timesteps=plan.timesteps[:n], sigmas_to=to, ddpm_last_noise=True)


def plan_from(plan: SamplingPlan, switch: float, num_train_timesteps: int) -> SamplingPlan:
    """The refiner's part: the steps at timesteps below the switch point, starting from the latents the
    base left (diffusers' `denoising_start`, which adds no noise)."""
    cutoff = _switch_cutoff(plan, switch, num_train_timesteps)
    m = int((plan.timesteps < cutoff).sum())
    if m == 0:
        raise ValueError(f"refiner switch {switch} with {plan.steps} steps leaves the refiner no step; move the switch")
    start = plan.steps - m
    to = None if plan.sigmas_to is None else plan.sigmas_to[start:]
    return replace(plan, sigmas=plan.sigmas[start:], timesteps=plan.timesteps[start:], sigmas_to=to)
