"""Textual-inversion embeddings in A1111's, kohya's and diffusers' formats against diffusers'
load_textual_inversion, in the prompt and in the negative prompt; the folder option and TI hashes."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import write_tiny_sd_folder

from ldm.io.embeddings import read_embedding
from ldm.io.png_info import read_parameters
from ldm.io.weights import write_safetensors
from ldm.settings import GenerationSettings
from ldm.text import load_text_encoder_from_folder

TOL = 1e-5
VECTORS = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))  # three tokens wide


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_sd_folder(tmp_path_factory.mktemp("ti") / "sd")


def write_formats(folder) -> dict[str, object]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": VECTORS.clone()}, "name": "zqx",
                "step": 500, "sd_checkpoint": "abcdef", "sd_checkpoint_name": "v1-5"}, folder / "a1111.pt")
    write_safetensors(folder / "kohya.safetensors", {"emb_params": VECTORS.clone()})
    write_safetensors(folder / "learned_embeds.safetensors", {"<zqx>": VECTORS.clone()})
    return {"a1111": folder / "a1111.pt", "kohya": folder / "kohya.safetensors",
            "diffusers": folder / "learned_embeds.safetensors"}


@pytest.mark.parametrize("fmt", ["a1111", "kohya", "diffusers"])
def test_embedding_matches_diffusers_load_textual_inversion(model, tmp_path, fmt):
    from diffusers import StableDiffusionPipeline

    path = write_formats(tmp_path)[fmt]
    assert torch.equal(read_embedding(path).for_encoder(), VECTORS)
    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token="zqx")
    prompt, negative = "a zqx cat on a mat", "blurry zqx"
    # (encode_prompt itself writes a multi-vector token out as "zqx zqx_1 zqx_2")
    assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer) == "a zqx zqx_1 zqx_2 cat on a mat"
    want, want_neg = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
    clip = load_text_encoder_from_folder(model, json.loads((model / "model_index.json").read_text()))
    table = {"zqx": read_embedding(path).for_encoder()}
    got = clip.encode([prompt], emphasis="original", embeddings=table).states
    got_neg = clip.encode([negative], emphasis="original", embeddings=table).states
    assert (got - want).abs().max().item() <= TOL and (got_neg - want_neg).abs().max().item() <= TOL
    plain = clip.encode([prompt]).states
    assert (plain - want).abs().max().item() > 1e-3  # the embedding does change the encoding


def test_embedding_is_weighted_and_never_split_across_chunks(model):
    clip = load_text_encoder_from_folder(model, json.loads((model / "model_index.json").read_text()))
    table = {"zqx": VECTORS}
    # 73 letters leave room for 2 tokens in the first chunk: the 3 vectors go to the second whole
    letters = " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(73))
    chunks = clip.prompt_chunks(letters + " zqx", "original", clip.trigger_table(table))
    assert [len(c.tokens) for c in chunks] == [73, 3] and chunks[1].fixes[0][0] == 0
    weighted = clip.prompt_chunks("(zqx:1.3) cat", "original", clip.trigger_table(table))[0]
    assert weighted.weights[:3] == [1.3] * 3


def test_embeddings_dir_triggers_by_stem_and_records_ti_hashes(model, tmp_path, capsys):
    from ldm.cli import main

    folder = tmp_path / "embeddings"
    folder.mkdir()
    write_safetensors(folder / "zqx.safetensors", {"emb_params": VECTORS.clone()})
    write_safetensors(folder / "unused.safetensors", {"emb_params": VECTORS.clone() * 2})
    args = ["generate", "a zqx cat", "--negative", "blurry", "--model", str(model), "--steps", "2", "--seed", "1",
            "--height", "32", "--width", "32", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "--embeddings-dir", str(folder), "--out", str(tmp_path / "ti.png")]) == 0
    text = read_parameters(tmp_path / "ti.png")
    digest = read_embedding(folder / "zqx.safetensors").hash
    assert f'TI hashes: "zqx: {digest}"' in text and "unused" not in text
    assert (tmp_path / "ti.png").read_bytes() != (tmp_path / "plain.png").read_bytes()
    assert GenerationSettings.from_infotext(text).embeddings[0].hash == digest
    # the PNG gives its image back with the same folder (from the environment this time)
    import os
    os.environ["LDM_EMBEDDINGS_DIR"] = str(folder)
    try:
        assert main(["generate", "--from-png", str(tmp_path / "ti.png"), "--model", str(model), "--quiet",
                     "--out", str(tmp_path / "again.png")]) == 0
    finally:
        del os.environ["LDM_EMBEDDINGS_DIR"]
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "ti.png").read_bytes()
    # the negative prompt triggers it too
    assert main([args[0], "a cat", "--negative", "zqx", *args[4:], "--embeddings-dir", str(folder),
                 "--out", str(tmp_path / "neg.png")]) == 0
    assert "TI hashes" in read_parameters(tmp_path / "neg.png")
