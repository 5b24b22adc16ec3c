"""The `ldm` command: outputs, PNG parameters, and one-line errors for bad input."""
import subprocess
import sys

import pytest
from PIL import Image

from ldm.cli import main
from ldm.io.png_info import read_parameters
from tiny import write_tiny_lora, write_tiny_sd_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_tiny_sd_folder(tmp_path_factory.mktemp("sd"), "sd1"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_png_with_a1111_parameters(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    code, stdout, _ = run(capsys, "generate", "a red circle", "--model", model, "--negative", "blurry", "--steps", 3,
                          "--guidance", 5, "--seed", 7, "--height", 32, "--width", 48, "--sampler", "euler",
                          "--karras", "--out", out, "--quiet")
    assert code == 0 and stdout.split() == [str(out)]
    assert Image.open(out).size == (48, 32)
    lines = read_parameters(out).splitlines()
    assert lines[0] == "a red circle" and lines[1] == "Negative prompt: blurry"
    fields = dict(f.split(": ", 1) for f in lines[2].split(", "))
    assert fields["Steps"] == "3" and fields["Sampler"] == "Euler" and fields["Schedule type"] == "Karras"
    assert fields["CFG scale"] == "5" and fields["Seed"] == "7" and fields["Size"] == "48x32"
    assert len(fields["Model hash"]) == 10


def test_same_settings_same_png_and_numbered_outputs(model, tmp_path, capsys):
    args = ["generate", "a cat", "--model", model, "--steps", 2, "--seed", 3, "--height", 32, "--width", 32, "--quiet"]
    run(capsys, *args, "--out", tmp_path / "x.png")
    run(capsys, *args, "--out", tmp_path / "y.png")
    assert (tmp_path / "x.png").read_bytes() == (tmp_path / "y.png").read_bytes()
    code, stdout, _ = run(capsys, *args, "--num-images", 2, "--out", tmp_path / "b.png")
    assert code == 0 and stdout.split() == [str(tmp_path / "b-0.png"), str(tmp_path / "b-1.png")]
    assert "Batch pos: 1" in read_parameters(tmp_path / "b-1.png")


def test_img2img_reports_steps_run(model, tmp_path, capsys):
    Image.new("RGB", (32, 32), (220, 40, 40)).save(tmp_path / "in.png")
    code, stdout, err = run(capsys, "img2img", tmp_path / "in.png", "a blue circle", "--model", model, "--strength",
                            0.5, "--steps", 4, "--seed", 1, "--out", tmp_path / "o.png", "--quiet")
    assert code == 0 and "ran 2 of 4 steps" in err
    assert "Denoising strength: 0.5" in read_parameters(tmp_path / "o.png")


def test_convert_both_ways(model, tmp_path, capsys):
    assert run(capsys, "convert", model, tmp_path / "m.safetensors")[0] == 0
    assert run(capsys, "convert", tmp_path / "m.safetensors", tmp_path / "folder")[0] == 0
    assert (tmp_path / "folder" / "model_index.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--height", "31", "--width", "32"], "multiples of 2"),
    (["generate", "x", "--steps", "0"], "steps must be >= 1"),
    (["generate", "x", "--guidance", "nan"], "finite"),
    (["generate", "x", "--guidance", "inf"], "finite"),
    (["generate", "x", "--sampler", "plms"], "unknown sampler"),
    (["generate", "x", "--winograd", "--winograd-transient"], "not allowed with argument"),
    (["img2img", "MISSING.png", "x", "--strength", "0.5"], "no such image"),
    (["img2img", "BAD.png", "x"], "not a readable image"),
    (["img2img", "GOOD.png", "x", "--strength", "1.5"], "strength must be in"),
    (["img2img", "GOOD.png", "x", "--strength", "0"], "strength must be in"),
])
def test_bad_input_is_one_line_and_nonzero(model, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD.png").write_bytes(b"not a png at all")
    Image.new("RGB", (32, 32)).save(tmp_path / "GOOD.png")
    code, _, err = run(capsys, *argv, "--model", model, "--quiet")
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_missing_model_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", "--model", tmp_path / "nope")
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.slow
def test_console_script_bad_input_has_no_traceback(model, tmp_path):
    """The installed entry point, as a user runs it: exit status and stderr only."""
    proc = subprocess.run([sys.executable, "-m", "ldm.cli", "generate", "x", "--model", model, "--steps", "-1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "steps must be >= 1" in proc.stderr


def test_generate_with_lora_file_and_scale(model, tmp_path, capsys):
    """--lora FILE:SCALE merges the adapter: scale 0 is the plain model, scale 1 changes the image."""
    import numpy as np

    lora = write_tiny_lora(model, tmp_path / "style.safetensors")
    args = ["generate", "a cat", "--model", model, "--steps", 2, "--seed", 3, "--height", 32, "--width", 32, "--quiet"]
    pixels = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{lora}:0"]), ("full", ["--lora", str(lora)])):
        assert run(capsys, *args, *extra, "--out", tmp_path / f"{name}.png")[0] == 0
        pixels[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(pixels["plain"], pixels["zero"])
    assert not np.array_equal(pixels["plain"], pixels["full"])
    code, _, err = run(capsys, *args, "--lora", tmp_path / "missing.safetensors")
    assert code != 0 and err.startswith("error: ")


def test_speed_flags_keep_the_image(model, tmp_path, capsys):
    """Exact options (fused QKV, channels_last, VAE slicing) change pixels by at most one level;
    the step cache is opt-in because it changes the output, and still writes an image."""
    import numpy as np

    args = ["generate", "a cat", "--model", model, "--steps", 3, "--seed", 2, "--height", 32, "--width", 32, "--quiet"]
    assert run(capsys, *args, "--out", tmp_path / "plain.png")[0] == 0
    assert run(capsys, *args, "--fuse-qkv", "--channels-last", "--vae-slicing", "--winograd-transient", "--im2col",
               "--out", tmp_path / "fast.png")[0] == 0
    assert run(capsys, *args, "--step-cache", 2, "--out", tmp_path / "cached.png")[0] == 0
    plain, fast = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("plain", "fast"))
    assert np.abs(plain - fast).max() <= 1
    assert Image.open(tmp_path / "cached.png").size == (32, 32)


def test_eval_shapes_reports_scores_and_its_settings(model, capsys):
    """`ldm eval shapes` on a tiny random model: the JSON has every category, counts that add up, and
    the settings it ran with; a bad guidance rescale is one line and a non-zero exit."""
    import json

    code, out, _ = run(capsys, "eval", "shapes", "--model", model, "--n", 2, "--steps", 2, "--guidance-rescale", 0.7,
                       "--quiet")
    assert code == 0
    scores = json.loads(out)
    for category in ("single_object", "two_object", "held_out", "img2img"):
        counts = scores["counts"][category]
        assert counts["total"] == 2 and scores[category] == counts["correct"] / 2
    assert scores["guidance_rescale"] == 0.7 and scores["steps"] == 2 and scores["sampler"] == "dpmpp_2m"
    code, _, err = run(capsys, "eval", "shapes", "--model", model, "--n", 1, "--steps", 2, "--guidance-rescale", 2,
                       "--quiet")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "guidance rescale" in err


def test_data_shapes_writes_edit_pairs_and_refuses_a_negative_count(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "shapes", "--out", tmp_path / "d", "--n", 2, "--edit-pairs", 3)
    assert code == 0 and out.strip() == str(tmp_path / "d")
    rows = (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 5 and sum('"source_file_name"' in r for r in rows) == 3
    code, _, err = run(capsys, "data", "shapes", "--out", tmp_path / "e", "--n", 2, "--edit-pairs", -1)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "--edit-pairs" in err
    assert not (tmp_path / "e").exists()  # refused before anything is written
