"""LoRA layouts: kohya (U-Net + text encoder) against diffusers' load_lora_weights, LyCORIS LoCon/LoHa/LoKr
against their delta formulas merged by hand, older diffusers keys, several LoRAs, exact restore."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import write_tiny_sd_folder

from ldm.cli import main
from ldm.io.lora import apply_lora, loras_merged
from ldm.io.model_files import load_model
from ldm.io.weights import CheckpointError, read_safetensors, write_safetensors

PIXEL_TOL = 2 / 255 + 0.5 / 255  # the usual bound, plus the PNG's rounding to 8 bits
TOL = 1e-6
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TE_Q = "encoder.layers.0.self_attn.q_proj"


def kohya(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_sd_folder(tmp_path_factory.mktemp("lora") / "sd")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def kohya_file(model, tmp_path_factory):
    """A U-Net (attention and resnet convs) + text-encoder LoRA trained-looking with peft, converted with
    diffusers' convert_state_dict_to_kohya; alpha set to half the rank so that the scale matters."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from ldm.text import load_text_encoder_from_folder  # noqa: F401  (the same CLIP diffusers loads)
    from transformers import CLIPTextModel

    unet = load_model(model).unet
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                           "conv1", "conv2"]), unet)
    te = CLIPTextModel.from_pretrained(model / "text_encoder")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), te)
    _randomize(unet, 0)
    _randomize(te, 1)
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    # kohya's names carry transformers' `text_model.` level (transformers 5 dropped it from the module)
    state.update({f"text_encoder.text_model.{k}": v for k, v in get_peft_model_state_dict(te).items()})
    converted = convert_state_dict_to_kohya(state)
    converted = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v.contiguous()) for k, v in converted.items()}
    assert any(k.startswith("lora_te1_text_model_") for k in converted) and any(".alpha" in k for k in converted)
    folder = tmp_path_factory.mktemp("loras")
    write_safetensors(folder / "f.safetensors", converted)
    return folder / "f.safetensors"


def _cli_image(model, tmp_path, name, *extra) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    code = main(["generate", "a red cat", "--model", str(model), "--steps", "3", "--sampler", "euler", "--no-karras",
                 "--guidance", "5", "--seed", "1", "--height", "32", "--width", "32", "--quiet", "--out", str(out),
                 *map(str, extra)])
    assert code == 0
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255


def test_kohya_lora_matches_diffusers_load_lora_weights(model, kohya_file, tmp_path):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a red cat", num_inference_steps=3, guidance_scale=5, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(1)).images[0]
    pipe.load_lora_weights(str(kohya_file.parent), weight_name=kohya_file.name)
    pipe.fuse_lora(lora_scale=0.8)
    want = pipe("a red cat", num_inference_steps=3, guidance_scale=5, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(1)).images[0]
    got = _cli_image(model, tmp_path, "file", "--lora", f"{kohya_file}:0.8")
    assert np.abs(got - want).max() <= PIXEL_TOL
    assert np.abs(plain - want).max() > 10 * PIXEL_TOL  # the LoRA does change the image
    # the same through the prompt tag and the LoRA folder: the same PNG, tag and hash recorded
    tagged = _cli_image(model, tmp_path, "tag", "--lora-dir", kohya_file.parent)
    assert np.abs(tagged - _cli_image(model, tmp_path, "plain")).max() == 0  # no tag: the plain model
    code = main(["generate", "a red cat <lora:f:0.8>", "--model", str(model), "--steps", "3", "--sampler", "euler",
                 "--no-karras", "--guidance", "5", "--seed", "1", "--height", "32", "--width", "32", "--quiet",
                 "--out", str(tmp_path / "t.png"), "--lora-dir", str(kohya_file.parent)])
    assert code == 0 and (tmp_path / "t.png").read_bytes() == (tmp_path / "file.png").read_bytes()


def test_kohya_lora_changes_unet_and_text_encoder_and_restores_bit_for_bit(model, kohya_file):
    parts = load_model(model)
    targets = {"unet": parts.unet, "text_encoder": parts.text_encoder.model}
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in targets.items()}
    layers = sum(1 for k in read_safetensors(kohya_file)[0] if k.endswith("lora_down.weight"))
    with loras_merged(targets, [(kohya_file, 0.8)]):
        changed = {c: {k for k, v in m.state_dict().items() if not torch.equal(v, before[c][k])}
                   for c, m in targets.items()}
        first = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in targets.items()}
    assert len(changed["unet"]) + len(changed["text_encoder"]) == layers
    assert f"{CONV}.weight" in changed["unet"] and f"{TE_Q}.weight" in changed["text_encoder"]
    for c, m in targets.items():
        assert all(torch.equal(v, before[c][k]) for k, v in m.state_dict().items())
    with loras_merged(targets, [(kohya_file, 0.8)]):  # again: the same merged bits
        for c, m in targets.items():
            assert all(torch.equal(v, first[c][k]) for k, v in m.state_dict().items())


def _merged(model, state: dict[str, torch.Tensor], scale: float, tmp_path, name="l") -> dict[str, torch.Tensor]:
    write_safetensors(tmp_path / f"{name}.safetensors", {k: v.clone() for k, v in state.items()})
    unet = load_model(model).unet
    apply_lora(unet, tmp_path / f"{name}.safetensors", scale)
    return {k: v for k, v in unet.state_dict().items()}


def _base(model) -> dict[str, torch.Tensor]:
    return load_model(model).unet.state_dict()


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))) * 0.1


def test_locon_loha_lokr_equal_their_formulas_merged_by_hand(model, tmp_path):
    base = _base(model)
    wq, wc = base[f"{TO_Q}.weight"], base[f"{CONV}.weight"]  # [32, 32], [32, 32, 3, 3]
    out, cin = wc.shape[:2]
    r, scale = 4, 0.7
    cases = {}
    # LoCon: a 3x3 down and 1x1 up on the conv; the linear as plain LoRA; alpha 2 -> x2/4
    d, u, dq, uq = _r(r, cin, 3, 3), _r(out, r, 1, 1), _r(r, 32), _r(32, r)
    cases["locon"] = ({f"{kohya(CONV)}.lora_down.weight": d, f"{kohya(CONV)}.lora_up.weight": u,
                       f"{kohya(CONV)}.alpha": torch.tensor(2.0), f"{kohya(TO_Q)}.lora_down.weight": dq,
                       f"{kohya(TO_Q)}.lora_up.weight": uq, f"{kohya(TO_Q)}.alpha": torch.tensor(2.0)},
                      {CONV: 0.5 * torch.einsum("or,rikl->oikl", u[:, :, 0, 0], d), TO_Q: 0.5 * uq @ dq})
    # LoCon with the Tucker core lora_mid (no alpha: scale 1)
    mid, d1, u1 = _r(r, r, 3, 3), _r(r, cin, 1, 1), _r(out, r, 1, 1)
    cases["locon_tucker"] = ({f"{kohya(CONV)}.lora_down.weight": d1, f"{kohya(CONV)}.lora_up.weight": u1,
                              f"{kohya(CONV)}.lora_mid.weight": mid},
                             {CONV: torch.einsum("nmkl,on,mi->oikl", mid, u1[:, :, 0, 0], d1[:, :, 0, 0])})
    # LoHa: Hadamard product of two low-rank products; conv flattened, and the Tucker form
    a1, b1, a2, b2 = _r(32, r), _r(r, 32, seed=1), _r(32, r, seed=2), _r(r, 32, seed=3)
    # (Tucker: six small factors multiply, so larger ones keep the change well above float noise)
    t1, t2 = _r(r, r, 3, 3, seed=4) * 2, _r(r, r, 3, 3, seed=5) * 2
    ta1, tb1, ta2, tb2 = (_r(r, n, seed=s) * 2 for n, s in ((out, 6), (cin, 7), (out, 8), (cin, 9)))
    cases["loha"] = ({f"{kohya(TO_Q)}.hada_w1_a": a1, f"{kohya(TO_Q)}.hada_w1_b": b1,
                      f"{kohya(TO_Q)}.hada_w2_a": a2, f"{kohya(TO_Q)}.hada_w2_b": b2,
                      f"{kohya(TO_Q)}.alpha": torch.tensor(8.0),
                      f"{kohya(CONV)}.hada_w1_a": ta1, f"{kohya(CONV)}.hada_w1_b": tb1, f"{kohya(CONV)}.hada_t1": t1,
                      f"{kohya(CONV)}.hada_w2_a": ta2, f"{kohya(CONV)}.hada_w2_b": tb2, f"{kohya(CONV)}.hada_t2": t2},
                     {TO_Q: 2.0 * (a1 @ b1) * (a2 @ b2),
                      CONV: torch.einsum("ijkl,io,jc->ockl", t1, ta1, tb1) * torch.einsum("ijkl,io,jc->ockl", t2, ta2, tb2)})
    # LoKr: Kronecker product; linear with w1 full and w2 factored (alpha/rank of w2_b), conv with both full
    w1, w2a, w2b = _r(4, 4, seed=10), _r(8, 2, seed=11), _r(2, 8, seed=12)
    c1, c2 = _r(4, 2, seed=13), _r(out // 4, cin // 2, 3, 3, seed=14)
    kron = lambda x, y: torch.einsum("ac,bd...->abcd...", x, y).reshape(  # noqa: E731
        x.shape[0] * y.shape[0], x.shape[1] * y.shape[1], *y.shape[2:])
    cases["lokr"] = ({f"{kohya(TO_Q)}.lokr_w1": w1, f"{kohya(TO_Q)}.lokr_w2_a": w2a, f"{kohya(TO_Q)}.lokr_w2_b": w2b,
                      f"{kohya(TO_Q)}.alpha": torch.tensor(1.0),
                      f"{kohya(CONV)}.lokr_w1": c1, f"{kohya(CONV)}.lokr_w2": c2, f"{kohya(CONV)}.alpha": torch.tensor(5.0)},
                     {TO_Q: 0.5 * kron(w1, w2a @ w2b), CONV: kron(c1, c2)})  # full factors: scale 1, as A1111
    for name, (state, deltas) in cases.items():
        merged = _merged(model, state, scale, tmp_path, name)
        for module, delta in deltas.items():
            want = base[f"{module}.weight"] + scale * delta.reshape(base[f"{module}.weight"].shape)
            assert (merged[f"{module}.weight"] - want).abs().max().item() <= TOL, (name, module)
            assert (merged[f"{module}.weight"] - base[f"{module}.weight"]).abs().max().item() > 1e-3, (name, module)


def test_older_diffusers_keys_equal_peft_keys(model, tmp_path):
    down, up = _r(2, 32), _r(32, 2, seed=1)
    attn = TO_Q.rsplit(".", 1)[0]
    peft = _merged(model, {f"unet.{TO_Q}.lora_A.weight": down, f"unet.{TO_Q}.lora_B.weight": up,
                           f"unet.{attn}.to_out.0.lora_A.weight": down, f"unet.{attn}.to_out.0.lora_B.weight": up},
                   1.0, tmp_path, "peft")
    processor = _merged(model, {f"{attn}.processor.to_q_lora.down.weight": down,
                                f"{attn}.processor.to_q_lora.up.weight": up,
                                f"{attn}.processor.to_out_lora.down.weight": down,
                                f"{attn}.processor.to_out_lora.up.weight": up}, 1.0, tmp_path, "processor")
    compatible = _merged(model, {f"unet.{TO_Q}.lora.down.weight": down, f"unet.{TO_Q}.lora.up.weight": up,
                                 f"unet.{attn}.to_out.0.lora.down.weight": down,
                                 f"unet.{attn}.to_out.0.lora.up.weight": up}, 1.0, tmp_path, "compat")
    for k in peft:
        assert torch.equal(peft[k], processor[k]) and torch.equal(peft[k], compatible[k]), k
    assert not torch.equal(peft[f"{TO_Q}.weight"], _base(model)[f"{TO_Q}.weight"])


def test_compvis_named_kohya_keys_match_diffusers_named_ones(model, tmp_path):
    down, up = _r(2, 32), _r(32, 2, seed=1)
    ours = _merged(model, {f"{kohya(TO_Q)}.lora_down.weight": down, f"{kohya(TO_Q)}.lora_up.weight": up}, 1.0, tmp_path)
    compvis = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # A1111's name for the same layer
    theirs = _merged(model, {f"{compvis}.lora_down.weight": down, f"{compvis}.lora_up.weight": up}, 1.0, tmp_path, "cv")
    assert torch.equal(ours[f"{TO_Q}.weight"], theirs[f"{TO_Q}.weight"])


def test_unmatched_keys_are_one_warning_with_a_count(model, tmp_path, caplog):
    state = {f"{kohya(TO_Q)}.lora_down.weight": _r(2, 32), f"{kohya(TO_Q)}.lora_up.weight": _r(32, 2),
             "lora_unet_no_such_layer.lora_down.weight": _r(2, 32), "lora_unet_no_such_layer.lora_up.weight": _r(32, 2),
             "something.else": torch.zeros(1)}
    with caplog.at_level(logging.WARNING, logger="ldm.io.lora"):
        _merged(model, state, 1.0, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of its keys/layers match nothing" in warnings[0]


def test_a_bad_layer_leaves_nothing_applied(model, tmp_path):
    unet = load_model(model).unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    write_safetensors(tmp_path / "bad.safetensors", {
        f"{kohya(TO_Q)}.lora_down.weight": _r(2, 32), f"{kohya(TO_Q)}.lora_up.weight": _r(32, 2),  # fits
        f"{kohya(CONV)}.lora_down.weight": _r(2, 99, 3, 3), f"{kohya(CONV)}.lora_up.weight": _r(32, 2, 1, 1)})
    with pytest.raises(CheckpointError, match=f"'{CONV}' maps 891 -> 32 features, the layer maps 288 -> 32"):
        apply_lora(unet, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_two_loras_at_once_apply_unapply_apply(model, kohya_file, tmp_path):
    from ldm import GenerationSettings, Pipeline
    from ldm.settings import LoraRef

    write_safetensors(tmp_path / "g.safetensors", {f"{kohya(TO_Q)}.lora_down.weight": _r(2, 32),
                                                   f"{kohya(TO_Q)}.lora_up.weight": _r(32, 2) * 10})
    pipe = Pipeline.from_pretrained(model)
    pipe.progress = False
    before = {k: v.clone() for k, v in pipe.parts.unet.state_dict().items()}
    loras = (LoraRef.from_file(kohya_file, 0.8), LoraRef.from_file(tmp_path / "g.safetensors", -0.5))
    s = GenerationSettings("a red cat", steps=2, seed=0, width=32, height=32, sampler="euler")
    images = [pipe.generate(s, output_type="np").images]
    for _ in range(2):
        images.append(pipe.generate(GenerationSettings(**{**s.__dict__, "loras": loras}), output_type="np").images)
        assert all(torch.equal(v, before[k]) for k, v in pipe.parts.unet.state_dict().items())
    one = pipe.generate(GenerationSettings(**{**s.__dict__, "loras": loras[:1]}), output_type="np").images
    assert np.array_equal(images[1], images[2]) and np.abs(images[1] - images[0]).max() > 1e-3
    assert np.abs(images[1] - one).max() > 1e-4  # the second LoRA counts
    assert np.array_equal(pipe.generate(s, output_type="np").images, images[0])


def test_old_kohya_text_encoder_prefix_equals_te1(model, kohya_file, tmp_path):
    """SD1 files from kohya's sd-scripts name the text encoder `lora_te_`; diffusers' converter writes `lora_te1_`."""
    state = read_safetensors(kohya_file)[0]
    old = {k.replace("lora_te1_", "lora_te_"): v.clone() for k, v in state.items()}
    assert any(k.startswith("lora_te_") for k in old)
    write_safetensors(tmp_path / "old.safetensors", old)
    merged = []
    for path in (kohya_file, tmp_path / "old.safetensors"):
        parts = load_model(model)
        apply_lora({"unet": parts.unet, "text_encoder": parts.text_encoder.model}, path, 1.0)
        merged.append(parts.text_encoder.model.state_dict()[f"{TE_Q}.weight"])
    assert torch.equal(merged[0], merged[1])
