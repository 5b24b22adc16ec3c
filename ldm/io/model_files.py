"""Loading a whole model (U-Net, VAE, text encoder(s), noise schedule) from a diffusers folder or a
single-file checkpoint (ldm/io/single_file.py), and exporting it to either format."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ldm.io.diffusers_config import (unet_config_from_diffusers, unet_config_to_diffusers, upgrade_legacy_vae_keys,
                                     vae_config_from_diffusers, vae_config_to_diffusers)
from ldm.io.model_parts import ModelParts, build_module, short_hash
from ldm.io.single_file import SINGLE_FILE_SUFFIXES, load_single_file, save_single_file
from ldm.io.weights import CheckpointError, read_safetensors, read_weights, write_json, write_safetensors
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNet
from ldm.sampling.schedule import NoiseSchedule
from ldm.text import load_text_encoder_from_folder, names_component

__all__ = ["ModelParts", "short_hash", "load_model", "load_diffusers_folder", "save_diffusers_folder",
           "load_single_file", "save_single_file", "SINGLE_FILE_SUFFIXES"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _component_weights(folder: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return read_safetensors(folder / name)[0], folder / name
    for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"):
        if (folder / name).is_file():
            return read_weights(folder / name, allow_pickle=allow_pickle), folder / name
    if any(folder.glob("*.index.json")):
        raise CheckpointError(f"{folder}: sharded weights are not supported; save the component unsharded")
    raise CheckpointError(f"{folder}: no weights file (expected diffusion_pytorch_model.safetensors)")


def load_diffusers_folder(root: Path, *, allow_pickle: bool = False, clip_skip: int | None = None) -> ModelParts:
    root = Path(root)
    index = _read_json(root / "model_index.json")
    unet_cfg = unet_config_from_diffusers(_read_json(root / "unet" / "config.json"))
    unet_state, unet_file = _component_weights(root / "unet", allow_pickle)
    vae_cfg = vae_config_from_diffusers(_read_json(root / "vae" / "config.json"))
    vae_state = upgrade_legacy_vae_keys(_component_weights(root / "vae", allow_pickle)[0])
    schedule = NoiseSchedule.from_diffusers_config(_read_json(root / "scheduler" / "scheduler_config.json"))
    text = load_text_encoder_from_folder(root, index, clip_skip=clip_skip)
    parts = ModelParts(build_module(UNet, unet_cfg, unet_state, "unet"),
                       build_module(AutoencoderKL, vae_cfg, vae_state, "vae"), text, schedule, root.name,
                       short_hash(unet_file))
    if parts.is_sdxl:
        # diffusers' SDXL pipelines default to zeros for an empty negative prompt; the refiner's folder says false
        parts.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
        try:
            aesthetic = parts.requires_aesthetics_score
        except ValueError as e:
            raise CheckpointError(f"{root}: {e}") from None
        if "requires_aesthetics_score" in index and bool(index["requires_aesthetics_score"]) != aesthetic:
            raise CheckpointError(f"{root / 'model_index.json'}: requires_aesthetics_score is "
                                  f"{index['requires_aesthetics_score']} but the U-Net takes "
                                  f"{'5' if aesthetic else '6'} size ids")
    elif names_component(index, "text_encoder_2"):
        raise CheckpointError(f"{root}: two text encoders but a U-Net without SDXL's added embedding")
    return parts


def save_diffusers_folder(parts: ModelParts, out: Path) -> Path:
    out = Path(out)
    write_safetensors(out / "unet" / "diffusion_pytorch_model.safetensors", parts.unet.state_dict())
    write_json(out / "unet" / "config.json", unet_config_to_diffusers(parts.unet.config))
    write_safetensors(out / "vae" / "diffusion_pytorch_model.safetensors", parts.vae.state_dict())
    write_json(out / "vae" / "config.json", vae_config_to_diffusers(parts.vae.config))
    sched = parts.schedule.to_diffusers_config()
    write_json(out / "scheduler" / "scheduler_config.json", sched)
    parts.text_encoder.save(out)
    text_classes = parts.text_encoder.model_index_entries()
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "scheduler": ["diffusers", sched["_class_name"]], **text_classes}
    if parts.is_sdxl:
        refiner = parts.requires_aesthetics_score
        index = {"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
                 **components, "image_encoder": [None, None], "feature_extractor": [None, None],
                 "force_zeros_for_empty_prompt": parts.force_zeros_for_empty_prompt}
        if refiner:
            index["requires_aesthetics_score"] = True
    else:
        index = {"_class_name": "StableDiffusionPipeline", **components, "safety_checker": [None, None],
                 "feature_extractor": [None, None], "requires_safety_checker": False}
    write_json(out / "model_index.json", {"_diffusers_version": "0.30.0", **index})
    return out


def load_model(path: Path | str, *, allow_pickle: bool = False, tokenizer: Path | None = None,
               clip_skip: int | None = None, prediction_type: str | None = None) -> ModelParts:
    """A diffusers folder or a single-file checkpoint; every failure is a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers model folder (no model_index.json)")
        parts = load_diffusers_folder(path, allow_pickle=allow_pickle, clip_skip=clip_skip)
        if prediction_type:
            parts.schedule = replace(parts.schedule, prediction_type=prediction_type)
        return parts
    if not path.exists():
        raise CheckpointError(f"{path}: no such model file or folder")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown model format (expected a diffusers folder, .safetensors or .ckpt)")
    return load_single_file(path, allow_pickle=allow_pickle, tokenizer=tokenizer, clip_skip=clip_skip,
                            prediction_type=prediction_type)
