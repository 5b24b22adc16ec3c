"""Schedules, timestep spacing and scheduler_config.json handling, against diffusers' schedulers."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler)

from ldm.sampling.plan import plan_sampling
from ldm.sampling.schedule import NoiseSchedule, karras_sigmas, sigma_to_t

CLASSES = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
           "euler_ancestral": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler}


def config(**overrides) -> dict:
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
               timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)
    return {**cfg, **overrides}


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_and_alphas_cumprod_equal_diffusers(beta_schedule):
    cfg = config(beta_schedule=beta_schedule)
    ours, theirs = NoiseSchedule.from_diffusers_config(cfg), DDPMScheduler.from_config(cfg)
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    euler = EulerDiscreteScheduler.from_config(cfg)  # training sigmas, ascending in t (diffusers: descending)
    assert torch.equal(ours.sigmas, euler.sigmas[:-1].flip(0))


def test_trained_betas_equal_diffusers():
    betas = np.linspace(1e-4, 0.03, 500).tolist()
    cfg = config(trained_betas=betas, num_train_timesteps=500)
    ours = NoiseSchedule.from_diffusers_config(cfg)
    assert torch.equal(ours.alphas_cumprod, DDIMScheduler.from_config(cfg).alphas_cumprod)
    with pytest.raises(ValueError, match="trained_betas has 500 values"):
        NoiseSchedule.from_diffusers_config({**cfg, "num_train_timesteps": 1000})


def _diffusers_levels(name: str, sched) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' (sigmas, timesteps) in our layout: one entry per step, plus the final sigma."""
    if name in ("ddim", "ddpm"):  # these keep alphas, not sigmas; sigma(t) = sqrt((1 - abar) / abar)
        ac = sched.alphas_cumprod.double()[sched.timesteps]
        return ((1 - ac) / ac).sqrt(), sched.timesteps.double()
    if name == "heun":  # diffusers interleaves each level twice for the two evaluations
        return torch.cat([sched.sigmas[:1], sched.sigmas[1:-1:2], sched.sigmas[-1:]]).double(), \
            sched.timesteps[::2].double()
    return sched.sigmas.double(), sched.timesteps.double()


SPACING_CASES = [(name, spacing, offset, karras) for name in CLASSES
                 for spacing in ("leading", "linspace", "trailing") for offset in (0, 1)
                 for karras in ((False, True) if name in ("euler", "heun", "dpmpp_2m") else (False,))]


@pytest.mark.parametrize("name,spacing,offset,karras", SPACING_CASES)
def test_timesteps_and_sigmas_equal_diffusers(name, spacing, offset, karras):
    cfg = config(timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras)
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    for steps in (1, 7, 10, 50):
        sched = CLASSES[name].from_config(cfg)
        sched.set_timesteps(steps)
        sigmas, timesteps = _diffusers_levels(name, sched)
        plan = plan_sampling(schedule, name, steps)
        assert torch.equal(plan.timesteps, timesteps), (steps, plan.timesteps, timesteps)
        if name in ("ddim", "ddpm"):  # our sigma(t) vs one derived here from the same float32 alphas
            assert torch.allclose(plan.sigmas[:-1], sigmas, rtol=1e-12, atol=0)
        else:  # diffusers' own float32 sigmas, final 0 included
            assert torch.equal(plan.sigmas, sigmas)
        assert plan.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-7)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_final_level_and_landing_points(set_alpha_to_one):
    schedule = NoiseSchedule(timestep_spacing="linspace", steps_offset=0, set_alpha_to_one=set_alpha_to_one)
    plan = plan_sampling(schedule, "ddim", 7)
    ac = schedule.alphas_cumprod.double()
    sigma = lambda t: ((1 - ac[t]) / ac[t]).sqrt().item()  # noqa: E731
    # linspace puts the model at 999, 832, ...; DDIM steps back 1000 // 7 = 142 from each
    assert plan.timesteps.tolist() == [999, 832, 666, 500, 333, 166, 0]
    assert plan.sigmas_to.tolist() == pytest.approx([sigma(t) for t in (857, 690, 524, 358, 191, 24)]
                                                    + [0.0 if set_alpha_to_one else sigma(0)], rel=1e-12)
    assert plan.sigmas[-1].item() == plan.sigmas_to[-1].item()
    assert plan_sampling(NoiseSchedule(), "ddim", 10).sigmas_to is None  # leading lands on the next step


def test_dpm_lambda_min_clipped_equals_diffusers():
    cfg = config(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="linspace")
    sched = DPMSolverMultistepScheduler.from_config(cfg)
    sched.set_timesteps(10)
    plan = plan_sampling(NoiseSchedule.from_diffusers_config(cfg), "dpmpp_2m", 10)
    assert torch.equal(plan.timesteps, sched.timesteps.double()) and sched.timesteps[0] < 999
    assert torch.equal(plan.sigmas, sched.sigmas.double())


def test_karras_sigmas_and_sigma_to_t_equal_diffusers():
    sched = EulerDiscreteScheduler.from_config(config())
    ours = karras_sigmas(12, 0.03, 14.6)
    assert torch.equal(ours, torch.from_numpy(sched._convert_to_karras(torch.tensor([14.6, 0.03], dtype=torch.float64), 12)))
    assert ours[0].item() == pytest.approx(14.6, rel=1e-12) and ours[-1].item() == pytest.approx(0.03, rel=1e-12)
    assert bool((ours[1:] < ours[:-1]).all())
    log_sigmas = np.log((((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy())
    probe = np.array([0.01, 0.0292, 0.5, 1.0, 3.3, 14.0, 20.0])
    expected = np.array([sched._sigma_to_t(s, log_sigmas) for s in probe])
    assert np.array_equal(sigma_to_t(probe, log_sigmas), expected)


def test_absent_keys_take_each_diffusers_class_default():
    schedule = NoiseSchedule.from_diffusers_config({"beta_schedule": "scaled_linear"})
    assert schedule.timestep_spacing is None and schedule.clip_sample is None and schedule.beta_start == 0.0001
    assert plan_sampling(schedule, "ddim", 10).timesteps[0] == 900  # DDIM default: leading
    assert plan_sampling(schedule, "euler", 10).timesteps[0] == 999  # Euler default: linspace
    assert plan_sampling(schedule, "ddim", 10).clip_sample_range == 1.0  # DDIM clips by default
    assert plan_sampling(schedule, "heun", 10).clip_sample_range is None
    assert plan_sampling(schedule, "euler", 10).clip_sample_range is None  # Euler never clips


def test_use_default_values_are_treated_as_absent():
    """diffusers' in-memory config lists keys that were defaulted; from_config then re-defaults them."""
    cfg = dict(DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1).config)
    assert "timestep_spacing" in cfg["_use_default_values"]
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    sched = EulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(10)
    assert schedule.timestep_spacing is None and sched.config.timestep_spacing == "linspace"
    assert torch.equal(plan_sampling(schedule, "euler", 10).timesteps, sched.timesteps.double())


def test_use_karras_sigmas_is_the_default_only_where_diffusers_reads_it():
    schedule = NoiseSchedule(use_karras_sigmas=True)
    assert plan_sampling(schedule, "dpmpp_2m", 10).karras and plan_sampling(schedule, "heun", 10).karras
    assert not plan_sampling(schedule, "ddim", 10).karras and not plan_sampling(schedule, "euler_ancestral", 10).karras
    assert not plan_sampling(schedule, "euler", 10, karras=False).karras
    assert plan_sampling(NoiseSchedule(), "ddim", 10, karras=True).karras


@pytest.mark.parametrize("key,value", [
    ("thresholding", True), ("rescale_betas_zero_snr", "yes"), ("use_exponential_sigmas", True),
    ("final_sigmas_type", "sigma_min"), ("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3),
    ("solver_type", "heun"), ("interpolation_type", "log_linear"), ("timestep_type", "continuous"),
    ("variance_type", "learned_range"), ("prediction_type", "sample"), ("beta_schedule", "sigmoid"),
    ("timestep_spacing", "uniform"), ("steps_offset", "1"), ("clip_sample", "yes"), ("sigma_min", 0.1),
])
def test_unsupported_config_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        NoiseSchedule.from_diffusers_config(config(**{key: value}))
    assert len(str(err.value).splitlines()) == 1 and repr(value) in str(err.value)


def test_irrelevant_keys_are_ignored():
    cfg = config(skip_prk_steps=True, _class_name="PNDMScheduler", _diffusers_version="0.6.0",
                 dynamic_thresholding_ratio=0.9, lower_order_final=False, euler_at_final=True, solver_order=2)
    assert NoiseSchedule.from_diffusers_config(cfg) == NoiseSchedule.from_diffusers_config(config())


@pytest.mark.parametrize("schedule", [
    NoiseSchedule(),
    NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0, clip_sample=True,
                  clip_sample_range=2.0, use_karras_sigmas=True, ddpm_variance="fixed_large"),
    NoiseSchedule(beta_schedule="squaredcos_cap_v2", timestep_spacing=None, set_alpha_to_one=None,
                  clip_sample=None, lambda_min_clipped=-5.1),
    NoiseSchedule(trained_betas=tuple(np.linspace(1e-4, 0.02, 1000).tolist())),
])
def test_to_diffusers_config_round_trips_and_loads_in_diffusers(schedule):
    cfg = json.loads(json.dumps(schedule.to_diffusers_config()))  # plain JSON, as written to disk
    assert NoiseSchedule.from_diffusers_config(cfg) == schedule
    ddim = DDIMScheduler.from_config(cfg)
    assert torch.equal(ddim.alphas_cumprod, schedule.alphas_cumprod)
    ddim.set_timesteps(10)
    assert torch.equal(plan_sampling(schedule, "ddim", 10).timesteps, ddim.timesteps.double())


@pytest.mark.parametrize("beta_schedule,trained", [("scaled_linear", False), ("linear", False),
                                                   ("squaredcos_cap_v2", False), ("linear", True)])
def test_zero_terminal_snr_schedule_matches_diffusers(beta_schedule, trained):
    """Lin et al.'s rescale: DDIM/DDPM (and training) hold alphas_cumprod[-1] = 0 exactly; Euler and
    DPM-Solver replace it with 2**-24. Ours must equal each, bit for bit, and survive a save/load."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    betas = tuple(np.linspace(1e-4, 0.02, 1000).tolist()) if trained else None
    schedule = NoiseSchedule(beta_schedule=beta_schedule, trained_betas=betas, prediction_type="v_prediction",
                             timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True)
    cfg = json.loads(json.dumps(schedule.to_diffusers_config()))
    assert cfg["rescale_betas_zero_snr"] is True and NoiseSchedule.from_diffusers_config(cfg) == schedule
    for cls in (DDIMScheduler, DDPMScheduler):
        assert torch.equal(cls.from_config(cfg).alphas_cumprod, schedule.alphas_cumprod)
    assert schedule.alphas_cumprod[-1].item() == 0.0
    plain = NoiseSchedule(beta_schedule=beta_schedule, trained_betas=betas)
    assert schedule.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    for cls in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        assert torch.equal(cls.from_config(cfg).alphas_cumprod, schedule.sigma_alphas_cumprod)
    assert schedule.sigmas[-1].item() == pytest.approx(4096.0)
    assert "rescale_betas_zero_snr" not in NoiseSchedule().to_diffusers_config()
