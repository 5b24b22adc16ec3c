"""Loading a whole model (U-Net, VAE, text encoder, noise schedule) from a diffusers folder or a
single-file checkpoint, and exporting it to either format."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ldm.io import compvis
from ldm.models.autoencoder import AutoencoderKL
from ldm.io.diffusers_config import (unet_config_from_diffusers, unet_config_to_diffusers, upgrade_legacy_vae_keys,
                               vae_config_from_diffusers, vae_config_to_diffusers)
from ldm.sampling.schedule import NoiseSchedule
from ldm.text import TextEncoder, load_text_encoder_from_folder
from ldm.models.unet import UNet
from ldm.io.weights import CheckpointError, file_sha256, load_state_dict_checked, read_safetensors, read_weights, write_json, write_safetensors

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_TEXT_KEY_PREFIX = compvis.TEXT_PREFIX + "transformer."
_METADATA_KEY = "ldm.model"  # our exports carry their configs and tokenizer, so they round-trip offline


@dataclass
class ModelParts:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    schedule: NoiseSchedule
    name: str
    hash: str  # A1111-style short sha256, shown in PNG parameters

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ModelParts":
        self.unet.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        return self


def short_hash(path: Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]


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


def _build(module_cls, cfg, state: dict[str, torch.Tensor], what: str):
    model = module_cls(cfg)
    load_state_dict_checked(model, {k: v.float() for k, v in state.items()}, what)
    return model.eval().requires_grad_(False)


def load_diffusers_folder(root: Path, *, allow_pickle: bool = False, clip_skip: int | None = None) -> ModelParts:
    root = Path(root)
    index = _read_json(root / "model_index.json")
    unet_cfg = unet_config_from_diffusers(_read_json(root / "unet" / "config.json"))
    unet_state, unet_file = _component_weights(root / "unet", allow_pickle)
    vae_cfg = vae_config_from_diffusers(_read_json(root / "vae" / "config.json"))
    vae_state = upgrade_legacy_vae_keys(_component_weights(root / "vae", allow_pickle)[0])
    schedule = NoiseSchedule.from_diffusers_config(_read_json(root / "scheduler" / "scheduler_config.json"))
    text = load_text_encoder_from_folder(root, index, clip_skip=clip_skip)
    return ModelParts(_build(UNet, unet_cfg, unet_state, "unet"), _build(AutoencoderKL, vae_cfg, vae_state, "vae"),
                      text, schedule, root.name, short_hash(unet_file))


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
    write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", sched["_class_name"]], **text_classes,
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    })
    return out


def save_single_file(parts: ModelParts, out: Path) -> Path:
    """CompVis layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*),
    which A1111/ComfyUI read for CLIP models; our configs and tokenizer ride along in the metadata."""
    out = Path(out)
    state = compvis.unet_to_compvis(parts.unet.state_dict(), parts.unet.config)
    state.update(compvis.vae_to_compvis(parts.vae.state_dict(), parts.vae.config))
    with tempfile.TemporaryDirectory() as tmp:
        parts.text_encoder.save(Path(tmp))
        text_state = read_safetensors(Path(tmp) / "text_encoder" / "model.safetensors")[0]
        model_index = parts.text_encoder.model_index_entries()
        # transformers 5 saves CLIP without the `text_model.` level that SD 1.x files (and A1111) use
        clip = model_index["text_encoder"][1].startswith("CLIPTextModel")
        state.update({_TEXT_KEY_PREFIX + ("text_model." + k if clip and not k.startswith("text_model.") else k): v
                      for k, v in text_state.items()})
        files = {str(f.relative_to(tmp)): f.read_text() for f in Path(tmp).rglob("*")
                 if f.is_file() and f.suffix != ".safetensors"}
    meta = {"unet": unet_config_to_diffusers(parts.unet.config), "vae": vae_config_to_diffusers(parts.vae.config),
            "scheduler": parts.schedule.to_diffusers_config(), "text_model_index": model_index, "text_files": files}
    write_safetensors(out, state, metadata={_METADATA_KEY: json.dumps(meta), "format": "pt"})
    return out


def _clip_config_from_weights(state: dict[str, torch.Tensor], act: str) -> dict:
    hidden = state["text_model.embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")})
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": hidden[1],
            "vocab_size": hidden[0], "num_hidden_layers": layers, "num_attention_heads": max(1, hidden[1] // 64),  # CLIP-L and OpenCLIP-H: 64-dim heads
            "intermediate_size": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "max_position_embeddings": state["text_model.embeddings.position_embedding.weight"].shape[0],
            "hidden_act": act, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
            "projection_dim": hidden[1], "layer_norm_eps": 1e-5}


def _foreign_text_encoder(state: dict[str, torch.Tensor], tokenizer: Path | None, folder: Path) -> dict:
    """Writes a transformers CLIP folder for the text encoder of an original SD v1/v2 checkpoint."""
    if any(k.startswith(_TEXT_KEY_PREFIX) for k in state):  # SD 1.x: already transformers' CLIP keys
        text = {k[len(_TEXT_KEY_PREFIX):]: v for k, v in state.items() if k.startswith(_TEXT_KEY_PREFIX)}
        text = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in text.items()}
        text.pop("text_model.embeddings.position_ids", None)
        act = "quick_gelu"
    elif any(k.startswith(compvis.TEXT_PREFIX + "model.") for k in state):  # SD 2.x: OpenCLIP ViT-H
        text, act = compvis.openclip_to_transformers(state), "gelu"
    else:
        raise CheckpointError("checkpoint has no text encoder weights (cond_stage_model.*)")
    if tokenizer is None:
        raise CheckpointError("this single-file checkpoint carries no tokenizer: pass --tokenizer DIR "
                              "(a CLIP tokenizer folder, e.g. the tokenizer/ of a diffusers SD folder)")
    write_json(folder / "text_encoder" / "config.json", _clip_config_from_weights(text, act))
    write_safetensors(folder / "text_encoder" / "model.safetensors", text)
    from transformers import CLIPTokenizer
    try:
        CLIPTokenizer.from_pretrained(str(tokenizer), local_files_only=True).save_pretrained(folder / "tokenizer")
    except Exception as e:
        raise CheckpointError(f"{tokenizer}: not a usable CLIP tokenizer folder ({str(e).splitlines()[0]})") from None
    return {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}


def _schedule(ours: dict | None, prediction_type: str | None) -> NoiseSchedule:
    # a foreign CompVis file says nothing about its schedule: SD's training schedule is the sane default
    # (diffusers' class defaults for an empty config would be a different, linear 1e-4..0.02 schedule)
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
        unet_cfg = unet_config_from_diffusers(ours["unet"]) if ours else compvis.infer_unet_config(state)
        vae_cfg = vae_config_from_diffusers(ours["vae"]) if ours else compvis.infer_vae_config(state)
        unet_state = compvis.unet_from_compvis(state, unet_cfg)
        vae_state = compvis.vae_from_compvis(state, vae_cfg)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: unknown checkpoint layout ({e})") from None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if ours:
            for name, text in ours["text_files"].items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(text)
            text_state = {k[len(_TEXT_KEY_PREFIX):]: v for k, v in state.items() if k.startswith(_TEXT_KEY_PREFIX)}
            write_safetensors(folder / "text_encoder" / "model.safetensors", text_state)
            index = ours["text_model_index"]
        else:
            index = _foreign_text_encoder(state, tokenizer, folder)
        text = load_text_encoder_from_folder(folder, index, clip_skip=clip_skip)
    return ModelParts(_build(UNet, unet_cfg, unet_state, "unet"), _build(AutoencoderKL, vae_cfg, vae_state, "vae"),
                      text, _schedule(ours, prediction_type), path.stem, short_hash(path))


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
