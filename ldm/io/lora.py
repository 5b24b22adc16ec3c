"""Reading LoRA files of any common layout and merging them into the U-Net and text encoder.

The layout is told from the keys (ldm/io/lora_keys.py); each layer's change is computed by the
formula of its kind (ldm/io/lora_delta.py) and added to the weight, W += weight * alpha / rank * ΔW,
so generation runs at full speed. `loras_merged` puts every touched weight back bit for bit
afterwards, so one loaded model serves requests with different LoRAs.

A file that does not fit the model fails with one line naming its first mismatch, and nothing of
it stays applied; keys that match no layer of the model are reported in one warning with a count.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ldm.io.lora_delta import layer_delta
from ldm.io.lora_keys import LoraLayer, flat_module_names, group_layers
from ldm.io.weights import CheckpointError, folder_option, read_safetensors

logger = logging.getLogger(__name__)

PREFIX = "unet."
DIFFUSERS_METADATA = "lora_adapter_metadata"
OUR_METADATA = "ldm.lora"
LORA_DIR_ENV = "LDM_LORA_DIR"
LORA_SUFFIXES = (".safetensors",)
# What a LoRA merges into: {"unet": U-Net, "text_encoder": the CLIP transformers model, ...}
Targets = Mapping[str, nn.Module]
Originals = dict[tuple[str, str], torch.Tensor]


def _alphas_from_metadata(metadata: dict[str, str]) -> dict[str, float]:
    """The diffusers header's lora_alpha per component (ours: the U-Net's)."""
    try:
        if OUR_METADATA in metadata:
            return {"unet": float(json.loads(metadata[OUR_METADATA])["alpha"])}
        if DIFFUSERS_METADATA in metadata:
            meta = json.loads(metadata[DIFFUSERS_METADATA])
            return {c: float(meta[f"{c}.lora_alpha"]) for c in ("unet", "text_encoder", "text_encoder_2")
                    if f"{c}.lora_alpha" in meta}
    except (KeyError, ValueError, TypeError, AttributeError):
        pass
    return {}


def read_lora(path: Path | str) -> tuple[list[LoraLayer], list[str]]:
    """The file's layers and the keys that belong to no layer."""
    path = Path(path)
    state, metadata = read_safetensors(path)
    try:
        layers, unmatched = group_layers(state, _alphas_from_metadata(metadata))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not layers:
        first = next(iter(state), None)
        raise CheckpointError(f"{path}: no LoRA weights in this file" +
                              (f"; unexpected key '{first}'" if first is not None else ""))
    return layers, unmatched


def _as_targets(model: nn.Module | Targets) -> Targets:
    return {"unet": model} if isinstance(model, nn.Module) else model


def _resolve(path: Path, layers: list[LoraLayer], targets: Targets) -> tuple[list[tuple[LoraLayer, str, nn.Module]], int]:
    """(layer, module name, module) for each layer that names a module of the targets; the count of
    those that name none. A layer for a component the model lacks is a mismatch."""
    from ldm.io.compvis import unet_prefix_map

    modules = {c: dict(m.named_modules()) for c, m in targets.items()}
    flat: dict[str, dict[str, str]] = {}
    found, missing = [], 0
    for layer in layers:
        if layer.component not in targets:
            raise CheckpointError(f"{path}: '{layer.first_key}' is for a {layer.component.replace('_', ' ')} "
                                  "this model does not have (a LoRA for another architecture, e.g. SDXL?)")
        names = modules[layer.component]
        name = layer.module
        if layer.flat:
            if layer.component not in flat:
                cfg = getattr(targets[layer.component], "config", None)
                prefixes = unet_prefix_map(cfg) if layer.component == "unet" and hasattr(cfg, "attention_levels") else None
                flat[layer.component] = flat_module_names(list(names), layer.component, prefixes)
            name = flat[layer.component].get(name)
        elif layer.component != "unet" and name not in names:
            name = name.removeprefix("text_model.")  # transformers 5's CLIPTextModel has no text_model level
        if name is None or name not in names:
            missing += 1
            continue
        found.append((layer, name, names[name]))
    return found, missing


def _delta_for(path: Path, layer: LoraLayer, name: str, module: nn.Module) -> torch.Tensor:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise CheckpointError(f"{path}: LoRA module '{name}' is not a linear or convolution layer of this model")
    try:
        delta = layer_delta(layer.tensors, layer.alpha)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: LoRA '{layer.first_key}' {str(e).splitlines()[0]}") from None
    weight = module.weight
    if delta.shape[0] != weight.shape[0] or delta.numel() != weight.numel():
        if delta.ndim >= 2:
            shape = f"maps {delta[0].numel()} -> {delta.shape[0]} features"
        else:
            shape = f"has shape {tuple(delta.shape)}"
        raise CheckpointError(f"{path}: LoRA '{name}' {shape}, the layer maps {weight[0].numel()} -> "
                              f"{weight.shape[0]} features")
    return delta.reshape(weight.shape)


@torch.no_grad()
def apply_lora(model: nn.Module | Targets, path: Path | str, scale: float = 1.0,
               originals: Originals | None = None) -> int:
    """Merges a LoRA file into the model's weights in place; returns the number of layers changed.

    `model` is a U-Net, or {"unet": ..., "text_encoder": ...} for files that also change the text
    encoder. On any error nothing of this file stays merged. `originals`, if given, receives a copy
    of each layer's weight before its first change (see `loras_merged`)."""
    path = Path(path)
    targets = _as_targets(model)
    layers, unmatched = read_lora(path)
    found, missing = _resolve(path, layers, targets)
    if not found:
        raise CheckpointError(f"{path}: none of its {len(layers)} LoRA layers matches a layer of this model "
                              f"(first: '{layers[0].first_key}')")
    touched: Originals = {}
    try:
        for layer, name, module in found:
            delta = _delta_for(path, layer, name, module)
            key = (layer.component, name)
            if key not in touched:
                touched[key] = module.weight.detach().clone()
            module.weight.add_((scale * delta).to(module.weight.device, module.weight.dtype))
    except BaseException:
        _restore(targets, touched)
        raise
    if originals is not None:
        for key, weight in touched.items():
            originals.setdefault(key, weight)
    skipped = len(unmatched) + missing
    if skipped:
        logger.warning("LoRA %s: %d of its keys/layers match nothing in this model and were ignored", path, skipped)
    logger.info("merged LoRA %s (%d layers, scale %g)", path, len(found), scale)
    return len(found)


def _restore(targets: Targets, originals: Originals) -> None:
    modules = {c: dict(m.named_modules()) for c, m in targets.items()}
    with torch.no_grad():
        for (component, name), weight in originals.items():
            modules[component][name].weight.copy_(weight)


@contextmanager
def loras_merged(model: nn.Module | Targets, loras: Sequence[tuple[Path | str, float]]) -> Iterator[None]:
    """Merge LoRA files into the model for the duration of the block, then put every touched weight
    back bit for bit, so one loaded model serves requests with different LoRAs."""
    targets = _as_targets(model)
    originals: Originals = {}
    try:
        for path, scale in loras:
            apply_lora(targets, path, scale, originals)
        yield
    finally:
        _restore(targets, originals)


def lora_dir(given: Path | str | None) -> Path | None:
    """The folder `<lora:name:w>` tags are looked up in: the one given, else $LDM_LORA_DIR, else none."""
    return folder_option(given, LORA_DIR_ENV, "LoRA")


def find_lora(name: str, folder: Path | None) -> Path:
    """The file `<lora:name:w>` names: `name.safetensors` in the folder or a subfolder of it."""
    if folder is None:
        raise ValueError(f"<lora:{name}:...>: no LoRA folder to find it in (pass --lora-dir or set {LORA_DIR_ENV})")
    for suffix in LORA_SUFFIXES:
        direct = folder / f"{name}{suffix}"
        if direct.is_file():
            return direct
        nested = sorted(folder.rglob(f"{name}{suffix}"))
        if nested:
            return nested[0]
    raise ValueError(f"<lora:{name}:...>: no {name}.safetensors in {folder}")
