"""Single-file checkpoints in and out: the CompVis layout (SD 1.x/2.x) and Stability's sgm layout (SDXL).

What a file holds is read off its keys (`detect_architecture`):
- SD 1.x: `cond_stage_model.transformer.*` (transformers' CLIP keys);
- SD 2.x: `cond_stage_model.model.*` (OpenCLIP ViT-H);
- SDXL base: `conditioner.embedders.0.transformer.*` (CLIP ViT-L) and `conditioner.embedders.1.model.*`
  (OpenCLIP bigG, fused in_proj, transposed text_projection), and the U-Net's `label_emb`;
- SDXL refiner: bigG alone, as `conditioner.embedders.0.model.*`;
- any of them with a 9-channel `conv_in`: an inpainting model.
Files that `ldm convert` writes carry their configs and tokenizers in the metadata, so they load offline
with no flags; others need `--tokenizer DIR`.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ldm.io import compvis
from ldm.io.diffusers_config import unet_config_from_diffusers, unet_config_to_diffusers, vae_config_from_diffusers, vae_config_to_diffusers
from ldm.io.model_parts import ModelParts, build_module, short_hash
from ldm.io.weights import CheckpointError, load_state_dict_checked, read_safetensors, read_weights, write_json, write_safetensors
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNet
from ldm.sampling.schedule import NoiseSchedule
from ldm.text import ClipPairTextEncoder, ClipTextEncoder, load_text_encoder_from_folder
from ldm.text.openclip import clip_text_model_from_openclip, clip_to_openclip_state_dict, openclip_to_clip_state_dict

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_METADATA_KEY = "ldm.model"  # our exports carry their configs and tokenizers, so they round-trip offline
SD_CLIP = compvis.TEXT_PREFIX + "transformer."
SD2_OPENCLIP = compvis.TEXT_PREFIX + "model."
XL_CLIP_L = "conditioner.embedders.0.transformer."
XL_BIGG = {"sdxl_base": "conditioner.embedders.1.model.", "sdxl_refiner": "conditioner.embedders.0.model."}
SDXL_VAE_SCALING = 0.13025
_LABEL_EMB = compvis.UNET_PREFIX + "label_emb.0.0.weight"


def _has(state: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def detect_architecture(state: dict[str, torch.Tensor]) -> str:
    """"sd1", "sd2", "sdxl_base" or "sdxl_refiner", with "_inpaint" for a 9-channel U-Net input; any
    other layout is a one-line CheckpointError naming what is missing."""
    conv_in = state.get(compvis.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError("not a Stable Diffusion checkpoint: no 'model.diffusion_model.input_blocks.0.0.weight'")
    if _has(state, "conditioner.embedders."):
        if _LABEL_EMB not in state:
            raise CheckpointError("SDXL text encoders (conditioner.embedders) but a U-Net without label_emb: unknown layout")
        clip_l, bigg1, bigg0 = _has(state, XL_CLIP_L), _has(state, XL_BIGG["sdxl_base"]), _has(state, XL_BIGG["sdxl_refiner"])
        if clip_l and bigg1:
            family = "sdxl_base"
        elif bigg0 and not clip_l:
            family = "sdxl_refiner"
        elif clip_l:
            raise CheckpointError("SDXL checkpoint without its second text encoder (conditioner.embedders.1.model.*): "
                                  "the file is incomplete")
        else:
            raise CheckpointError("unknown SDXL layout: conditioner.embedders hold no CLIP or OpenCLIP text encoder")
    elif _LABEL_EMB in state:
        raise CheckpointError("SDXL-shaped U-Net (label_emb) but no conditioner.embedders text encoders: incomplete file")
    elif _has(state, SD_CLIP):
        family = "sd1"
    elif _has(state, SD2_OPENCLIP):
        family = "sd2"
    else:
        raise CheckpointError("checkpoint has no text encoder weights (cond_stage_model.* or conditioner.embedders.*)")
    return family + ("_inpaint" if conv_in.shape[1] == 9 else "")


def _clip_config_from_weights(state: dict[str, torch.Tensor], act: str, tokenizer) -> dict:
    hidden = state["text_model.embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")})
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": hidden[1],
            "vocab_size": hidden[0], "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden[1] // 64),  # CLIP-L, OpenCLIP-H and bigG: 64-dim heads
            "intermediate_size": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "max_position_embeddings": state["text_model.embeddings.position_embedding.weight"].shape[0],
            "hidden_act": act, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "projection_dim": hidden[1], "layer_norm_eps": 1e-5}


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _hf_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in state.items()}
    out.pop("text_model.embeddings.position_ids", None)
    return out


def _tokenizers(tokenizer: Path | None, pair: bool):
    """(CLIP-L's, bigG's) tokenizers from `--tokenizer DIR`: a diffusers SDXL folder (tokenizer/ and
    tokenizer_2/), or one CLIP tokenizer folder, from which bigG's is made by padding with "!" as
    SDXL's tokenizer_2 does (the vocabulary is the same)."""
    from transformers import CLIPTokenizer

    if tokenizer is None:
        raise CheckpointError("this single-file checkpoint carries no tokenizer: pass --tokenizer DIR "
                              "(a CLIP tokenizer folder, e.g. the tokenizer/ of a diffusers SD or SDXL folder)")
    tokenizer = Path(tokenizer)
    try:
        if (tokenizer / "tokenizer").is_dir():
            first = CLIPTokenizer.from_pretrained(str(tokenizer / "tokenizer"), local_files_only=True)
            second_dir = tokenizer / ("tokenizer_2" if (tokenizer / "tokenizer_2").is_dir() else "tokenizer")
            second = CLIPTokenizer.from_pretrained(str(second_dir), local_files_only=True)
        else:
            first = CLIPTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
            second = CLIPTokenizer.from_pretrained(str(tokenizer), local_files_only=True, pad_token="!") if pair else first
    except Exception as e:
        raise CheckpointError(f"{tokenizer}: not a usable CLIP tokenizer folder ({str(e).splitlines()[0]})") from None
    return first, second


def _clip_from_weights(text: dict[str, torch.Tensor], act: str, tokenizer, penultimate: bool) -> ClipTextEncoder:
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**_clip_config_from_weights(text, act, tokenizer)))
    if "text_model.final_layer_norm.weight" not in model.state_dict():  # transformers 5: no text_model level
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
    load_state_dict_checked(model, text, "text encoder")
    return ClipTextEncoder(model.eval(), tokenizer, penultimate=penultimate)


def _foreign_text_encoder(state: dict[str, torch.Tensor], family: str, tokenizer: Path | None):
    """The text encoder(s) of a single file from elsewhere, built from the weights and `--tokenizer`."""
    base = family.removesuffix("_inpaint")
    if base == "sd1":
        first, _ = _tokenizers(tokenizer, pair=False)
        return _clip_from_weights(_hf_clip_keys(_strip(state, SD_CLIP)), "quick_gelu", first, penultimate=False)
    if base == "sd2":
        first, _ = _tokenizers(tokenizer, pair=False)
        return _clip_from_weights(compvis.openclip_to_transformers(state), "gelu", first, penultimate=False)
    first_tok, second_tok = _tokenizers(tokenizer, pair=True)
    try:
        tower = _strip(state, XL_BIGG[base])
        width = tower["token_embedding.weight"].shape[1]
        bigg = clip_text_model_from_openclip(
            tower, num_heads=max(1, width // 64), hidden_act="gelu", layer_norm_eps=1e-5,
            bos_token_id=second_tok.bos_token_id, eos_token_id=second_tok.eos_token_id,
            pad_token_id=second_tok.pad_token_id)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"SDXL OpenCLIP text encoder ({XL_BIGG[base]}*): {str(e).splitlines()[0]}") from None
    second = ClipTextEncoder(bigg, second_tok, penultimate=True)
    first = None
    if base == "sdxl_base":
        first = _clip_from_weights(_hf_clip_keys(_strip(state, XL_CLIP_L)), "quick_gelu", first_tok, penultimate=True)
    return ClipPairTextEncoder(first, second)


def _our_text_encoder(state: dict[str, torch.Tensor], meta: dict, family: str):
    """The text encoder(s) of a file `ldm convert` wrote: configs and tokenizers from its metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, text in meta["text_files"].items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        if family.startswith("sdxl"):
            if family.startswith("sdxl_base"):
                write_safetensors(folder / "text_encoder" / "model.safetensors", _hf_clip_keys(_strip(state, XL_CLIP_L)))
            bigg = openclip_to_clip_state_dict(_strip(state, XL_BIGG[family.removesuffix("_inpaint")]))
            write_safetensors(folder / "text_encoder_2" / "model.safetensors", bigg)
        else:
            write_safetensors(folder / "text_encoder" / "model.safetensors", _strip(state, SD_CLIP))
        return load_text_encoder_from_folder(folder, meta["text_model_index"])


def _schedule(ours: dict | None, prediction_type: str | None) -> NoiseSchedule:
    # a foreign file says nothing about its schedule: SD's and SDXL's training schedule (scaled_linear
    # 0.00085-0.012, "leading" spacing, offset 1) is the sane default; diffusers' class defaults for an
    # empty config would be a different, linear 1e-4..0.02 schedule
    schedule = NoiseSchedule.from_diffusers_config(ours["scheduler"]) if ours else NoiseSchedule()
    return replace(schedule, prediction_type=prediction_type) if prediction_type else schedule


def load_single_file(path: Path, *, allow_pickle: bool = False, tokenizer: Path | None = None,
                     clip_skip: int | None = None, prediction_type: str | None = None) -> ModelParts:
    path = Path(path)
    if path.suffix == ".safetensors":
        state, metadata = read_safetensors(path)
    else:
        state, metadata = read_weights(path, allow_pickle=allow_pickle), {}
    ours = json.loads(metadata[_METADATA_KEY]) if _METADATA_KEY in metadata else None
    try:
        family = detect_architecture(state)
        text = _our_text_encoder(state, ours, family) if ours else _foreign_text_encoder(state, family, tokenizer)
        if clip_skip is not None:
            text.set_clip_skip(clip_skip)
        xl = family.startswith("sdxl")
        if ours:
            unet_cfg, vae_cfg = unet_config_from_diffusers(ours["unet"]), vae_config_from_diffusers(ours["vae"])
        else:
            refiner = family.startswith("sdxl_refiner")
            unet_cfg = compvis.infer_unet_config(state, text.pooled_size if xl else None, 5 if refiner else 6)
            vae_cfg = compvis.infer_vae_config(state)
            if xl:
                vae_cfg = replace(vae_cfg, scaling_factor=SDXL_VAE_SCALING)
        unet_state = compvis.unet_from_compvis(state, unet_cfg)
        vae_state = compvis.vae_from_compvis(state, vae_cfg)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: unknown checkpoint layout ({str(e).splitlines()[0]})") from None
    force_zeros = ours.get("force_zeros_for_empty_prompt", False) if ours else family.startswith("sdxl_base")
    del state
    return ModelParts(build_module(UNet, unet_cfg, unet_state, "unet"), build_module(AutoencoderKL, vae_cfg, vae_state, "vae"),
                      text, _schedule(ours, prediction_type), path.stem, short_hash(path),
                      force_zeros_for_empty_prompt=force_zeros)


def save_single_file(parts: ModelParts, out: Path) -> Path:
    """CompVis layout for SD 1/2 (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*)
    and sgm layout for SDXL (conditioner.embedders.*), which A1111, ComfyUI and diffusers' from_single_file
    read; our configs and tokenizers ride along in the metadata."""
    out = Path(out)
    state = compvis.unet_to_compvis(parts.unet.state_dict(), parts.unet.config)
    state.update(compvis.vae_to_compvis(parts.vae.state_dict(), parts.vae.config))
    with tempfile.TemporaryDirectory() as tmp:
        parts.text_encoder.save(Path(tmp))
        model_index = parts.text_encoder.model_index_entries()

        def weights(folder: str) -> dict[str, torch.Tensor]:
            return read_safetensors(Path(tmp) / folder / "model.safetensors")[0]

        if parts.is_sdxl:
            if (Path(tmp) / "text_encoder").is_dir():
                state.update({XL_CLIP_L + k: v for k, v in _hf_clip_keys(weights("text_encoder")).items()})
            bigg = clip_to_openclip_state_dict(weights("text_encoder_2"))
            state.update({XL_BIGG[parts.architecture] + k: v for k, v in bigg.items()})
        else:
            # transformers 5 saves CLIP without the `text_model.` level that SD 1.x files (and A1111) use
            clip = model_index["text_encoder"][1].startswith("CLIPTextModel")
            text = weights("text_encoder")
            state.update({SD_CLIP + k: v for k, v in (_hf_clip_keys(text) if clip else text).items()})
        files = {str(f.relative_to(tmp)): f.read_text() for f in Path(tmp).rglob("*")
                 if f.is_file() and f.suffix != ".safetensors"}
    meta = {"unet": unet_config_to_diffusers(parts.unet.config), "vae": vae_config_to_diffusers(parts.vae.config),
            "scheduler": parts.schedule.to_diffusers_config(), "text_model_index": model_index, "text_files": files,
            "force_zeros_for_empty_prompt": parts.force_zeros_for_empty_prompt}
    write_safetensors(out, state, metadata={_METADATA_KEY: json.dumps(meta), "format": "pt"})
    return out
