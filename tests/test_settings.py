"""GenerationSettings: one validation, A1111's infotext both ways, and PNGs that reproduce themselves."""
import json
from dataclasses import replace

import pytest
from PIL import Image

from ldm.cli import main
from ldm.io.png_info import parse_infotext, read_parameters
from ldm.settings import EmbeddingRef, GenerationSettings, LoraRef
from tiny import write_tiny_lora, write_tiny_sd_folder

FULL = GenerationSettings(
    prompt="a red, circle: on grey", negative_prompt="blurry\nsecond line", width=48, height=32, steps=7,
    sampler="ddim", karras=True, guidance_scale=6.25, guidance_rescale=0.7, eta=0.3, seed=123456789012,
    strength=0.55, num_images=3, loras=(LoraRef("style", 0.8, None, "abcdef012345"), LoraRef("b", -0.5, None, "999")),
    clip_skip=1, step_cache=2, model_name="my, model", model_hash="0123456789", batch_pos=2, emphasis="no-norm",
    embeddings=(EmbeddingRef("easynegative", "c74b4e810b03"), EmbeddingRef("style-v2", "0123abcd4567")))


def test_every_field_survives_the_infotext():
    assert GenerationSettings.from_infotext(FULL.to_infotext()) == FULL
    plain = GenerationSettings("a cat", seed=1, width=64, height=64, karras=False)
    assert GenerationSettings.from_infotext(plain.to_infotext()) == plain


def test_infotext_uses_a1111_names_and_counts():
    prompt, negative, fields = parse_infotext(FULL.to_infotext())
    assert prompt == "a red, circle: on grey <lora:style:0.8> <lora:b:-0.5>" and negative == "blurry\nsecond line"
    assert fields["Sampler"] == "DDIM" and fields["Schedule type"] == "Karras" and fields["CFG scale"] == "6.25"
    assert fields["Clip skip"] == "2"  # diffusers' clip_skip 1 (penultimate) is A1111's 2
    assert fields["Denoising strength"] == "0.55" and fields["Eta DDIM"] == "0.3" and fields["Size"] == "48x32"
    assert fields["Lora hashes"] == "style: abcdef012345, b: 999" and fields["Model"] == "my, model"
    assert fields["Batch size"] == "3" and fields["Batch pos"] == "2"
    assert fields["Emphasis"] == "No norm" and fields["TI hashes"] == "easynegative: c74b4e810b03, style-v2: 0123abcd4567"


def test_reads_what_a1111_writes():
    text = ("masterpiece, (a castle:1.2) <lora:add_detail:0.6>\nNegative prompt: lowres\n"
            "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: 6ce0161689, "
            'Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0')
    s = GenerationSettings.from_infotext(text)
    assert (s.prompt, s.negative_prompt, s.steps, s.sampler, s.karras) == (
        "masterpiece, (a castle:1.2)", "lowres", 30, "dpmpp_2m", True)
    assert (s.guidance_scale, s.seed, s.width, s.height, s.clip_skip) == (7.0, 42, 512, 768, 1)
    assert s.loras == (LoraRef("add_detail", 0.6, None, "7c6bad76eb54"),) and s.model_hash == "6ce0161689"
    # a tag whose LoRA is not in the hashes stays prompt text
    assert GenerationSettings.from_infotext("a <lora:x:1>\nSteps: 2, Sampler: Euler, Seed: 1").prompt == "a <lora:x:1>"


@pytest.mark.parametrize("text,message", [
    ("just a caption", "no Steps field"),
    ("a\nSteps: two, Sampler: Euler, Seed: 1", "'Steps' field does not parse"),
    ("a\nSteps: 2, Sampler: PLMS, Seed: 1", "sampler 'PLMS'"),
])
def test_bad_infotext_is_one_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings.from_infotext(text)


@pytest.mark.parametrize("change,message", [
    (dict(height=0), "height must be a positive integer"), (dict(width=-8), "width must be"),
    (dict(steps=0), "steps must be >= 1"), (dict(sampler="plms"), "unknown sampler"),
    (dict(guidance_scale=float("nan")), "finite"), (dict(guidance_rescale=1.5), "rescale must be in"),
    (dict(eta=0.5), "eta only applies to the ddim"), (dict(strength=0.0), "strength must be in"),
    (dict(num_images=0), "number of images"), (dict(clip_skip=-1), "clip skip"), (dict(step_cache=0), "step cache"),
    (dict(negative_prompt=["a", "b"]), "1 prompts but 2 negative"), (dict(seed=1.5), "seed must be an integer"),
    (dict(loras=(LoraRef("x", float("inf")),)), "finite"),
])
def test_validation_is_one_line(change, message):
    with pytest.raises(ValueError, match=message) as e:
        replace(GenerationSettings("a cat"), **change).validate()
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="multiples of 8"):
        GenerationSettings("a cat", height=36).validate(vae_factor=8)


# -- PNG round trips through the CLI: every option that changes the image ------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = write_tiny_sd_folder(root / "sd", "sd1")  # a CLIP text encoder, so clip skip applies
    Image.new("RGB", (32, 32), (200, 40, 40)).save(root / "start.png")
    return {"model": str(model), "lora": str(write_tiny_lora(model, root / "style.safetensors")),
            "lora2": str(write_tiny_lora(model, root / "other.safetensors", seed=1)), "start": str(root / "start.png")}


def ldm(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


BASE = ["--steps", 3, "--seed", 5, "--height", 32, "--width", 32, "--quiet"]
OPTIONS = {
    "negative": ["--negative", "blurry"], "steps": ["--steps", 4], "sampler": ["--sampler", "euler_ancestral"],
    "karras": ["--karras"], "eta": ["--sampler", "ddim", "--eta", 0.8], "guidance": ["--guidance", 3.5],
    "guidance_rescale": ["--guidance-rescale", 0.7], "seed": ["--seed", 6], "size": ["--height", 48, "--width", 40],
    "batch": ["--num-images", 2], "clip_skip": ["--clip-skip", 1], "step_cache": ["--step-cache", 2],
    "lora": ["--lora", "{lora}:0.7"], "two_loras": ["--lora", "{lora}:0.5", "--lora", "{lora2}:-1"],
}


@pytest.mark.parametrize("command,option", [(c, o) for c in ("generate", "img2img") for o in sorted(OPTIONS)]
                         + [("img2img", "strength")])
def test_png_reproduces_itself(assets, tmp_path, capsys, command, option):
    """Each option changes the image; `--from-png` on its PNG (with the same model and LoRA files)
    gives the same bytes; `ldm png-info` shows the option."""
    head = [command] + ([assets["start"]] if command == "img2img" else []) + ["a red circle"]
    files = []
    extra = [str(a).format(**assets) for a in OPTIONS.get(option, ["--strength", 0.6])]
    for a in extra:
        if a.startswith(str(assets["lora"])) or a.startswith(str(assets["lora2"])):
            files += ["--lora", a.rpartition(":")[0]]  # the file again, without its weight
    ldm(*head, *BASE, "--model", assets["model"], "--out", tmp_path / "plain.png")
    ldm(*head, *BASE, *extra, "--model", assets["model"], "--out", tmp_path / "made.png")
    made = sorted(tmp_path.glob("made*.png"))
    # (of a batch, the first image is the single one: the same first draws; the second differs)
    assert Image.open(made[-1]).tobytes() != Image.open(tmp_path / "plain.png").tobytes(), \
        f"{option} did not change the image, so this test could not catch it being dropped"
    for png in made:
        again = tmp_path / f"again-{png.name}"
        source = [command] + ([assets["start"]] if command == "img2img" else [])
        ldm(*source, "--from-png", png, "--model", assets["model"], *files, "--quiet", "--out", again)
        assert again.read_bytes() == png.read_bytes()
    capsys.readouterr()
    ldm("png-info", made[-1])
    info = json.loads(capsys.readouterr().out)
    expected = {"negative": ("negative_prompt", "blurry"), "steps": ("steps", 4), "karras": ("karras", True),
                "eta": ("eta", 0.8), "guidance": ("guidance_scale", 3.5), "guidance_rescale": ("guidance_rescale", 0.7),
                "seed": ("seed", 6), "size": ("width", 40), "batch": ("batch_pos", 1), "clip_skip": ("clip_skip", 1),
                "step_cache": ("step_cache", 2), "strength": ("strength", 0.6), "sampler": ("sampler", "euler_ancestral")}
    if option in expected:
        key, value = expected[option]
        assert info[key] == value
    else:
        assert [(lora["name"], lora["weight"]) for lora in info["loras"]] == {
            "lora": [("style", 0.7)], "two_loras": [("style", 0.5), ("other", -1.0)]}[option]


def test_from_png_overrides_and_mismatch_warnings(assets, tmp_path, capsys):
    made = tmp_path / "made.png"
    ldm("generate", "a red circle", *BASE, "--model", assets["model"], "--lora", f"{assets['lora']}:0.7",
        "--out", made)
    capsys.readouterr()
    # an override changes only what it names
    ldm("generate", "--from-png", made, "--model", assets["model"], "--lora", assets["lora"], "--seed", 9,
        "--out", tmp_path / "seed9.png", "--quiet")
    s = GenerationSettings.from_infotext(read_parameters(tmp_path / "seed9.png"))
    assert s.seed == 9 and s.steps == 3 and s.loras[0].weight == 0.7
    # another LoRA file under the PNG's name: a one-line warning, and the image is still made
    other = tmp_path / "style.safetensors"
    other.write_bytes(open(assets["lora2"], "rb").read())
    capsys.readouterr()
    ldm("generate", "--from-png", made, "--model", assets["model"], "--lora", other, "--out", tmp_path / "w.png")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "LoRA" in err and "is not the PNG's" in err
    # a PNG that names a LoRA not given: one error line
    code = main(["generate", "--from-png", str(made), "--model", assets["model"], "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "style" in err
    # another model than the PNG's: a warning naming both hashes
    other_model = write_tiny_sd_folder(tmp_path / "other", "sd2")
    ldm("generate", "--from-png", made, "--model", other_model, "--lora", assets["lora"], "--out", tmp_path / "m.png")
    err = capsys.readouterr().err
    assert "warning:" in err and "model hash" in err
    # an image without parameters, and an img2img PNG given to generate
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    for argv, message in ((["generate", "--from-png", tmp_path / "bare.png"], "no generation parameters"),
                          (["png-info", tmp_path / "nope.png"], "no such image file")):
        assert main([str(a) for a in argv]) == 2
        assert message in capsys.readouterr().err


def test_infotext_edge_cases_read_back():
    # clip skip 0 is written: on a model loaded with a clip skip it is not the default
    s = GenerationSettings("a", seed=1, karras=False, clip_skip=0)
    assert "Clip skip: 1" in s.to_infotext() and GenerationSettings.from_infotext(s.to_infotext()) == s
    # Windows line ends and a trailing newline, as other tools write them
    text = "a cat\r\nNegative prompt: dog\r\nSteps: 2, Sampler: Euler, Seed: 1, Size: 8x8\n"
    read = GenerationSettings.from_infotext(text)
    assert (read.prompt, read.negative_prompt, read.steps) == ("a cat", "dog", 2)
    # A1111 tags inside the prompt are cut out as A1111 does; hashes naming no tag are an error
    text = 'a <lora:x:0.5> castle\nSteps: 2, Sampler: Euler, Seed: 1, Lora hashes: "x: aa"'
    assert GenerationSettings.from_infotext(text).loras == (LoraRef("x", 0.5, None, "aa"),)
    with pytest.raises(ValueError, match="Lora hashes name y"):
        GenerationSettings.from_infotext('a\nSteps: 2, Sampler: Euler, Seed: 1, Lora hashes: "y: bb"')
    with pytest.raises(ValueError, match="'Size' field does not parse"):
        GenerationSettings.from_infotext("a\nSteps: 2, Sampler: Euler, Size: 512")


@pytest.mark.parametrize("settings,message", [
    (GenerationSettings("a", loras=(LoraRef("style, v2", 1.0),)), "cannot be written"),
    (GenerationSettings("a", loras=(LoraRef("a:b", 1.0),)), "cannot be written"),
    (GenerationSettings("a", loras=(LoraRef("s", 1.0), LoraRef("s", 0.5))), "same name"),
    (GenerationSettings("a", num_images=3, batch_pos=7), "batch position must be in"),
])
def test_settings_a_png_could_not_hold_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        settings.validate()


def test_keyword_api_reads_what_it_always_read(assets, tmp_path):
    """numpy/torch integers, a numeric seed string and a 0 size (= the default) keep working in pipe()."""
    import numpy as np
    import torch

    from ldm.pipeline import Pipeline
    from ldm.settings import lora_hash

    pipe = Pipeline.from_pretrained(assets["model"])
    pipe.progress = False
    want = pipe("a cat", num_inference_steps=2, seed=3, output_type="latent").images
    got = pipe("a cat", num_inference_steps=np.int64(2), seed=torch.tensor(3), height=0, width=0,
               num_images_per_prompt=np.int32(1), output_type="latent")
    assert torch.equal(got.images, want) and pipe("a cat", num_inference_steps=2, seed="3").seed == 3
    # a LoRA given without its hash gets one, so that its PNG can be checked when read back
    result = pipe.generate(GenerationSettings("a cat", steps=2, seed=3, loras=(LoraRef("style", 0.5, assets["lora"]),)))
    assert result.settings.loras[0].hash == lora_hash(assets["lora"])
    assert GenerationSettings.from_infotext(result.settings.to_infotext()).loras[0].hash == lora_hash(assets["lora"])


def test_two_lora_files_with_one_name_are_refused(assets, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    copy = tmp_path / "sub" / "style.safetensors"
    copy.write_bytes(open(assets["lora"], "rb").read())
    code = main(["generate", "a", "--model", assets["model"], "--lora", assets["lora"], "--lora", str(copy),
                 "--steps", "2", "--quiet", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "same name" in capsys.readouterr().err
