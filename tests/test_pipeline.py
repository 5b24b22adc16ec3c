"""Whole txt2img / img2img runs against diffusers' pipelines loaded from the same saved folder.

Bounds (from the issue): <= 1e-4 max abs difference on latents, <= 2/255 on pixels.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipeline import Pipeline
from tiny import write_tiny_sd_folder

LATENT_TOL = 1e-4
PIXEL_TOL = 2 / 255

DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                        "euler_ancestral": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                        "dpmpp_2m": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler"}


@pytest.fixture(scope="module", params=[("sd1", "epsilon", "leading"), ("sd2", "v_prediction", "trailing")],
                ids=["sd1-eps-leading", "sd2-v-trailing"])
def model_dir(request, tmp_path_factory):
    variant, prediction, spacing = request.param
    return write_tiny_sd_folder(tmp_path_factory.mktemp(variant), variant, prediction, spacing)


def reference(model_dir, sampler, karras=False, img2img=False):
    import diffusers

    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    extra = {"use_karras_sigmas": True} if karras else {}
    pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler]).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    pipe.progress = False
    return pipe


def assert_close(got_latents, want_latents, got_pixels, want_pixels):
    assert torch.as_tensor(got_latents).shape == torch.as_tensor(want_latents).shape
    assert (torch.as_tensor(got_latents) - torch.as_tensor(want_latents)).abs().max().item() <= LATENT_TOL
    assert got_pixels.shape == want_pixels.shape
    assert np.abs(got_pixels - want_pixels).max() <= PIXEL_TOL


@pytest.mark.parametrize("sampler,karras", [("ddim", False), ("euler", False), ("dpmpp_2m", False),
                                            ("dpmpp_2m", True), ("euler", True), ("heun", False),
                                            ("euler_ancestral", False), ("ddpm", False)])
def test_txt2img_matches_diffusers(model_dir, sampler, karras):
    ref, pipe = reference(model_dir, sampler, karras), ours(model_dir)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    kw = dict(prompt=["a red circle", "a blue square"], negative_prompt=["", "green"], num_inference_steps=6,
              guidance_scale=5.0, height=32, width=32)
    want = {t: ref(**kw, latents=noise, generator=torch.Generator().manual_seed(3), output_type=t).images
            for t in ("latent", "np")}
    got = {t: pipe(**kw, latents=noise, seed=3, sampler=sampler, karras=karras, output_type=t).images
           for t in ("latent", "np")}
    assert_close(got["latent"], want["latent"], got["np"], want["np"])


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(model_dir, sampler):
    ref, pipe = reference(model_dir, sampler, img2img=True), ours(model_dir)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    kw = dict(prompt="a red circle", strength=0.6, num_inference_steps=10, guidance_scale=4.0)
    want = {t: ref(image=image, **kw, generator=torch.Generator().manual_seed(5), output_type=t).images
            for t in ("latent", "np")}
    got = {t: pipe.img2img(image, **kw, seed=5, sampler=sampler, output_type=t).images for t in ("latent", "np")}
    assert_close(got["latent"], want["latent"], got["np"], want["np"])


def test_guidance_rescale_matches_diffusers(model_dir):
    # clip_skip is compared at the text-encoder level (tests/test_text.py): diffusers' pipeline
    # clip_skip path fails with transformers 5 (CLIPTextModel lost `.text_model`).
    ref, pipe = reference(model_dir, "euler"), ours(model_dir)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    want = ref("a cat", num_inference_steps=4, guidance_scale=6.0, guidance_rescale=0.7,
               latents=noise, height=32, width=32, output_type="latent").images
    got = pipe("a cat", num_inference_steps=4, guidance_scale=6.0, guidance_rescale=0.7, latents=noise,
               height=32, width=32, sampler="euler", output_type="latent").images
    assert (got - want).abs().max().item() <= LATENT_TOL


def test_seed_reproducible_and_np_output_shape(model_dir):
    pipe = ours(model_dir)
    a = pipe("a", num_inference_steps=2, seed=11, height=32, width=48, num_images_per_prompt=2, output_type="np")
    b = pipe("a", num_inference_steps=2, seed=11, height=32, width=48, num_images_per_prompt=2, output_type="np")
    c = pipe("a", num_inference_steps=2, seed=12, height=32, width=48, num_images_per_prompt=2, output_type="np")
    assert a.images.shape == (2, 32, 48, 3) and a.images.dtype == np.float32
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)


def test_img2img_tiny_strength_still_runs_a_step(model_dir):
    pipe = ours(model_dir)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    result = pipe.img2img(image, "x", strength=0.05, num_inference_steps=10, seed=0, output_type="latent")
    assert result.steps_run >= 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=31), "multiples of 2"), (dict(num_inference_steps=0), "steps must be >= 1"),
    (dict(guidance_scale=float("nan")), "finite"), (dict(sampler="plms"), "unknown sampler"),
])
def test_bad_settings_are_one_line_errors(model_dir, kwargs, message):
    pipe = ours(model_dir)
    with pytest.raises(ValueError, match=message):
        pipe("x", **{"height": 32, "width": 32, **kwargs})


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.1])
def test_bad_strength(model_dir, strength):
    with pytest.raises(ValueError, match="strength"):
        ours(model_dir).img2img(Image.new("RGB", (32, 32)), "x", strength=strength)


def test_unet_nan_is_reported_with_the_step(model_dir):
    pipe = ours(model_dir)
    with torch.no_grad():
        pipe.parts.unet.conv_out.bias.fill_(float("nan"))
    from ldm.pipeline import GenerationError
    with pytest.raises(GenerationError, match="NaN/Inf at step 1 of 3"):
        pipe("x", num_inference_steps=3, height=32, width=32, seed=0)


def test_half_precision_vae_overflow_is_retried_in_fp32(model_dir):
    """An fp16 decode that overflows (as SD VAEs do) is redone in fp32 instead of returning NaNs."""
    pipe = ours(model_dir)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pipe.parts.vae.decoder.conv_in.weight.mul_(3e4)  # activations beyond fp16's 65504
    want = pipe.decode(latents)
    pipe.parts.to(dtype=torch.float16)
    pipe.dtype = torch.float16
    with torch.no_grad():
        half = pipe.parts.vae.decode(pipe.parts.vae.unscale_latents(latents).half())
    assert not torch.isfinite(half).all()  # the overflow this test is about really happens
    got = pipe.decode(latents)
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.05
    assert pipe.parts.vae.decoder.conv_in.weight.dtype == torch.float16  # restored afterwards


@pytest.fixture(scope="module")
def zero_snr_dir(tmp_path_factory):
    """An SD2-style v-prediction folder whose scheduler config asks for a zero-terminal-SNR schedule."""
    import json

    folder = write_tiny_sd_folder(tmp_path_factory.mktemp("zsnr"), "sd2", "v_prediction", "trailing")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rescale_betas_zero_snr": True}))
    return folder


@pytest.mark.parametrize("sampler,strength", [("dpmpp_2m", 0.7), ("euler", 0.7), ("euler_ancestral", 0.7),
                                              ("ddim", 0.7), ("ddim", 1.0), ("ddpm", 1.0)])
def test_zero_terminal_snr_model_matches_diffusers(zero_snr_dir, sampler, strength):
    ref, pipe = reference(zero_snr_dir, sampler), ours(zero_snr_dir)
    assert ref.scheduler.config.rescale_betas_zero_snr and pipe.parts.schedule.rescale_betas_zero_snr
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(prompt="a red circle", num_inference_steps=6, guidance_scale=5.0, guidance_rescale=0.7,
              height=32, width=32)
    want = {t: ref(**kw, latents=noise, generator=torch.Generator().manual_seed(3), output_type=t).images
            for t in ("latent", "np")}
    got = {t: pipe(**kw, latents=noise, seed=3, sampler=sampler, output_type=t).images for t in ("latent", "np")}
    assert_close(got["latent"], want["latent"], got["np"], want["np"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ref = reference(zero_snr_dir, sampler, img2img=True)
    kw = dict(prompt="a red circle", strength=strength, num_inference_steps=10, guidance_scale=4.0)
    want = ref(image=image, **kw, generator=torch.Generator().manual_seed(5), output_type="latent").images
    got = pipe.img2img(image, **kw, seed=5, sampler=sampler, output_type="latent").images
    assert (got - want).abs().max().item() <= LATENT_TOL


def test_zero_terminal_snr_model_refuses_heun_in_one_line(zero_snr_dir):
    sampler = "heun"  # diffusers' Heun ignores rescale_betas_zero_snr
    with pytest.raises(ValueError, match="zero-terminal-SNR") as err:
        ours(zero_snr_dir)("a red circle", num_inference_steps=4, height=32, width=32, sampler=sampler)
    assert len(str(err.value).splitlines()) == 1
