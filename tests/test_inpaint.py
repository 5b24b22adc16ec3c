"""Inpainting against diffusers' StableDiffusionInpaintPipeline, for 9-channel inpainting U-Nets and ordinary
4-channel ones, with A1111's compositing: inside the mask <= 2/255 of diffusers' pixels, outside it (mask blur 0)
exactly the input's."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipeline import Pipeline
from tiny import diffusers_with_scheduler, write_tiny_sd_folder

PIXEL_TOL = 2 / 255
LATENT_TOL = 1e-4
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module", params=[9, 4], ids=["9-channel", "4-channel"])
def model_dir(request, tmp_path_factory):
    return write_tiny_sd_folder(tmp_path_factory.mktemp(f"inpaint{request.param}"), in_channels=request.param)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:26] = 255
    return image, Image.fromarray(mask)


def reference(model_dir, sampler):
    return diffusers_with_scheduler("StableDiffusionInpaintPipeline", model_dir, SCHEDULERS[sampler],
                                    safety_checker=None, requires_safety_checker=False)


def ours(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    pipe.progress = False
    return pipe


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler", 0.7), ("dpmpp_2m", 1.0), ("dpmpp_2m", 0.7)])
def test_inpaint_matches_diffusers_inside_and_keeps_the_input_outside(model_dir, scene, sampler, strength):
    image, mask = scene
    kw = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=5, guidance_scale=4.0,
              strength=strength)
    want = reference(model_dir, sampler)(image=image, mask_image=mask, **kw,
                                         generator=torch.Generator().manual_seed(3), output_type="np").images
    got = ours(model_dir).inpaint(image, mask, **kw, seed=3, sampler=sampler, mask_blur=0, output_type="np")
    inside = np.asarray(mask) > 127
    assert np.abs(got.images[0][inside] - want[0][inside]).max() <= PIXEL_TOL
    assert np.array_equal(got.images[0][~inside], np.asarray(image, np.float32)[~inside] / 255)
    assert got.settings.inpaint and got.settings.mask_blur == 0


def test_inpaint_by_latents_and_the_known_region_really_held(model_dir, scene):
    """The latents themselves equal diffusers' (output_type latent: no compositing); a 4-channel model keeps
    the masked-out latents at the input's."""
    image, mask = scene
    kw = dict(prompt="a cat", num_inference_steps=4, guidance_scale=3.0, strength=0.8)
    want = reference(model_dir, "euler")(image=image, mask_image=mask, **kw, generator=torch.Generator().manual_seed(1),
                                         output_type="latent").images
    got = ours(model_dir).inpaint(image, mask, **kw, seed=1, sampler="euler", mask_blur=0, output_type="latent").images
    assert (got - want).abs().max().item() <= LATENT_TOL


def test_mask_blur_softens_the_seam_and_invert_swaps_the_region(scene, tmp_path):
    image, mask = scene
    folder = write_tiny_sd_folder(tmp_path / "m", in_channels=9)
    pipe = ours(folder)
    kw = dict(num_inference_steps=3, seed=0, output_type="np")
    hard = pipe.inpaint(image, mask, "x", mask_blur=0, **kw).images[0]
    soft = pipe.inpaint(image, mask, "x", mask_blur=4, **kw).images[0]
    original = np.asarray(image, np.float32) / 255
    ring = np.zeros((32, 32), bool)
    ring[6:8, 10:26] = True  # just outside the mask: untouched when hard, blended when blurred
    assert np.array_equal(hard[ring], original[ring]) and not np.array_equal(soft[ring], original[ring])
    inverted = pipe.inpaint(image, mask, "x", mask_blur=0, invert_mask=True, **kw).images[0]
    inside = np.asarray(mask) > 127
    assert np.array_equal(inverted[inside], original[inside])


@pytest.mark.parametrize("fill", ["fill", "latent-noise", "latent-nothing"])
def test_masked_content_modes_change_the_start(model_dir, scene, fill):
    image, mask = scene
    pipe = ours(model_dir)
    kw = dict(num_inference_steps=3, seed=0, strength=0.6, mask_blur=0, output_type="np")
    base = pipe.inpaint(image, mask, "x", **kw).images[0]
    other = pipe.inpaint(image, mask, "x", inpaint_fill=fill, **kw)
    inside = np.asarray(mask) > 127
    assert np.abs(other.images[0][inside] - base[inside]).max() > 1e-3
    assert np.array_equal(other.images[0][~inside], base[~inside])
    assert f"Masked content: {fill.replace('-', ' ')}" in other.settings.to_infotext()


def test_only_masked_matches_diffusers_padding_mask_crop(model_dir, scene):
    image, mask = scene
    kw = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=4.0, strength=1.0, height=16, width=16)
    want = reference(model_dir, "euler")(image=image, mask_image=mask, **kw, padding_mask_crop=2,
                                         generator=torch.Generator().manual_seed(3)).images[0]
    got = ours(model_dir).inpaint(image, mask, **kw, seed=3, sampler="euler", mask_blur=0, only_masked=True,
                                  masked_padding=2, output_type="np")
    inside = np.asarray(mask) > 127
    ref = np.asarray(want, np.float32) / 255
    assert np.abs(got.images[0][inside] - ref[inside]).max() <= PIXEL_TOL
    assert np.array_equal(got.images[0][~inside], np.asarray(image, np.float32)[~inside] / 255)
    assert "Inpaint area: Only masked" in got.settings.to_infotext()


def test_outpaint_grows_the_canvas_and_keeps_the_original(scene, tmp_path):
    image, _ = scene
    pipe = ours(write_tiny_sd_folder(tmp_path / "o", in_channels=9))
    result = pipe.outpaint(image, "a wide landscape", left=6, right=3, down=5, mask_blur=2, num_inference_steps=3,
                           seed=0, output_type="np")
    out = result.images[0]
    assert out.shape == (32 + 6, 32 + 6 + 4, 3)  # 41 -> 42 wide, 37 -> 38 high: multiples of the VAE factor 2
    original = np.asarray(image, np.float32) / 255
    # the original sits at (left 6, top 0); away from the blurred seam its pixels are kept exactly
    assert np.array_equal(out[0:18, 6 + 10:6 + 22], original[0:18, 10:22])
    border = out[:, :6]
    assert border.std() > 1e-3  # not a constant fill


@pytest.mark.parametrize("make_mask,message", [
    (lambda: Image.new("L", (16, 16), 255), "the mask is 16x16 but the image is 32x32"),
    (lambda: Image.new("L", (32, 32), 0), "the mask is empty"),
])
def test_bad_masks_are_one_line_errors(scene, make_mask, message, tmp_path):
    image, _ = scene
    pipe = ours(write_tiny_sd_folder(tmp_path / "b"))
    with pytest.raises(ValueError, match=message):
        pipe.inpaint(image, make_mask(), "x", num_inference_steps=2)


def test_rgba_and_palette_masks_are_converted(scene):
    from ldm.inpaint_masks import load_mask

    _, mask = scene
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent canvas, the mask painted opaque white
    rgba.paste((255, 255, 255, 255), mask=mask)
    palette = mask.convert("P")
    for converted in (load_mask(rgba), load_mask(palette)):
        assert converted.mode == "L" and np.array_equal(np.asarray(converted) > 127, np.asarray(mask) > 127)


def run(capsys, *argv):
    from ldm.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_inpaint_outpaint_and_hires(scene, tmp_path, capsys):
    from ldm.io.png_info import read_parameters
    from ldm.settings import GenerationSettings

    image, mask = scene
    folder = write_tiny_sd_folder(tmp_path / "m", in_channels=9)
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    common = ["--model", folder, "--steps", "3", "--seed", "1", "--quiet"]
    code, _, err = run(capsys, "inpaint", tmp_path / "in.png", tmp_path / "mask.png", "a red circle", *common,
                       "--mask-blur", "0", "--fill", "latent-noise", "--out", tmp_path / "out.png")
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert np.array_equal(out[np.asarray(mask) < 128], np.asarray(image)[np.asarray(mask) < 128])
    s = GenerationSettings.from_infotext(read_parameters(tmp_path / "out.png"))
    assert s.inpaint and s.mask_blur == 0 and s.inpaint_fill == "latent-noise" and s.strength == 0.75
    code, _, err = run(capsys, "inpaint", tmp_path / "in.png", tmp_path / "mask.png", "--from-png", tmp_path / "out.png",
                       "--model", folder, "--quiet", "--out", tmp_path / "again.png")
    assert code == 0, err
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "out.png").read_bytes()
    code, _, err = run(capsys, "outpaint", tmp_path / "in.png", "wide", *common, "--right", "5",
                       "--out", tmp_path / "wide.png")
    assert code == 0, err
    assert Image.open(tmp_path / "wide.png").size == (40, 32)  # 32 + 5, up to a multiple of 8
    sd = write_tiny_sd_folder(tmp_path / "sd")
    code, _, err = run(capsys, "generate", "x", "--model", sd, "--steps", "2", "--height", "16", "--width", "16",
                       "--hires-scale", "2", "--hires-denoise", "0.5", "--quiet", "--out", tmp_path / "hi.png")
    assert code == 0, err
    assert Image.open(tmp_path / "hi.png").size == (32, 32)
    s = GenerationSettings.from_infotext(read_parameters(tmp_path / "hi.png"))
    assert (s.hires_scale, s.hires_denoise, s.width, s.strength) == (2.0, 0.5, 16, None)


def test_cli_bad_inpaint_input_is_one_line(scene, tmp_path, capsys):
    image, mask = scene
    folder = write_tiny_sd_folder(tmp_path / "m", in_channels=9)
    image.save(tmp_path / "in.png")
    mask.resize((16, 16)).save(tmp_path / "small.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for mask_file, message in (("small.png", "the mask is 16x16"), ("empty.png", "the mask is empty"),
                               ("junk.png", "not a readable image")):
        code, _, err = run(capsys, "inpaint", tmp_path / "in.png", tmp_path / mask_file, "x", "--model", folder,
                           "--quiet", "--out", tmp_path / "o.png")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run(capsys, "generate", "x", "--model", folder, "--quiet", "--out", tmp_path / "o.png")
    assert code == 2 and "inpainting model" in err
