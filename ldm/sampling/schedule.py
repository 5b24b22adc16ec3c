"""Noise schedules: betas -> alphas_cumprod -> k-diffusion sigmas, timestep spacing, Karras sigmas.

Every number is computed the way diffusers' schedulers compute it (same dtypes, same numpy calls,
same rounding), because the pipeline has to reproduce diffusers' latents to 1e-4: a sigma that is
off by one float32 ulp is harmless, a timestep rounded the other way is not.

Noise levels are k-diffusion "VE" sigmas: x_ve = x0 + sigma * eps, sigma^2 = (1 - abar) / abar.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("leading", "linspace", "trailing")
# DDPM's variance types; fixed_small_log is fixed_small computed through a log, None is what a
# DPMSolver config stores under the same key and DDPM then treats as fixed_small.
DDPM_VARIANCES = {None: "fixed_small", "fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                  "fixed_large": "fixed_large"}

# Config keys we do not implement: sampling is only equal to diffusers' when they hold these values.
_REQUIRED_VALUES: dict[str, tuple] = {
    "thresholding": (False, None),
    "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None), "use_lu_lambdas": (False, None),
    "use_flow_sigmas": (False, None), "use_dynamic_shifting": (False, None),
    "interpolation_type": ("linear",), "timestep_type": ("discrete",), "final_sigmas_type": ("zero",),
    "sigma_min": (None,), "sigma_max": (None,),
    "algorithm_type": ("dpmsolver++",), "solver_order": (2,), "solver_type": ("midpoint",),
}


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The "squaredcos_cap_v2" (GLIDE cosine) betas, in Python floats like diffusers, then float32."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


@dataclass
class NoiseSchedule:
    """The training noise schedule plus the scheduler_config.json settings that change sampling.

    Three fields may be None, meaning "absent from the config": diffusers then uses the default of
    whichever scheduler class it builds, and those differ (DDIM spaces timesteps "leading", Euler
    "linspace"; DDIM/DDPM clip x0 by default, Heun does not; DDIM sets alpha_to_one by default).
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool | None = False
    clip_sample: bool | None = False
    clip_sample_range: float = 1.0
    use_karras_sigmas: bool = False
    ddpm_variance: str = "fixed_small"  # config key "variance_type"
    lambda_min_clipped: float = -math.inf  # DPMSolver: drop the low-SNR end of a cosine schedule
    # Lin et al. 2023: shift and scale sqrt(alphas_cumprod) so the last timestep is pure noise. Without
    # it, x_T still carries a little of the image at training time but none at sampling time, and the
    # model learns to read the layout from that leak instead of from the prompt. Train it with v-prediction:
    # an eps model's x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) is undefined at abar = 0.
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.trained_betas is not None:
            self.trained_betas = tuple(float(b) for b in self.trained_betas)
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps "
                                 f"is {self.num_train_timesteps}")
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            _check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        _check_choice("ddpm_variance", self.ddpm_variance, ("fixed_small", "fixed_large"))
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> "NoiseSchedule":
        """Read a diffusers scheduler_config.json (any scheduler class).

        Keys that no supported scheduler reads are ignored; values we cannot reproduce raise a
        ValueError naming the key. Keys listed in "_use_default_values" are treated as absent,
        exactly as diffusers' from_config does.
        """
        defaults = set(cfg.get("_use_default_values") or ())
        cfg = {k: v for k, v in cfg.items() if k not in defaults}
        for key, allowed in _REQUIRED_VALUES.items():
            if key in cfg and cfg[key] not in allowed:
                raise ValueError(f"unsupported scheduler config: {key}={cfg[key]!r} (supported: "
                                 f"{', '.join(repr(a) for a in allowed)})")
        variance = cfg.get("variance_type")
        if variance not in DDPM_VARIANCES:
            raise ValueError(f"unsupported scheduler config: variance_type={variance!r} "
                             f"(supported: {', '.join(repr(v) for v in DDPM_VARIANCES)})")
        kw: dict[str, Any] = {"ddpm_variance": DDPM_VARIANCES[variance]}
        # diffusers' class defaults for keys a config may lack. All classes agree on these except Heun's
        # betas (0.00085..0.012); configs that diffusers writes always carry the beta keys.
        base = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0, "clip_sample_range": 1.0,
                "lambda_min_clipped": -math.inf}
        types = {"num_train_timesteps": int, "steps_offset": int, "beta_start": float, "beta_end": float,
                 "clip_sample_range": float, "lambda_min_clipped": float, "beta_schedule": str,
                 "prediction_type": str}
        for key, default in base.items():
            value = cfg.get(key, default)
            if key in types and not _is_type(value, types[key]):
                raise ValueError(f"scheduler config {key} must be {types[key].__name__}, got {value!r}")
            kw[key] = value
        kw["timestep_spacing"] = cfg.get("timestep_spacing")  # None: each class's default, see above
        for key in ("set_alpha_to_one", "clip_sample", "use_karras_sigmas", "rescale_betas_zero_snr"):
            value = cfg.get(key)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"scheduler config {key} must be true or false, got {value!r}")
            # present-but-null behaves as False in diffusers (the attribute is just falsy)
            kw[key] = bool(value) if key in cfg or key in ("use_karras_sigmas", "rescale_betas_zero_snr") else None
        return cls(**kw)

    def to_diffusers_config(self) -> dict[str, Any]:
        """A DDIMScheduler scheduler_config.json that from_diffusers_config reads back unchanged."""
        cfg: dict[str, Any] = {"_class_name": "DDIMScheduler"}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "ddpm_variance":
                if value != "fixed_small":
                    cfg["variance_type"] = value
            elif f.name == "trained_betas":
                cfg[f.name] = list(value) if value is not None else None
            elif f.name == "lambda_min_clipped":
                if math.isfinite(value):  # -inf is the default and is not valid JSON
                    cfg[f.name] = value
            elif f.name in ("use_karras_sigmas", "rescale_betas_zero_snr"):  # only written when it matters
                if value:
                    cfg[f.name] = value
            elif value is not None:
                cfg[f.name] = value
        return cfg

    # -- the training schedule, as diffusers builds it (float32) --------------------------------
    @property
    def betas(self) -> torch.Tensor:
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas = betas_for_alpha_bar(n)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """Exactly 0 at the last timestep of a zero-terminal-SNR schedule: training and DDIM/DDPM use this."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def sigma_alphas_cumprod(self) -> torch.Tensor:
        """alphas_cumprod as diffusers' sigma-based schedulers (Euler, DPM-Solver) hold it: a zero
        terminal value becomes 2**-24, so that the first sigma is 4096 and not infinite."""
        ac = self.alphas_cumprod
        if self.rescale_betas_zero_snr:
            ac[-1] = 2**-24
        return ac

    @property
    def sigmas(self) -> torch.Tensor:
        """Training sigmas, indexed by timestep (ascending), float32 like diffusers' Euler/DPM."""
        ac = self.sigma_alphas_cumprod
        return ((1 - ac) / ac) ** 0.5

    @property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas.numpy())


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, in diffusers' float32 order: betas whose last alphas_cumprod is 0
    and whose first is unchanged."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    return 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unsupported {key} {value!r} (choose from {', '.join(map(str, choices))})")


def _is_type(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels: n values from sigma_max down to sigma_min (no trailing 0)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.from_numpy((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps for sigmas by interpolating log-sigma (k-diffusion / diffusers `_sigma_to_t`)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10)).reshape(-1)
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(sigmas.shape)


def spaced_timesteps(schedule: NoiseSchedule, steps: int, spacing: str, family: str) -> np.ndarray:
    """The descending timesteps diffusers' `set_timesteps` picks.

    family: "ddim" or "ddpm" (integers), "euler" (Euler, Euler ancestral, Heun: float32, so
    "linspace" can land between training timesteps) or "dpm" (DPMSolverMultistep: integers, spaced
    over steps + 1 intervals with the last dropped, and honouring lambda_min_clipped).
    """
    total = schedule.num_train_timesteps
    if family == "dpm":
        # clipping lambda(t) from below removes the noisiest timesteps (cosine schedules)
        ac = schedule.sigma_alphas_cumprod
        lambdas = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
        last = total - int(torch.searchsorted(torch.flip(lambdas, [0]), schedule.lambda_min_clipped))
        if spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        if spacing == "leading":
            ratio = last // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            return ts + schedule.steps_offset
        return np.arange(last, 0, -total / steps).round().copy().astype(np.int64) - 1
    integer = family in ("ddim", "ddpm")
    dtype = np.int64 if integer else np.float32
    if spacing == "linspace":
        if integer:
            return np.linspace(0, total - 1, steps).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, total - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = total // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(dtype) + dtype(schedule.steps_offset)
    return np.round(np.arange(total, 0, -total / steps)).astype(dtype) - dtype(1)


def noise_levels(schedule: NoiseSchedule, family: str, steps: int, ts: np.ndarray,
                 karras: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The noise levels diffusers' scheduler `family` ("ddim", "ddpm", "euler", "dpm") derives from
    the spaced timesteps `ts`: (sigmas [n + 1] incl. the final one, model timesteps [n], and the
    level each step lands on [n], which only for DDIM can differ from sigmas[1:]). float64 arrays.

    karras=True for ddim/ddpm is our own extension (diffusers has none): Karras levels between the
    spaced schedule's first and last sigma, like Euler's, with continuous timesteps.
    """
    train = schedule.sigmas.numpy()
    if family in ("ddim", "ddpm"):
        # these schedulers index alphas_cumprod directly; sigma(t) in float64 from the float32 alphas
        ac = schedule.alphas_cumprod.double().numpy()
        with np.errstate(divide="ignore"):  # zero terminal SNR: the first level is infinite
            sig = np.sqrt((1 - ac) / ac)
        levels, timesteps = sig[ts], ts.astype(np.float64)
        if family == "ddim":  # steps back a fixed stride; past t = 0 it lands on "final_alpha_cumprod"
            final = 0.0 if schedule.set_alpha_to_one in (None, True) else sig[0]
            prev = ts - schedule.num_train_timesteps // steps
            landing = np.where(prev >= 0, sig[prev.clip(0)], final)
        else:  # DDPM steps to the next timestep, and from the last one to alpha_cumprod = 1
            landing = np.append(levels[1:], 0.0)
        if karras:
            levels = karras_sigmas(steps, levels[-1], levels[0]).numpy()
            timesteps = sigma_to_t(levels, schedule.log_sigmas)
            landing = np.append(levels[1:], landing[-1])
        return np.append(levels, landing[-1]), timesteps, landing
    if family == "euler":
        # sigma interpolated linearly between training timesteps; Karras spans the spaced range
        levels, timesteps = np.interp(ts, np.arange(len(train)), train), ts
        if karras:
            levels = karras_sigmas(steps, levels[-1].item(), levels[0].item()).numpy()
            timesteps = sigma_to_t(levels, schedule.log_sigmas)
        timesteps = timesteps.astype(np.float32)
    else:
        # DPMSolverMultistep: Karras spans the whole training range and its timesteps are rounded
        # (truncated by the int64 cast for cosine schedules), unlike Euler's
        levels, timesteps = np.interp(ts, np.arange(len(train)), train), ts
        if karras:
            levels = karras_sigmas(steps, train[0].item(), train[-1].item()).numpy()
            timesteps = sigma_to_t(levels, schedule.log_sigmas)
            timesteps = (timesteps.round() if schedule.beta_schedule != "squaredcos_cap_v2" else timesteps)
            timesteps = timesteps.astype(np.int64)
    sigmas = np.append(levels, 0.0).astype(np.float32).astype(np.float64)  # diffusers keeps them float32
    return sigmas, timesteps.astype(np.float64), sigmas[1:]
