"""SDXL against diffusers on tiny random models: the U-Net's added embedding, the text-encoder pair,
whole txt2img and img2img runs, the base-to-refiner hand-off, and single files both ways.

Bounds (from the issue): <= 1e-4 max abs difference on latents, <= 2/255 on pixels.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.io.diffusers_config import unet_config_from_diffusers
from ldm.io.model_files import load_model, save_single_file
from ldm.models.unet import UNet
from ldm.pipeline import Pipeline
from tiny import TINY_XL_POOLED, diffusers_with_scheduler, tiny_xl_unet, write_tiny_sdxl_folder

LATENT_TOL = 1e-4
PIXEL_TOL = 2 / 255
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
SIZE = dict(height=16, width=16)  # the tiny VAE halves: 8x8 latents


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_tiny_sdxl_folder(tmp_path_factory.mktemp("xl_base"))


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    return write_tiny_sdxl_folder(tmp_path_factory.mktemp("xl_refiner"), refiner=True, seed=10)


def reference(folder, sampler, cls_name="StableDiffusionXLPipeline"):
    return diffusers_with_scheduler(cls_name, folder, SCHEDULERS[sampler])


def ours(folder, **kw):
    pipe = Pipeline.from_pretrained(folder, **kw)
    pipe.progress = False
    return pipe


def both_outputs(run):
    return {t: run(t) for t in ("latent", "np")}


def assert_close(got, want):
    assert torch.as_tensor(got["latent"]).shape == torch.as_tensor(want["latent"]).shape
    assert (torch.as_tensor(got["latent"]) - torch.as_tensor(want["latent"])).abs().max().item() <= LATENT_TOL
    assert got["np"].shape == want["np"].shape
    assert np.abs(got["np"] - want["np"]).max() <= PIXEL_TOL


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_unet_added_embedding_matches_diffusers(refiner):
    ref = tiny_xl_unet(refiner, seed=3)
    unet = UNet(unet_config_from_diffusers(dict(ref.config))).eval()
    unet.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, ref.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, TINY_XL_POOLED, generator=g)
    ids = torch.tensor([[16.0, 16, 0, 0, 6.0]] * 2) if refiner else torch.tensor([[16.0, 24, 3, 5, 16, 16]] * 2)
    t = torch.tensor([801.0, 13.0])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        got = unet(x, t, context, unet.vector_conditioning(pooled, ids))
        other = unet(x, t, context, unet.vector_conditioning(pooled, ids + 1))
    assert (got - want).abs().max().item() <= 1e-5
    assert (other - got).abs().max().item() > 1e-4  # the size ids really condition it
    with pytest.raises(ValueError, match="added conditioning"):
        unet(x, t, context)


@pytest.mark.parametrize("negative", [None, "blurry"], ids=["no-negative", "negative"])
def test_text_encoder_pair_matches_encode_prompt(base_dir, negative):
    ref = reference(base_dir, "euler")
    parts = load_model(base_dir)
    want = ref.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                             negative_prompt=negative)
    pos = parts.text_encoder.encode(["a red circle"])
    assert pos.states.shape == want[0].shape and pos.pooled.shape == want[2].shape
    assert (pos.states - want[0]).abs().max().item() <= 1e-5
    assert (pos.pooled - want[2]).abs().max().item() <= 1e-5
    if negative is None:  # force_zeros_for_empty_prompt: diffusers conditions on zeros
        assert parts.force_zeros_for_empty_prompt and not want[1].any() and not want[3].any()
    else:
        neg = parts.text_encoder.encode([negative])
        assert (neg.states - want[1]).abs().max().item() <= 1e-5
        assert (neg.pooled - want[3]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("negative", ["", "blurry"], ids=["empty-negative", "negative"])
def test_txt2img_matches_diffusers_by_latents(base_dir, sampler, negative):
    ref, pipe = reference(base_dir, sampler), ours(base_dir)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    # 4 steps at CFG 4: this random tiny U-Net amplifies a 1e-7 change of its input to 1e-4 over 5 DDIM steps
    # at CFG 5 in diffusers alone, so longer runs would compare rounding, not the algorithm
    kw = dict(prompt=["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=4.0, **SIZE)
    # diffusers' "no negative prompt" (None) is ldm's empty one
    want = both_outputs(lambda t: ref(**kw, negative_prompt=negative or None, latents=noise, output_type=t).images)
    got = both_outputs(lambda t: pipe(**kw, negative_prompt=negative, latents=noise, sampler=sampler,
                                      output_type=t).images)
    assert_close(got, want)


def test_txt2img_by_seed_and_size_conditioning(base_dir):
    ref, pipe = reference(base_dir, "euler"), ours(base_dir)
    xl = dict(original_size=(24, 40), crops_coords_top_left=(3, 5), target_size=(16, 16))
    kw = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=6.0, **SIZE, **xl)
    want = both_outputs(lambda t: ref(**kw, generator=torch.Generator().manual_seed(5), output_type=t).images)
    got = both_outputs(lambda t: pipe(**kw, seed=5, sampler="euler", output_type=t).images)
    assert_close(got, want)
    plain = pipe("a red circle", num_inference_steps=4, guidance_scale=6.0, seed=5, sampler="euler",
                 output_type="latent", **SIZE).images
    assert (plain - got["latent"]).abs().max().item() > 1e-3  # the size conditioning changed the image


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(base_dir, sampler):
    ref, pipe = reference(base_dir, sampler, "StableDiffusionXLImg2ImgPipeline"), ours(base_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    kw = dict(prompt="a red circle", negative_prompt="blurry", strength=0.6, num_inference_steps=10, guidance_scale=4.0)
    want = both_outputs(lambda t: ref(image=image, **kw, generator=torch.Generator().manual_seed(5),
                                      output_type=t).images)
    got = both_outputs(lambda t: pipe.img2img(image, **kw, seed=5, sampler=sampler, output_type=t).images)
    assert_close(got, want)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_base_to_refiner_handoff_matches_diffusers(base_dir, refiner_dir, sampler):
    base = reference(base_dir, sampler)
    refiner = reference(refiner_dir, sampler, "StableDiffusionXLImg2ImgPipeline")
    pipe = ours(base_dir, refiner=refiner_dir)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    # short and mildly guided: diffusers alone turns a 1e-7 input change into 2e-3 over 10 DDIM steps at CFG 5
    kw = dict(prompt="a red circle", num_inference_steps=6, guidance_scale=3.0)

    def diffusers_run(output_type):
        handed = base(**kw, latents=noise, denoising_end=0.7, output_type="latent", **SIZE).images
        return refiner(**kw, image=handed, denoising_start=0.7, output_type=output_type).images

    want = both_outputs(diffusers_run)
    result = pipe(**kw, latents=noise, sampler=sampler, refiner_switch=0.7, output_type="np", **SIZE)
    got = {"np": result.images, "latent": pipe(**kw, latents=noise, sampler=sampler, refiner_switch=0.7,
                                               output_type="latent", **SIZE).images}
    assert_close(got, want)
    assert result.settings.refiner_switch == 0.7 and result.settings.refiner_name == refiner_dir.name
    assert "Refiner switch at: 0.7" in result.settings.to_infotext()


def test_refiner_alone_is_refused(refiner_dir):
    with pytest.raises(ValueError, match="refiner"):
        ours(refiner_dir)("a red circle", num_inference_steps=2, **SIZE)


def test_single_file_round_trip(base_dir, refiner_dir, tmp_path):
    for folder in (base_dir, refiner_dir):
        parts = load_model(folder)
        path = save_single_file(parts, tmp_path / f"{folder.name}.safetensors")
        again = load_model(path)
        assert again.architecture == parts.architecture
        assert again.force_zeros_for_empty_prompt == parts.force_zeros_for_empty_prompt
        for a, b in ((parts.unet, again.unet), (parts.vae, again.vae)):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        for a, b in zip(parts.text_encoder.encoders, again.text_encoder.encoders):
            sa, sb = a.model.state_dict(), b.model.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    pipe_a, pipe_b = ours(base_dir), Pipeline(load_model(tmp_path / f"{base_dir.name}.safetensors"))
    pipe_b.progress = False
    kw = dict(num_inference_steps=3, seed=1, output_type="np", **SIZE)
    assert np.array_equal(pipe_a("a cat", **kw).images, pipe_b("a cat", **kw).images)


def test_our_single_file_loads_in_diffusers_with_the_same_weights(base_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    parts = load_model(base_dir)
    path = save_single_file(parts, tmp_path / "xl.safetensors")
    ref = StableDiffusionXLPipeline.from_single_file(str(path), config=str(base_dir), local_files_only=True)
    for ours_state, theirs in ((parts.unet.state_dict(), ref.unet.state_dict()),
                               (parts.vae.state_dict(), ref.vae.state_dict()),
                               (parts.text_encoder.first.model.state_dict(), ref.text_encoder.state_dict()),
                               (parts.text_encoder.second.model.state_dict(), ref.text_encoder_2.state_dict())):
        assert set(theirs) <= set(ours_state) | {"text_model.embeddings.position_ids"}
        for key, value in theirs.items():
            if key in ours_state:
                assert torch.equal(ours_state[key], value), key


def test_foreign_single_file_needs_only_a_tokenizer(base_dir, tmp_path):
    """A file without our metadata (as A1111/ComfyUI users have them) loads from its keys and --tokenizer."""
    from safetensors.torch import load_file, save_file

    parts = load_model(base_dir)
    ours_file = save_single_file(parts, tmp_path / "xl.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(str(ours_file)), str(foreign))  # the same tensors, no metadata
    again = load_model(foreign, tokenizer=base_dir)
    assert again.architecture == "sdxl_base" and again.force_zeros_for_empty_prompt
    assert again.vae.config.scaling_factor == 0.13025
    probe = ["a red circle"]
    a, b = parts.text_encoder.encode(probe), again.text_encoder.encode(probe)
    assert torch.equal(a.states, b.states) and torch.equal(a.pooled, b.pooled)
    sa, sb = parts.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the command line ---------------------------------------------------------------------------------
def run(capsys, *argv):
    from ldm.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_base_and_refiner_png_round_trip(base_dir, refiner_dir, tmp_path, capsys):
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", base_dir, "--refiner", refiner_dir, "--quiet"]
    code, _, err = run(capsys, "generate", "a red circle", *common, "--steps", "6", "--seed", "3", "--height", "16",
                       "--width", "16", "--original-size", "32", "24", "--refiner-switch", "0.6", "--out", first)
    assert code == 0, err
    from ldm.io.png_info import read_parameters
    from ldm.settings import GenerationSettings

    s = GenerationSettings.from_infotext(read_parameters(first))
    assert (s.refiner_switch, s.refiner_name, s.original_size) == (0.6, refiner_dir.name, (32, 24))
    code, _, err = run(capsys, "generate", "--from-png", first, *common, "--out", again)
    assert code == 0, err
    assert first.read_bytes() == again.read_bytes()
    code, _, err = run(capsys, "generate", "--from-png", first, "--model", base_dir, "--quiet", "--out", again)
    assert code == 2 and "pass --refiner" in err and len(err.strip().splitlines()) == 1


def test_cli_convert_sdxl_both_ways(base_dir, tmp_path, capsys):
    single, folder = tmp_path / "xl.safetensors", tmp_path / "back"
    assert run(capsys, "convert", base_dir, single)[0] == 0
    assert run(capsys, "convert", single, folder)[0] == 0
    a, b = load_model(base_dir), load_model(folder)
    assert b.architecture == "sdxl_base" and b.force_zeros_for_empty_prompt
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    probe = ["a red circle"]
    assert torch.equal(a.text_encoder.encode(probe).states, b.text_encoder.encode(probe).states)


def _without(path, dst, prefix):
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith(prefix)}, str(dst))
    return dst


def test_cli_bad_sdxl_input_is_one_line(base_dir, refiner_dir, tmp_path, capsys):
    single = save_single_file(load_model(base_dir), tmp_path / "xl.safetensors")
    broken = _without(single, tmp_path / "broken.safetensors", "conditioner.embedders.1.")
    cases = [
        (["generate", "x", "--model", broken, "--tokenizer", base_dir], "second text encoder"),
        (["generate", "x", "--model", refiner_dir, "--height", "16", "--width", "16"], "refiner"),
        (["generate", "x", "--model", base_dir, "--height", "15", "--width", "16"], "multiples of 2"),
        (["generate", "x", "--model", base_dir, "--original-size", "16"], "expected 2 arguments"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv, "--quiet", "--out", tmp_path / "o.png")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("error:")


def test_clip_skip_matches_diffusers_on_both_encoders(base_dir):
    ref, parts = reference(base_dir, "euler"), load_model(base_dir, clip_skip=1)
    want = ref.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                             clip_skip=1)
    got = parts.text_encoder.encode(["a red circle"])
    assert (got.states - want[0]).abs().max().item() <= 1e-5 and (got.pooled - want[2]).abs().max().item() <= 1e-5
    assert (got.states - load_model(base_dir).text_encoder.encode(["a red circle"]).states).abs().max() > 1e-3


def test_long_prompts_chunk_alike_on_both_encoders(base_dir):
    enc = load_model(base_dir).text_encoder
    head = "ab " * 37 + "c"  # exactly 75 character tokens: one full chunk
    long = head + " d" * 10  # and 10 more: a second chunk
    out = enc.encode([long, "short"])
    assert enc.num_chunks([head]) == 1 and enc.num_chunks([long]) == 2 and out.states.shape == (2, 2 * 77, 192)
    alone = enc.encode([head])
    # A1111: each chunk is encoded on its own, on both encoders, and the pooled vector is the first chunk's
    # (to rounding: the batch of two runs through other matmul blockings than the prompt alone)
    assert torch.allclose(out.states[:1, :77], alone.states, atol=1e-6)
    assert torch.allclose(out.pooled[:1], alone.pooled, atol=1e-6)
    assert (out.states[:1, 77:] - alone.states).abs().max() > 1e-3
