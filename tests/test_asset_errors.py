"""Bad community assets: one `error:` line and a non-zero exit, and nothing left half-applied."""
from __future__ import annotations

import pytest
import torch
from tiny import write_tiny_lora, write_tiny_sd_folder

from ldm.cli import main
from ldm.io.weights import CheckpointError, write_safetensors


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_sd_folder(tmp_path_factory.mktemp("bad") / "sd")


def sdxl_lora(path):
    """kohya keys of an SDXL LoRA: the second text encoder (1280 wide) and an SGM-named U-Net block."""
    g = torch.Generator().manual_seed(0)
    write_safetensors(path, {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 1280, generator=g),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 4, generator=g),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 640, generator=g),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(640, 4, generator=g),
    })
    return path


def one_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def generate(model, tmp_path):
    return ["generate", "a cat", "--model", model, "--steps", 1, "--height", 32, "--width", 32, "--quiet",
            "--out", tmp_path / "o.png"]


def test_corrupt_lora(generate, tmp_path, capsys):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "not a readable safetensors file" in one_error(capsys, [*generate, "--lora", tmp_path / "broken.safetensors"])
    assert not (tmp_path / "o.png").exists()


def test_sdxl_lora_on_sd1_model(generate, tmp_path, capsys):
    message = one_error(capsys, [*generate, "--lora", sdxl_lora(tmp_path / "xl.safetensors")])
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in message and "text encoder 2" in message


def test_failed_lora_leaves_the_model_as_it_was(model, tmp_path):
    from ldm import GenerationSettings, Pipeline
    from ldm.settings import LoraRef

    pipe = Pipeline.from_pretrained(model)
    pipe.progress = False
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in pipe.lora_targets().items()}
    good = LoraRef.from_file(write_tiny_lora(model, tmp_path / "good.safetensors"), 1.0)
    bad = LoraRef.from_file(sdxl_lora(tmp_path / "xl.safetensors"), 1.0)
    with pytest.raises(CheckpointError, match="text encoder 2"):
        pipe.generate(GenerationSettings("a cat", steps=1, width=32, height=32, loras=(good, bad)))
    for c, m in pipe.lora_targets().items():
        assert all(torch.equal(v, before[c][k]) for k, v in m.state_dict().items())


def test_embedding_of_the_wrong_width(generate, tmp_path, capsys):
    folder = tmp_path / "emb"
    folder.mkdir()
    write_safetensors(folder / "wide.safetensors", {"emb_params": torch.zeros(2, 768)})
    message = one_error(capsys, [generate[0], "a wide cat", *generate[2:], "--embeddings-dir", folder])
    assert "embedding 'wide'" in message and "32 wide" in message


def test_missing_lora_tag(generate, tmp_path, capsys):
    (tmp_path / "loras").mkdir()
    tagged = [generate[0], "a cat <lora:missing:1>", *generate[2:]]
    assert "no missing.safetensors in" in one_error(capsys, [*tagged, "--lora-dir", tmp_path / "loras"])
    assert "no LoRA folder" in one_error(capsys, tagged)
    assert "does not exist" in one_error(capsys, [*tagged, "--lora-dir", tmp_path / "nowhere"])


class NotData:
    """Stands for any object a pickle could name: the restricted unpickler must refuse to build it."""


def test_embedding_pickle_that_names_a_class_is_refused(generate, tmp_path, capsys):
    folder = tmp_path / "emb"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "payload": NotData()}, folder / "evil.pt")
    message = one_error(capsys, [generate[0], "an evil cat", *generate[2:], "--embeddings-dir", folder])
    assert "evil.pt: refused or unreadable embedding file" in message


def test_prompt_lora_tag_forms():
    from ldm.settings import split_lora_tags

    assert split_lora_tags("a cat") == ("a cat", [])
    assert split_lora_tags("a <lora:x> cat <lora:y:0.5>") == ("a  cat", [("x", 1.0), ("y", 0.5)])
    with pytest.raises(ValueError, match="separate text-encoder and U-Net weights"):
        split_lora_tags("<lora:x:0.5:1>")
    with pytest.raises(ValueError, match="no numeric weight"):
        split_lora_tags("<lora:x:strong>")
