"""The embedded default model: present in the package, loads offline, and draws what it is asked.

These run the real shipped weights (a few seconds on CPU): a prompt's colour and shape are read
back from the pixels with the shapes evaluator.
"""
from pathlib import Path

import numpy as np
import pytest

from ldm.cli import main
from ldm.shapes.default_model import default_model_path
from ldm.pipeline import Pipeline
from ldm.shapes.dataset import ShapeObject
from ldm.shapes.evaluate import detect_objects


@pytest.fixture(scope="module")
def pipe():
    p = Pipeline.from_pretrained(None)
    p.progress = False
    return p


def test_shipped_weights_are_small_and_text_encoder_comes_from_its_package():
    root = default_model_path()
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size < 50 * 2**20
    assert not list((root / "text_encoder").glob("*.safetensors"))


@pytest.mark.parametrize("colour,shape", [("red", "circle"), ("blue", "square"), ("yellow", "triangle")])
def test_generates_the_prompted_object(pipe, colour, shape):
    hits = 0
    for seed in range(4):
        image = pipe(f"a large {colour} {shape}", seed=seed, output_type="np").images[0]
        found = detect_objects(image)
        hits += any(o.colour == colour and o.shape == shape for o in found)
    assert hits >= 3, f"only {hits}/4 images showed a {colour} {shape}"


def test_readme_first_command_writes_an_image(tmp_path, capsys):
    out = tmp_path / "circle.png"
    assert main(["generate", "a red circle to the left of a blue square", "--out", str(out), "--quiet"]) == 0
    from PIL import Image
    with Image.open(out) as png:
        image = np.asarray(png.convert("RGB"))
        assert "Seed: " in png.info["parameters"]  # no --seed: a fresh one, recorded for reproduction
    assert image.shape == (64, 64, 3)


def test_readme_prompt_draws_both_colours(pipe):
    # the README command draws with a fresh seed each time, so its content is checked on fixed seeds;
    # the colour-shape binding of this prompt is the model's known failure (MODEL_CARD.md), so only
    # the colours are asserted
    hits = 0
    for seed in range(4):
        image = pipe("a red circle to the left of a blue square", seed=seed, output_type="np").images[0]
        hits += {"red", "blue"} <= {o.colour for o in detect_objects(image)}
    assert hits >= 3, f"only {hits}/4 images showed both a red and a blue object"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block, on the embedded default model, as a user would paste it."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert 'from_pretrained("path/to/sd15")' in block
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(block.replace('"path/to/sd15"', "None"), env)  # noqa: S102 - our own README
    assert (tmp_path / "out.png").is_file() and env["variation"].steps_run >= 1
    assert "Sampler: Euler, Schedule type: Karras" in env["again"].settings.to_infotext()
