"""Denoisers: a raw model output (eps or v) turned into the k-diffusion contract x0 = D(x, sigma).

Samplers work on x in k-diffusion "VE" space (x = x0 + sigma * eps); the model sees the "VP" input
x / sqrt(sigma^2 + 1) and a training timestep t, which is what diffusers' schedulers hand it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ldm.sampling.plan import SamplingPlan
from ldm.sampling.schedule import NoiseSchedule, sigma_to_t

# (model_input, t) -> raw model output (eps or v); t is a float32 tensor of shape [batch]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (x, sigma) -> predicted x0, the contract every sampler is written against
DenoiserFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class Denoiser:
    """x0 = D(x, sigma) for an eps- or v-predicting model (Karras et al. preconditioning).

    The timestep handed to the model is looked up in `timesteps` first: diffusers gives the model its
    scheduler's own timesteps, which are not always recoverable from sigma (Euler interpolates sigma
    linearly between integer timesteps, DPM-Solver rounds its Karras timesteps). Off that table the
    timestep is interpolated in log-sigma, optionally rounded, as k-diffusion does.
    """
    model: ModelFn
    prediction_type: str
    log_sigmas: np.ndarray
    timesteps: dict[float, float] = field(default_factory=dict)
    quantize: bool = False

    def timestep(self, sigma: float) -> float:
        t = self.timesteps.get(sigma)
        if t is None:
            t = float(sigma_to_t(np.array(sigma), self.log_sigmas))
            t = float(np.round(t)) if self.quantize else t
        return t

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.timestep(sigma), dtype=torch.float32, device=x.device)
        if math.isinf(sigma):  # zero terminal SNR: x is already the VP latent (see samplers.py)
            if self.prediction_type != "v_prediction":
                raise ValueError("an epsilon-prediction model cannot denoise pure noise (zero terminal SNR); "
                                 "it needs prediction_type v_prediction")
            return -self.model(x, t).to(x.dtype)  # x0 = sqrt(abar) x - sqrt(1 - abar) v at abar = 0
        out = self.model(x / math.sqrt(sigma**2 + 1), t).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        # v-prediction: c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
        return x / (sigma**2 + 1) - out * (sigma / math.sqrt(sigma**2 + 1))


def make_denoiser(model: ModelFn, schedule: NoiseSchedule, plan: SamplingPlan | None = None, *,
                  quantize: bool = False) -> Denoiser:
    """Wrap `model` for `schedule`; with a plan, the model gets exactly the plan's timesteps."""
    table = {} if plan is None else dict(zip(plan.sigmas[:-1].tolist(), plan.timesteps.tolist()))
    return Denoiser(model, schedule.prediction_type, schedule.log_sigmas, table, quantize)
