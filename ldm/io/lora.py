"""Reading a LoRA file and merging it into a U-Net, with no peft needed.

The file layout is diffusers' (`unet.<module>.lora_A.weight` / `.lora_B.weight`, with
`lora_adapter_metadata` holding r and lora_alpha), which `ldm finetune --lora` writes. Merging adds
W += scale * alpha / r * B @ A to a plain U-Net's weights, so generation runs at full speed.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ldm.io.weights import CheckpointError, read_safetensors

logger = logging.getLogger(__name__)

PREFIX = "unet."
DIFFUSERS_METADATA = "lora_adapter_metadata"
OUR_METADATA = "ldm.lora"


def _alpha_from_metadata(metadata: dict[str, str]) -> float | None:
    try:
        if OUR_METADATA in metadata:
            return float(json.loads(metadata[OUR_METADATA])["alpha"])
        if DIFFUSERS_METADATA in metadata:
            return float(json.loads(metadata[DIFFUSERS_METADATA])["unet.lora_alpha"])
    except (KeyError, ValueError, TypeError):
        pass
    return None


def read_lora(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float | None]:
    """{module name: (A [r, in], B [out, r])} and the file's alpha (None: not recorded, use r)."""
    state, metadata = read_safetensors(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                pairs.setdefault(name[:-len(suffix)], {})[part] = value
                break
        else:
            raise CheckpointError(f"{path}: unexpected key '{key}' (expected diffusers/peft LoRA keys "
                                  "'<module>.lora_A.weight' / '.lora_B.weight')")
    out = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{path}: '{module}' has only {', '.join(pair)}")
        out[module] = (pair["lora_A"], pair["lora_B"])
    if not out:
        raise CheckpointError(f"{path}: no LoRA weights in this file")
    return out, _alpha_from_metadata(metadata)


@torch.no_grad()
def apply_lora(unet: nn.Module, path: Path | str, scale: float = 1.0,
               originals: dict[str, torch.Tensor] | None = None) -> int:
    """Merges a LoRA file into `unet`'s weights in place; returns the number of layers changed.

    Every module named in the file must exist with matching shapes (checked before anything is
    changed), so a LoRA for a different architecture fails with the module's name. `originals`, if
    given, receives a copy of each layer's weight before its first change (see `loras_merged`).
    """
    pairs, alpha = read_lora(Path(path))
    modules = dict(unet.named_modules())
    for name, (a, b) in pairs.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise CheckpointError(f"{path}: LoRA module '{name}' is not a linear layer of this U-Net")
        want = (layer.out_features, layer.in_features)
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != want:
            raise CheckpointError(f"{path}: LoRA '{name}' maps {a.shape[1]} -> {b.shape[0]} features, "
                                  f"the layer maps {layer.in_features} -> {layer.out_features}")
    for name, (a, b) in pairs.items():
        layer = modules[name]
        if originals is not None and name not in originals:
            originals[name] = layer.weight.detach().clone()
        rank = a.shape[0]
        factor = scale * (alpha if alpha is not None else rank) / rank
        delta = b.float() @ a.float()
        layer.weight.add_((factor * delta).to(layer.weight.device, layer.weight.dtype))
    logger.info("merged LoRA %s (%d layers, scale %g)", path, len(pairs), scale)
    return len(pairs)


@contextmanager
def loras_merged(unet: nn.Module, loras: Sequence[tuple[Path | str, float]]) -> Iterator[None]:
    """Merge LoRA files into `unet` for the duration of the block, then put every touched weight
    back bit for bit, so one loaded model serves requests with different LoRAs."""
    originals: dict[str, torch.Tensor] = {}
    try:
        for path, scale in loras:
            apply_lora(unet, path, scale, originals)
        yield
    finally:
        modules = dict(unet.named_modules())
        with torch.no_grad():
            for name, weight in originals.items():
                modules[name].weight.copy_(weight)
