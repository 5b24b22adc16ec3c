"""LoRA training on the U-Net's attention projections: peft adapters, written as a small safetensors file.

The file uses diffusers' key layout (`unet.<module>.lora_A.weight` / `.lora_B.weight`, with
`lora_adapter_metadata` holding r and lora_alpha), which works because our module names are
diffusers' own: diffusers' `load_lora_weights` reads it as is, and so does ldm.io.lora.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ldm.io.lora import DIFFUSERS_METADATA, OUR_METADATA, PREFIX, apply_lora
from ldm.io.weights import write_safetensors
from ldm.models.unet import UNet
from ldm.train.config import LoraConfig


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
    if cfg.format == "kohya":
        return save_kohya_lora(unet, path, cfg)
    state = {PREFIX + k: v for k, v in lora_state_dict(unet).items()}
    alpha = lora_alpha(cfg)
    diffusers_meta = {f"unet.{k}": v for k, v in {"r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
                                                  "target_modules": list(cfg.target_modules)}.items()}
    write_safetensors(path, state, metadata={
        "format": "pt", DIFFUSERS_METADATA: json.dumps(diffusers_meta, sort_keys=True),
        OUR_METADATA: json.dumps({"rank": cfg.rank, "alpha": alpha, "target_modules": list(cfg.target_modules)}),
    })
    return Path(path)


def merged_unet(peft_unet: UNet, lora_file: Path) -> UNet:
    """A plain U-Net: the peft model's frozen base weights with the saved adapters merged in."""
    base = {k.replace(".base_layer.", "."): v for k, v in peft_unet.state_dict().items() if "lora_" not in k}
    unet = UNet(peft_unet.config)
    unet.load_state_dict(base, strict=True)
    apply_lora(unet, lora_file, 1.0)
    return unet.eval().requires_grad_(False)


def kohya_state_dict(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft's `<module>.lora_A.weight` / `.lora_B.weight` as kohya's `lora_unet_<module_>.lora_down.weight`
    / `.lora_up.weight`, with an `.alpha` per module."""
    sides = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        module, part = key.rsplit(".", 2)[0], ".".join(key.rsplit(".", 2)[1:])
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{sides[part]}"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya_lora(unet: UNet, path: Path, cfg: LoraConfig) -> Path:
    """The adapters in kohya's layout, with the `ss_*` metadata kohya's sd-scripts write (A1111 and
    ComfyUI read the layout; their UIs show the metadata)."""
    alpha = lora_alpha(cfg)
    # SD2's U-Nets cross-attend to 1024-wide OpenCLIP states, SD1's to 768 (smaller: our own models)
    version = "sd_v2" if unet.config.cross_attention_dim >= 1024 else "sd_v1"
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank), "ss_network_alpha": _num(alpha),
        "ss_base_model_version": version, "ss_v2": str(version == "sd_v2"), "ss_network_args": "{}",
        "ss_output_name": Path(path).stem, "ss_training_comment": "ldm finetune",
        OUR_METADATA: json.dumps({"rank": cfg.rank, "alpha": alpha, "target_modules": list(cfg.target_modules)}),
    }
    write_safetensors(path, kohya_state_dict(lora_state_dict(unet), alpha), metadata=metadata)
    return Path(path)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
