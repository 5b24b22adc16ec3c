"""LoRA on the U-Net's attention projections: training with peft, a small safetensors file, merging.

The file uses diffusers' key layout (`unet.<module>.lora_A.weight` / `.lora_B.weight`, with
`lora_adapter_metadata` holding r and lora_alpha), which works because our module names are
diffusers' own: diffusers' `load_lora_weights` reads it as is. `apply_lora` needs no peft: it merges
W += scale * alpha / r * B @ A into a plain U-Net, so generation runs at full speed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..unet import UNet
from ..weights import CheckpointError, read_safetensors, write_safetensors
from .config import LoraConfig

logger = logging.getLogger(__name__)

_PREFIX = "unet."
_DIFFUSERS_METADATA = "lora_adapter_metadata"
_OUR_METADATA = "ldm.lora"


def lora_alpha(cfg: LoraConfig) -> float:
    return float(cfg.alpha if cfg.alpha is not None else cfg.rank)


def add_lora(unet: nn.Module, cfg: LoraConfig) -> None:
    """Injects peft LoRA layers in place and freezes everything else."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=lora_alpha(cfg), lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), init_lora_weights=True)
    unet.requires_grad_(False)
    try:
        inject_adapter_in_model(peft_cfg, unet)
    except ValueError as e:
        raise ValueError(f"lora.target_modules {cfg.target_modules}: {str(e).splitlines()[0]}") from None
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft-injected U-Net, keyed `<module>.lora_A.weight` / `.lora_B.weight`."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet).items()}


def save_lora(unet: nn.Module, path: Path, cfg: LoraConfig) -> Path:
    state = {_PREFIX + k: v for k, v in lora_state_dict(unet).items()}
    alpha = lora_alpha(cfg)
    diffusers_meta = {f"unet.{k}": v for k, v in {"r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
                                                  "target_modules": list(cfg.target_modules)}.items()}
    write_safetensors(path, state, metadata={
        "format": "pt", _DIFFUSERS_METADATA: json.dumps(diffusers_meta, sort_keys=True),
        _OUR_METADATA: json.dumps({"rank": cfg.rank, "alpha": alpha, "target_modules": list(cfg.target_modules)}),
    })
    return Path(path)


def _alpha_from_metadata(metadata: dict[str, str]) -> float | None:
    try:
        if _OUR_METADATA in metadata:
            return float(json.loads(metadata[_OUR_METADATA])["alpha"])
        if _DIFFUSERS_METADATA in metadata:
            return float(json.loads(metadata[_DIFFUSERS_METADATA])["unet.lora_alpha"])
    except (KeyError, ValueError, TypeError):
        pass
    return None


def read_lora(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float | None]:
    """{module name: (A [r, in], B [out, r])} and the file's alpha (None: not recorded, use r)."""
    state, metadata = read_safetensors(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
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
def apply_lora(unet: nn.Module, path: Path | str, scale: float = 1.0) -> int:
    """Merges a LoRA file into `unet`'s weights in place; returns the number of layers changed.

    Every module named in the file must exist with matching shapes (checked before anything is
    changed), so a LoRA for a different architecture fails with the module's name.
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
        rank = a.shape[0]
        factor = scale * (alpha if alpha is not None else rank) / rank
        delta = b.float() @ a.float()
        layer.weight.add_((factor * delta).to(layer.weight.device, layer.weight.dtype))
    logger.info("merged LoRA %s (%d layers, scale %g)", path, len(pairs), scale)
    return len(pairs)


def merged_unet(peft_unet: UNet, lora_file: Path) -> UNet:
    """A plain U-Net: the peft model's frozen base weights with the saved adapters merged in."""
    base = {k.replace(".base_layer.", "."): v for k, v in peft_unet.state_dict().items() if "lora_" not in k}
    unet = UNet(peft_unet.config)
    unet.load_state_dict(base, strict=True)
    apply_lora(unet, lora_file, 1.0)
    return unet.eval().requires_grad_(False)
