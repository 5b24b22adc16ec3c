"""The stage-2 objective and EMA against diffusers' training utilities.

Tolerance: 1e-6 max abs (fp32; the same formulas, evaluated in a possibly different order).
"""
from __future__ import annotations

import pytest
import torch

from ldm.sampling.schedule import NoiseSchedule
from ldm.train.diffusion_loss import debiased_weights, diffusion_loss, min_snr_weights, noised_inputs
from ldm.train.order import StepDraws

TOL = 1e-6


@pytest.mark.parametrize("prediction_type,zero_snr", [("epsilon", False), ("v_prediction", False),
                                                     ("v_prediction", True)])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_noised_inputs_match_diffusers_scheduler(prediction_type, zero_snr, beta_schedule):
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule(beta_schedule=beta_schedule, prediction_type=prediction_type,
                             rescale_betas_zero_snr=zero_snr)
    ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                        prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_t, t, target, abar = noised_inputs(latents, schedule.alphas_cumprod, StepDraws(0, 3, 6, 1, 0), 1000,
                                         prediction_type)
    # the same draws, in the same order, that noised_inputs takes
    draws = StepDraws(0, 3, 6, 1, 0)
    t_ref, noise = draws.randint(1000), draws.randn(4, 8, 8)
    assert torch.equal(t, t_ref)
    assert (x_t - ref.add_noise(latents, noise, t)).abs().max() <= TOL
    expected = noise if prediction_type == "epsilon" else ref.get_velocity(latents, noise, t)
    assert (target - expected).abs().max() <= TOL
    assert (abar - ref.alphas_cumprod[t]).abs().max() <= TOL


def test_zero_terminal_snr_last_step_is_pure_noise_and_v_is_minus_x0():
    """At t = T of a rescaled schedule x_t carries nothing of the image: the model must take it from the prompt."""
    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = StepDraws(0, 3, 6, 1, 0)
    # every timestep is T: an alphas_cumprod table whose entries all equal the schedule's last one
    last = schedule.alphas_cumprod[-1:].expand(1000).clone()
    x_t, _, target, abar = noised_inputs(latents, last, draws, 1000, "v_prediction")
    noise = StepDraws(0, 3, 6, 1, 0)
    noise.randint(1000)
    assert torch.equal(abar, torch.zeros(6))
    assert torch.equal(x_t, noise.randn(4, 8, 8)) and torch.equal(target, -latents)
    loss = diffusion_loss(torch.zeros_like(target), target, abar, "v_prediction", min_snr_gamma=5.0)
    assert loss.item() == 0.0  # min-SNR gives the pure-noise step no weight: why stage 6 trains without it
    assert diffusion_loss(torch.zeros_like(target), target, abar, "v_prediction").item() > 0.5


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    ac = NoiseSchedule().alphas_cumprod
    plain = noised_inputs(latents, ac, StepDraws(0, 0, 2, 1, 0), 1000, "epsilon")[2]
    offset = noised_inputs(latents, ac, StepDraws(0, 0, 2, 1, 0), 1000, "epsilon", noise_offset=0.1)[2]
    shift = offset - plain
    assert shift.abs().max() > 0
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))  # constant over each channel's pixels


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_recipe(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(ref, t)
    # diffusers' train_text_to_image.py: min(snr, gamma) / snr, or / (snr + 1) for v-prediction
    expected = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    expected = expected / (snr + 1) if prediction_type == "v_prediction" else expected / snr
    got = min_snr_weights(NoiseSchedule().alphas_cumprod[t], 5.0, prediction_type)
    assert torch.allclose(got, expected, rtol=1e-5)
    # and the loss applies them per sample
    pred, target = torch.ones(5, 2), torch.zeros(5, 2)
    abar = NoiseSchedule().alphas_cumprod[t]
    assert diffusion_loss(pred, target, abar, prediction_type, 5.0).item() == pytest.approx(got.mean().item(), rel=1e-6)
    assert diffusion_loss(pred, target, abar, prediction_type).item() == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_weights_match_kohya_recipe(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 250, 500, 999])
    # kohya sd-scripts apply_debiased_estimation: SNR clipped at 1000, then 1/sqrt(snr), or 1/(snr + 1) for v
    snr = compute_snr(ref, t).clamp(max=1000)
    expected = 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(snr)
    abar = NoiseSchedule().alphas_cumprod[t]
    got = debiased_weights(abar, prediction_type)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert (got.diff() > 0).all()  # the noisier the timestep, the larger its weight
    # it multiplies with min-SNR, as in kohya's trainer
    pred, target = torch.ones(5, 2), torch.zeros(5, 2)
    both = diffusion_loss(pred, target, abar, prediction_type, 5.0, debiased=True).item()
    assert both == pytest.approx((got * min_snr_weights(abar, 5.0, prediction_type)).mean().item(), rel=1e-6)
    assert diffusion_loss(pred, target, abar, prediction_type, debiased=True).item() == pytest.approx(got.mean().item(), rel=1e-6)


def test_ema_matches_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    from ldm.train.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ours = EMA(model, decay=0.99, warmup=True)
    ref = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=False)  # diffusers' default ramp (1+n)/(10+n)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        ref.step(model.parameters())
    for (name, _), shadow in zip(model.named_parameters(), ref.shadow_params):
        assert (ours.shadow[name] - shadow).abs().max() <= TOL, name
    restored = EMA(model, decay=0.99)
    restored.load_state_dict(ours.state_dict())
    assert restored.num_updates == 5 and all(torch.equal(restored.shadow[k], v) for k, v in ours.shadow.items())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edit_pairs_noise_the_source_and_target_the_edit(prediction_type):
    """The noised input is the source's, and the target is the one whose x0 is the edited image."""
    ac = NoiseSchedule(prediction_type=prediction_type).alphas_cumprod
    g = torch.Generator().manual_seed(1)
    latents, source = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    source[:3] = latents[:3]  # rows that are their own source
    edit = torch.tensor([False] * 4 + [True] * 4)
    x_t, t, target, abar = noised_inputs(latents, ac, StepDraws(0, 5, 8, 1, 0), 1000, prediction_type,
                                         source=source, edit=edit, edit_min_timestep=300)
    draws = StepDraws(0, 5, 8, 1, 0)
    t_plain, noise = draws.randint(1000), draws.randn(4, 8, 8)
    assert torch.equal(t[:4], t_plain[:4])
    assert torch.equal(t[4:], 300 + t_plain[4:] * 700 // 1000) and t[4:].min() >= 300
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    assert (x_t - (a * source + s * noise)).abs().max() <= TOL
    x0 = (x_t - s * target) / a if prediction_type == "epsilon" else a * x_t - s * target
    assert (x0 - latents).abs().max() <= 1e-4  # fp32 round-off, scaled by 1/sqrt(abar) for eps
    # rows that are their own source get exactly the plain objective, bit for bit
    plain = noised_inputs(latents, ac, StepDraws(0, 5, 8, 1, 0), 1000, prediction_type)
    assert torch.equal(x_t[:3], plain[0][:3]) and torch.equal(target[:3], plain[2][:3])
    assert not torch.allclose(target[4:], plain[2][4:])
