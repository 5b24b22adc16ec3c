"""A1111's hires fix against diffusers: txt2img, the upscale (latent bilinear, or Lanczos on the pixels),
then StableDiffusionImg2ImgPipeline on that input with the generator carried on. <= 1e-4 on latents."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.pipeline import Pipeline
from tiny import write_tiny_sd_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_sd_folder(tmp_path_factory.mktemp("hires"))


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_matches_txt2img_resize_img2img(model_dir, upscaler):
    import diffusers

    txt = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
    for p in (txt, i2i):
        p.scheduler = diffusers.EulerDiscreteScheduler.from_config(p.scheduler.config)
        p.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=4.0)
    gen = torch.Generator().manual_seed(4)
    if upscaler == "latent":
        first = txt(**kw, num_inference_steps=4, height=16, width=16, generator=gen, output_type="latent").images
        start = F.interpolate(first, scale_factor=2, mode="bilinear", antialias=False)
    else:
        first = txt(**kw, num_inference_steps=4, height=16, width=16, generator=gen).images[0]
        start = first.resize((32, 32), Image.LANCZOS)
    want = i2i(**kw, image=start, strength=0.6, num_inference_steps=5, generator=gen, output_type="latent").images
    pipe = Pipeline.from_pretrained(model_dir)
    pipe.progress = False
    got = pipe(**kw, num_inference_steps=4, height=16, width=16, seed=4, sampler="euler", hires_scale=2.0,
               hires_steps=5, hires_denoise=0.6, hires_upscaler=upscaler, output_type="latent")
    assert got.images.shape == want.shape == (1, 4, 16, 16)
    assert (got.images - want).abs().max().item() <= 1e-4
    text = got.settings.to_infotext()
    assert "Hires upscale: 2" in text and "Hires steps: 5" in text and "Denoising strength: 0.6" in text
    assert "Size: 16x16" in text
