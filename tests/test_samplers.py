"""Our samplers against diffusers' schedulers, step loop for step loop, with the same seeds.

Bound: max abs difference on the final latents <= TOL = 1e-4 (float32; latents here are O(1) like SD's,
and the observed differences are ~1e-6).
The toy model is a fixed random channel mix that depends nonlinearly on both x and t, so a wrong
timestep, input scaling or step formula shows up in the result.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler)

from ldm.sampling.denoiser import make_denoiser
from ldm.sampling.guidance import classifier_free_guidance
from ldm.sampling.plan import add_noise, plan_sampling
from ldm.sampling.samplers import SAMPLERS, sample
from ldm.sampling.schedule import NoiseSchedule

TOL = 1e-4
CLASSES = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
           "euler_ancestral": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler}
KARRAS_IN_DIFFUSERS = ("euler", "heun", "dpmpp_2m")
SPACINGS = [("leading", 1), ("leading", 0), ("linspace", 0), ("trailing", 0)]
SHAPE = (2, 4, 8, 8)


class ToyModel:
    def __init__(self, seed: int = 0, gain: float = 0.9) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(4, 4, generator=g) * 0.5
        self.b = torch.randn(1, 4, 1, 1, generator=g)
        self.gain = gain
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", self.w, x) + torch.sin(t / 100) * self.b
        return self.gain * x + 0.3 * torch.tanh(h) * torch.cos(t / 300)


def sd_config(**overrides) -> dict:
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
               prediction_type="epsilon", timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)
    return {**cfg, **overrides}


def diffusers_run(name: str, cfg: dict, steps: int, *, model=None, seed: int = 0, eta: float | None = None,
                  strength: float | None = None) -> tuple[torch.Tensor, torch.Generator]:
    """diffusers' pipeline loop (txt2img, or img2img's get_timesteps + add_noise when strength is set)."""
    model = model or ToyModel()
    sched = CLASSES[name].from_config(cfg)
    sched.set_timesteps(steps)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    timesteps = sched.timesteps
    if strength is None:
        lat = noise * sched.init_noise_sigma
    else:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1))
        lat = sched.add_noise(image, noise, timesteps[:1].repeat(SHAPE[0]))
    gen = torch.Generator().manual_seed(seed + 2)
    kw = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
    if eta is not None:
        kw["eta"] = eta
    for t in timesteps:
        lat = sched.step(model(sched.scale_model_input(lat, t), t), t, lat, **kw).prev_sample
    return lat, gen


def ours_run(name: str, cfg: dict, steps: int, *, model=None, seed: int = 0, eta: float = 0.0,
             strength: float | None = None, karras: bool | None = None):
    model = model or ToyModel()
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    plan = plan_sampling(schedule, name, steps, karras=karras, strength=strength)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    if strength is None:
        x = noise * plan.init_noise_sigma
    else:
        x = add_noise(torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1)), noise, plan)
    gen = torch.Generator().manual_seed(seed + 2)
    return sample(name, make_denoiser(model, schedule, plan), x, plan, eta=eta, generator=gen), gen, plan


def assert_same_rng(g1: torch.Generator, g2: torch.Generator) -> None:
    assert torch.equal(g1.get_state(), g2.get_state()), "random draws differ in number from diffusers'"


CASES = [(name, pred, spacing, offset, karras)
         for name in CLASSES for pred in ("epsilon", "v_prediction") for spacing, offset in SPACINGS
         for karras in ((False, True) if name in KARRAS_IN_DIFFUSERS else (False,))]


@pytest.mark.parametrize("name,pred,spacing,offset,karras", CASES)
def test_sampler_matches_diffusers(name, pred, spacing, offset, karras):
    cfg = sd_config(prediction_type=pred, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras)
    ref, ref_gen = diffusers_run(name, cfg, 7)
    out, gen, plan = ours_run(name, cfg, 7)
    assert plan.karras == karras and plan.steps == 7
    assert (out - ref).abs().max().item() <= TOL
    assert_same_rng(gen, ref_gen)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers(spacing, eta):
    cfg = sd_config(timestep_spacing=spacing, prediction_type="v_prediction")
    ref, ref_gen = diffusers_run("ddim", cfg, 10, eta=eta)
    out, gen, _ = ours_run("ddim", cfg, 10, eta=eta)
    assert (out - ref).abs().max().item() <= TOL
    assert_same_rng(gen, ref_gen)
    deterministic, _, _ = ours_run("ddim", cfg, 10)
    assert (out - deterministic).abs().max().item() > 1e-2  # the noise really went in


@pytest.mark.parametrize("steps", [1, 2, 25])
@pytest.mark.parametrize("name", list(CLASSES))
def test_step_counts_match_diffusers(name, steps):
    cfg = sd_config(timestep_spacing="trailing", steps_offset=0)
    ref, _ = diffusers_run(name, cfg, steps)
    out, _, plan = ours_run(name, cfg, steps)
    assert (out - ref).abs().max().item() <= TOL
    model = ToyModel()
    ours_run(name, cfg, steps, model=model)
    assert model.calls == plan.model_evaluations == (2 * steps - 1 if name == "heun" else steps)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "heun"])
def test_clip_sample_matches_diffusers(name):
    cfg = sd_config(clip_sample=True, clip_sample_range=1.5, timestep_spacing="linspace", steps_offset=0)
    ref, _ = diffusers_run(name, cfg, 8)
    out, _, plan = ours_run(name, cfg, 8)
    assert plan.clip_sample_range == 1.5
    assert (out - ref).abs().max().item() <= TOL
    unclipped, _, _ = ours_run(name, {**cfg, "clip_sample": False}, 8)
    assert (out - unclipped).abs().max().item() > 1e-2  # clipping was active


def test_config_without_class_defaults_matches_each_class():
    """SD 1.x ships a PNDM config with no timestep_spacing: DDIM reads it as "leading", Euler as
    "linspace"; an Euler config has no clip_sample/set_alpha_to_one: DDIM then clips and uses 1."""
    pndm = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    euler = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "steps_offset": 1, "timestep_spacing": "trailing"}
    for cfg in (pndm, euler):
        for name in CLASSES:
            ref, _ = diffusers_run(name, cfg, 6)
            out, _, _ = ours_run(name, cfg, 6)
            assert (out - ref).abs().max().item() <= TOL, (cfg["_class_name"], name)


def test_ddpm_fixed_large_variance_matches_diffusers():
    cfg = sd_config(variance_type="fixed_large", timestep_spacing="linspace", steps_offset=0)
    ref, ref_gen = diffusers_run("ddpm", cfg, 9)
    out, gen, _ = ours_run("ddpm", cfg, 9)
    assert (out - ref).abs().max().item() <= TOL
    assert_same_rng(gen, ref_gen)


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m", "heun", "ddpm"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_cosine_schedule_matches_diffusers(name, spacing):
    # sigma reaches ~2e4 at t=999 here, which scales float32 rounding: the bound is relative
    cfg = sd_config(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing, lambda_min_clipped=-5.1)
    ref, _ = diffusers_run(name, cfg, 10)
    out, _, _ = ours_run(name, cfg, 10)
    assert (out - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_matches_diffusers(name, strength):
    cfg = sd_config(use_karras_sigmas=name == "dpmpp_2m", prediction_type="v_prediction")
    ref, ref_gen = diffusers_run(name, cfg, 10, strength=strength)
    out, gen, plan = ours_run(name, cfg, 10, strength=strength)
    assert plan.steps == int(10 * strength)
    assert (out - ref).abs().max().item() <= TOL
    assert_same_rng(gen, ref_gen)


@pytest.mark.parametrize("name", list(CLASSES))
def test_tiny_strength_still_runs_one_step(name):
    schedule = NoiseSchedule()
    full = plan_sampling(schedule, name, 10)
    plan = plan_sampling(schedule, name, 10, strength=0.05)
    assert int(10 * 0.05) == 0  # diffusers would keep no timesteps at all
    assert plan.steps == 1 and torch.equal(plan.sigmas, full.sigmas[-2:])
    model = ToyModel()
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = add_noise(image, torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), plan)
    out = sample(name, make_denoiser(model, schedule, plan), x, plan, generator=torch.Generator().manual_seed(2))
    assert model.calls >= 1 and torch.isfinite(out).all()


# -- Karras levels for samplers whose diffusers class has none: checked against references written
# -- from the papers' VP-space formulas, on the very levels the plan picked.
def _vp_reference(name: str, model, plan, x_vp: torch.Tensor, pred: str, eta: float, gen: torch.Generator):
    s, ts = plan.sigmas.tolist(), plan.timesteps.tolist()
    for i in range(len(s) - 1):
        a, a_prev = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
        out = model(x_vp, torch.tensor([ts[i]]))
        if pred == "epsilon":
            x0, eps = (x_vp - math.sqrt(1 - a) * out) / math.sqrt(a), out
        else:
            x0, eps = math.sqrt(a) * x_vp - math.sqrt(1 - a) * out, math.sqrt(a) * out + math.sqrt(1 - a) * x_vp
        if name == "ddim":  # Song et al. eq. 12
            std = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
            x_vp = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
            if eta > 0:
                x_vp = x_vp + std * torch.randn(x_vp.shape, generator=gen)
        else:  # Ho et al. eq. 6-7, posterior variance
            beta = 1 - a / a_prev
            x_vp = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x_vp
            if i < len(s) - 2 or plan.ddpm_last_noise:
                x_vp = x_vp + math.sqrt((1 - a_prev) / (1 - a) * beta) * torch.randn(x_vp.shape, generator=gen)
    return x_vp


@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_karras_ddim_ddpm_match_vp_reference(name, eta, pred):
    schedule = NoiseSchedule(prediction_type=pred)
    plan = plan_sampling(schedule, name, 12, karras=True)
    base = plan_sampling(schedule, name, 12, karras=False)
    assert plan.karras and torch.allclose(plan.sigmas[[0, -2, -1]], base.sigmas[[0, -2, -1]], rtol=1e-12)
    assert not torch.allclose(plan.sigmas, base.sigmas)
    model = ToyModel()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = _vp_reference(name, model, plan, noise, pred, eta, torch.Generator().manual_seed(1))
    out = sample(name, make_denoiser(model, schedule, plan), noise * plan.init_noise_sigma, plan, eta=eta,
                 generator=torch.Generator().manual_seed(1))
    assert (out - ref).abs().max().item() <= TOL


def test_karras_euler_ancestral_matches_diffusers_step_on_same_levels():
    """diffusers' EulerAncestral cannot make Karras levels, but its step can walk ours."""
    schedule = NoiseSchedule(timestep_spacing="linspace", steps_offset=0)
    plan = plan_sampling(schedule, "euler_ancestral", 9, karras=True)
    euler = plan_sampling(schedule, "euler", 9, karras=True)
    assert torch.equal(plan.sigmas, euler.sigmas) and torch.equal(plan.timesteps, euler.timesteps)
    model = ToyModel()
    sched = EulerAncestralDiscreteScheduler.from_config(schedule.to_diffusers_config())
    sched.set_timesteps(9)
    sched.sigmas, sched.timesteps = plan.sigmas.float(), plan.timesteps.float()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    lat, gen = noise * plan.init_noise_sigma, torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        lat = sched.step(model(sched.scale_model_input(lat, t), t), t, lat, generator=gen).prev_sample
    out = sample("euler_ancestral", make_denoiser(model, schedule, plan), noise * plan.init_noise_sigma, plan,
                 generator=torch.Generator().manual_seed(1))
    assert (out - lat).abs().max().item() <= TOL


def test_denoiser_off_the_plan_interpolates_log_sigma():
    schedule = NoiseSchedule()
    log_s = schedule.log_sigmas.astype(float)
    between = math.exp(0.7 * log_s[500] + 0.3 * log_s[501])  # 30% of the way from t=500 to t=501
    assert make_denoiser(ToyModel(), schedule).timestep(math.exp(log_s[500])) == pytest.approx(500, abs=1e-6)
    assert make_denoiser(ToyModel(), schedule).timestep(between) == pytest.approx(500.3, abs=1e-4)
    assert make_denoiser(ToyModel(), schedule, quantize=True).timestep(between) == 500.0


def test_callback_sees_every_step():
    schedule = NoiseSchedule()
    plan = plan_sampling(schedule, "heun", 5)
    seen = []
    sample("heun", make_denoiser(ToyModel(), schedule, plan), torch.randn(SHAPE) * plan.init_noise_sigma, plan,
           callback=lambda info: seen.append((info["i"], info["sigma"], info["denoised"].shape)))
    assert seen == [(i, plan.sigmas[i].item(), torch.Size(SHAPE)) for i in range(5)]


def test_bad_sampling_input_is_a_clear_error():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="choose from .*dpmpp_2m.*euler_ancestral"):
        plan_sampling(schedule, "lms", 10)
    with pytest.raises(ValueError, match="steps must be"):
        plan_sampling(schedule, "euler", 0)
    with pytest.raises(ValueError, match="exceed"):
        plan_sampling(schedule, "euler", 1001)
    with pytest.raises(ValueError, match="strength"):
        plan_sampling(schedule, "euler", 10, strength=0.0)
    with pytest.raises(ValueError, match="outside"):  # diffusers' trailing arange overshoots to t = -1
        plan_sampling(NoiseSchedule(timestep_spacing="trailing"), "ddim", 61)
    plan = plan_sampling(schedule, "euler", 4)
    den = make_denoiser(ToyModel(), schedule, plan)
    with pytest.raises(ValueError, match="eta only applies"):
        sample("euler", den, torch.randn(SHAPE), plan, eta=0.5)
    with pytest.raises(ValueError, match="made for sampler"):
        sample("heun", den, torch.randn(SHAPE), plan)
    assert set(SAMPLERS) == set(CLASSES)


# -- classifier-free guidance ---------------------------------------------------------------------
def _context_unet(calls: list):
    toy = ToyModel(seed=3)

    def unet(x, t, context):
        context = getattr(context, "context", context)  # guidance hands a Conditioning; the tests a tensor
        calls.append((x.shape[0], t.shape, context))
        return toy(x, t) + 0.5 * torch.tanh(context.mean(dim=(1, 2))).view(-1, 1, 1, 1) * x
    return unet


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_cfg_matches_diffusers_combination_and_rescale(guidance_rescale):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    calls = []
    unet = _context_unet(calls)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    x, t = torch.randn(SHAPE, generator=g), torch.full((2,), 421.0)
    guided = classifier_free_guidance(unet, cond, uncond, 7.5, guidance_rescale)(x, t)
    assert len(calls) == 1 and calls[0][0] == 4 and torch.equal(calls[0][2][:2], uncond)  # negative half first
    out_uncond, out_cond = unet(torch.cat([x, x]), torch.tensor(421.0), torch.cat([uncond, cond])).chunk(2)
    plain = out_uncond + 7.5 * (out_cond - out_uncond)
    ref = rescale_noise_cfg(plain, out_cond, guidance_rescale=guidance_rescale) if guidance_rescale else plain
    assert (guided - ref).abs().max().item() <= 1e-6
    if guidance_rescale:
        assert (guided - plain).abs().max().item() > 1e-3  # the rescale really acted


def test_cfg_scale_at_most_one_is_a_single_conditional_pass():
    calls = []
    unet = _context_unet(calls)
    cond = torch.randn(2, 5, 8)
    x, t = torch.randn(SHAPE), torch.full((2,), 10.0)
    out = classifier_free_guidance(unet, cond, None, 1.0, guidance_rescale=0.5)(x, t)
    assert len(calls) == 1 and calls[0][0] == 2 and torch.equal(out, unet(x, t, cond))


def test_cfg_bad_input_is_a_clear_error():
    unet, cond = _context_unet([]), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="unconditional"):
        classifier_free_guidance(unet, cond, None, 7.5)
    with pytest.raises(ValueError, match="negative context shape"):  # noqa: PT011
        classifier_free_guidance(unet, cond, torch.randn(2, 6, 8), 7.5)
    with pytest.raises(ValueError, match="guidance_rescale"):
        classifier_free_guidance(unet, cond, cond, 7.5, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="batch"):
        classifier_free_guidance(unet, cond, cond, 7.5)(torch.randn(3, 4, 8, 8), torch.zeros(3))


ZERO_SNR_CASES = [("euler", "trailing", False), ("euler", "leading", False), ("euler", "trailing", True),
                  ("euler_ancestral", "trailing", False), ("euler_ancestral", "linspace", False),
                  ("dpmpp_2m", "trailing", False), ("dpmpp_2m", "leading", False), ("dpmpp_2m", "trailing", True),
                  ("ddim", "trailing", False), ("ddim", "linspace", False), ("ddpm", "trailing", False)]


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_zero_terminal_snr_clipped_x0_matches_diffusers(name):
    """clip_sample at the infinite first level: x0 is clipped, the direction keeps the unclipped eps."""
    cfg = sd_config(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0,
                    rescale_betas_zero_snr=True, clip_sample=True, clip_sample_range=0.5)
    ref, ref_gen = diffusers_run(name, cfg, 6, model=ToyModel(gain=2.0))
    out, gen, plan = ours_run(name, cfg, 6, model=ToyModel(gain=2.0))
    assert plan.clip_sample_range == 0.5 and math.isinf(plan.sigmas[0].item())
    assert (out - ref).abs().max().item() <= TOL
    assert_same_rng(gen, ref_gen)


@pytest.mark.parametrize("name,spacing,karras", ZERO_SNR_CASES)
@pytest.mark.parametrize("strength", [None, 1.0, 0.7])
def test_zero_terminal_snr_matches_diffusers(name, spacing, karras, strength):
    """A v-prediction model on a rescaled (zero terminal SNR) schedule. The first level is sigma = 4096
    for Euler and DPM-Solver (diffusers clamps alphas_cumprod to 2**-24) and infinite for DDIM/DDPM."""
    cfg = sd_config(prediction_type="v_prediction", timestep_spacing=spacing, steps_offset=0,
                    use_karras_sigmas=karras, rescale_betas_zero_snr=True)
    ref, ref_gen = diffusers_run(name, cfg, 8, strength=strength)
    out, gen, plan = ours_run(name, cfg, 8, strength=strength)
    if strength != 0.7 and spacing != "leading":
        assert plan.sigmas[0].item() == (math.inf if name in ("ddim", "ddpm") else pytest.approx(4096.0))
    assert (out - ref).abs().max().item() <= TOL
    assert_same_rng(gen, ref_gen)


@pytest.mark.parametrize("name,eta,variance", [("ddim", 0.5, None), ("ddim", 0.9, None), ("ddpm", None, "fixed_large")])
def test_zero_terminal_snr_stochastic_first_step_matches_diffusers(name, eta, variance):
    """DDIM with eta and DDPM with the large variance draw noise at the infinite first level too.
    (Not eta = 1: there diffusers' DDIM takes sqrt(1 - abar_prev - std^2) of a rounding-negative number
    on the first step and returns NaN; ours returns the limit.)"""
    cfg = sd_config(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0,
                    rescale_betas_zero_snr=True, **({"variance_type": variance} if variance else {}))
    ref, ref_gen = diffusers_run(name, cfg, 6, eta=eta)
    out, gen, _ = ours_run(name, cfg, 6, eta=eta or 0.0)
    assert (out - ref).abs().max().item() <= TOL
    assert_same_rng(gen, ref_gen)


def test_zero_terminal_snr_refusals_are_one_line():
    """Heun (diffusers' class ignores the key), our Karras extension for DDIM/DDPM (it needs a finite
    top level), and an eps model asked to denoise pure noise."""
    zsnr = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0,
                         rescale_betas_zero_snr=True)
    for call, match in [(lambda: plan_sampling(zsnr, "heun", 10), "rescale_betas_zero_snr"),
                        (lambda: plan_sampling(zsnr, "ddim", 10, karras=True), "karras")]:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert len(str(err.value).splitlines()) == 1
    leading = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1,
                            rescale_betas_zero_snr=True)  # its top timestep is 901: finite, so Karras works
    assert math.isfinite(plan_sampling(leading, "ddim", 10, karras=True).sigmas[0].item())
    eps = NoiseSchedule(prediction_type="epsilon", timestep_spacing="trailing", steps_offset=0,
                        rescale_betas_zero_snr=True)
    plan = plan_sampling(eps, "ddim", 4)
    with pytest.raises(ValueError, match="v_prediction"):
        sample("ddim", make_denoiser(ToyModel(), eps, plan), torch.randn(SHAPE), plan)


@pytest.mark.parametrize("name,zero_snr", [("euler_ancestral", False), ("dpmpp_2m", False), ("dpmpp_2m", True)])
def test_tiny_unet_with_guidance_matches_diffusers_loop(name, zero_snr):
    """The pipeline's inner loop: diffusers' tiny UNet, CFG with rescale, v-prediction, same seeds."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    from tiny import tiny_unet
    unet = tiny_unet("sd2")
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    cfg = sd_config(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0,
                    use_karras_sigmas=True, rescale_betas_zero_snr=zero_snr)
    sched = CLASSES[name].from_config(cfg)
    sched.set_timesteps(5)
    lat, gen = noise * sched.init_noise_sigma, torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat] * 2), t)
            out_uncond, out_cond = unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            out = rescale_noise_cfg(out_uncond + 6.0 * (out_cond - out_uncond), out_cond, guidance_rescale=0.5)
            lat = sched.step(out, t, lat, generator=gen).prev_sample
        schedule = NoiseSchedule.from_diffusers_config(cfg)
        plan = plan_sampling(schedule, name, 5)
        model = classifier_free_guidance(lambda x, t, c: unet(x, t, encoder_hidden_states=c.context).sample,
                                         cond, uncond, 6.0, guidance_rescale=0.5)
        ours = sample(name, make_denoiser(model, schedule, plan), noise * plan.init_noise_sigma, plan,
                      generator=torch.Generator().manual_seed(1))
    assert (ours - lat).abs().max().item() <= TOL
