"""`ldm finetune`, full and LoRA; the LoRA file format against diffusers' loader.

Tolerance for the diffusers comparison: 1e-5 max abs on U-Net outputs (fp32, same math, op order
may differ).
"""
from __future__ import annotations

import json

import pytest
import torch

from test_train_common import shapes, tiny_sd

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def finetune(out, *extra: str) -> int:
    from ldm.train.commands import main

    return main(["finetune", "--model", str(tiny_sd()), "--data", str(shapes(8, 32)), "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--set", "train.progress=false", *extra])


def test_lora_finetune_writes_small_file_and_merged_model(tmp_path):
    from safetensors import safe_open

    from ldm.io.model_files import load_model
    from ldm.io.lora import apply_lora

    out = tmp_path / "lora-run"
    assert finetune(out, "--lora", "--rank", "2", "--learning-rate", "0.01") == 0
    lora_file = out / "lora.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        meta = json.loads(f.metadata()["ldm.lora"])
        keys = list(f.keys())
    assert meta["rank"] == 2 and meta["alpha"] == 2.0
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert {k.split(".")[-3] for k in keys} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert lora_file.stat().st_size < (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 10
    # the model folder holds the base U-Net with the LoRA merged in; nothing else changed
    base, tuned = load_model(tiny_sd()), load_model(out)
    original = {k: v.clone() for k, v in base.unet.state_dict().items()}
    assert apply_lora(base.unet, lora_file, 1.0) == len(keys) // 2
    for k, v in tuned.unet.state_dict().items():
        assert torch.allclose(v, base.unet.state_dict()[k], atol=1e-6), k
    # training did move the adapted layers, and only those
    moved = {k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, original[k])}
    assert moved and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in moved)
    for k, v in tuned.vae.state_dict().items():
        assert torch.equal(v, base.vae.state_dict()[k]), k


def test_full_finetune_changes_the_unet_only(tmp_path):
    from ldm.io.model_files import load_model

    out = tmp_path / "full-run"
    assert finetune(out, "--learning-rate", "0.001") == 0
    base, tuned = load_model(tiny_sd()), load_model(out)
    assert not (out / "lora.safetensors").exists()
    diffs = [not torch.equal(v, base.unet.state_dict()[k]) for k, v in tuned.unet.state_dict().items()]
    assert sum(diffs) > len(diffs) // 2
    text = tuned.text_encoder.encode(["a red circle"]).states
    assert torch.equal(text, base.text_encoder.encode(["a red circle"]).states)
    assert tuned.schedule == base.schedule


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_lora_file_matches_diffusers_loader(tmp_path, scale):
    """A LoRA with large random weights and alpha != rank: diffusers' load_lora_weights + fuse and our
    apply_lora give the same U-Net."""
    from diffusers import StableDiffusionPipeline

    from ldm.io.model_files import load_model
    from ldm.train.config import LoraConfig
    from ldm.io.lora import apply_lora
    from ldm.train.lora import add_lora, save_lora

    cfg = LoraConfig(rank=4, alpha=8.0)
    peft_unet = load_model(tiny_sd()).unet
    add_lora(peft_unet, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = save_lora(peft_unet, tmp_path / "l.safetensors", cfg)

    ours = load_model(tiny_sd()).unet
    apply_lora(ours, path, scale)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd()), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path), weight_name="l.safetensors")
    pipe.fuse_lora(lora_scale=scale)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx).sample
        got = ours(x, t, ctx)
        unmerged = load_model(tiny_sd()).unet(x, t, ctx)
    assert (got - ref).abs().max().item() <= TOL
    assert (unmerged - ref).abs().max().item() > 100 * TOL  # the LoRA really changes the output


def test_apply_lora_refuses_mismatched_files(tmp_path):
    from ldm.io.model_files import load_model
    from ldm.io.lora import apply_lora
    from ldm.io.weights import CheckpointError, write_safetensors

    unet = load_model(tiny_sd()).unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    write_safetensors(tmp_path / "wrong.safetensors", {f"unet.{name}.lora_A.weight": torch.zeros(2, 99),
                                                       f"unet.{name}.lora_B.weight": torch.zeros(32, 2)})
    with pytest.raises(CheckpointError, match=f"'{name}' maps 99 -> 32 features, the layer maps 32 -> 32"):
        apply_lora(unet, tmp_path / "wrong.safetensors")
    write_safetensors(tmp_path / "other.safetensors", {"some.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected key 'some.weight'"):
        apply_lora(unet, tmp_path / "other.safetensors")
    write_safetensors(tmp_path / "missing.safetensors", {"unet.nope.lora_A.weight": torch.zeros(2, 4),
                                                         "unet.nope.lora_B.weight": torch.zeros(4, 2)})
    with pytest.raises(CheckpointError, match="none of its 1 LoRA layers matches"):
        apply_lora(unet, tmp_path / "missing.safetensors")


def test_kohya_format_finetune_loads_in_diffusers_with_the_same_image(tmp_path):
    """`--lora-format kohya` writes kohya's keys, alpha and ss_* metadata; diffusers' load_lora_weights
    reads the file and draws ldm's image (within 2/255)."""
    import diffusers
    import numpy as np
    from safetensors import safe_open

    from ldm import GenerationSettings, Pipeline
    from ldm.settings import LoraRef

    out = tmp_path / "kohya-run"
    assert finetune(out, "--lora", "--rank", "2", "--learning-rate", "0.05", "--lora-format", "kohya") == 0
    lora_file = out / "lora.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_module"] == "networks.lora"
    assert keys and all(k.startswith("lora_unet_") and k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight",
                                                                                "alpha") for k in keys)
    pipe = Pipeline.from_pretrained(tiny_sd())
    pipe.progress = False
    s = GenerationSettings("a red circle", steps=3, seed=2, sampler="euler", karras=False, guidance_scale=5,
                           width=32, height=32, loras=(LoraRef.from_file(lora_file),))
    got = pipe.generate(s, output_type="np").images[0]
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd()), safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=5, height=32, width=32, output_type="np")
    plain = ref("a red circle", generator=torch.Generator().manual_seed(2), **kw).images[0]
    ref.load_lora_weights(str(out), weight_name="lora.safetensors")
    want = ref("a red circle", generator=torch.Generator().manual_seed(2), **kw).images[0]
    assert np.abs(got - want).max() <= 2 / 255
    assert np.abs(plain - want).max() > 1e-3  # the trained adapters do change the image
