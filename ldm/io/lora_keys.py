"""Which layer of which model each key of a LoRA file belongs to, for every layout in circulation.

- diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also `text_encoder.`, or no
  prefix for a U-Net-only file), alpha in the `lora_adapter_metadata` header;
- diffusers' older layouts: `<module>.lora.down/up.weight`, `<module>.lora_linear_layer.down/up.weight`
  and the attention processors' `<attn>.processor.to_q_lora.down.weight` (to_k, to_v, to_out);
- kohya and LyCORIS: `lora_unet_<module with _ for .>.<tensor>` and `lora_te_`/`lora_te1_` (the
  text encoder; `lora_te2_` is SDXL's second one), with a `.alpha` per module. The module part is
  diffusers' name or the original CompVis one; both are matched against the model's own names.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ldm.io.lora_delta import TENSOR_NAMES

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# diffusers spellings of a LoRA pair -> kohya's tensor names, which lora_delta reads
_DIFFUSERS_TENSORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                      "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                      "lora_linear_layer.down.weight": "lora_down.weight",
                      "lora_linear_layer.up.weight": "lora_up.weight"}
_PROCESSOR = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_UNSUPPORTED = ("dora_scale", "lora_magnitude_vector")


@dataclass
class LoraLayer:
    component: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # a dotted module name (diffusers layouts) or kohya's flat name (dots as underscores)
    flat: bool  # True: `module` is a kohya flat name, matched through flat_module_names
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # kohya tensor names
    alpha: float | None = None
    first_key: str = ""  # the file key it came from, for messages


def _split_kohya(key: str) -> tuple[str, str, str] | None:
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix) and "." in key:
            module, tensor = key[len(prefix):].split(".", 1)
            return component, module, tensor
    return None


def _split_diffusers(key: str) -> tuple[str, str, str] | None:
    component, name = "unet", key
    for prefix, comp in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            component, name = comp, key[len(prefix):]
            break
    if (m := _PROCESSOR.fullmatch(name)) is not None:
        attn, proj, side = m.groups()
        return component, f"{attn}.{'to_out.0' if proj == 'to_out' else proj}", f"lora_{side}.weight"
    for suffix, tensor in _DIFFUSERS_TENSORS.items():
        if name.endswith("." + suffix):
            return component, name[:-len(suffix) - 1], tensor
    if name.endswith(".alpha"):
        return component, name[:-len(".alpha")], "alpha"
    return None


def group_layers(state: Mapping[str, torch.Tensor],
                 alphas: Mapping[str, float]) -> tuple[list[LoraLayer], list[str]]:
    """The file's layers (in key order) and the keys that belong to none.

    `alphas` are the diffusers header's alpha per component, for layers with no `.alpha` key."""
    layers: dict[tuple[str, str], LoraLayer] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        if any(key.endswith(u) for u in _UNSUPPORTED) or any(f".{u}." in key for u in _UNSUPPORTED):
            raise ValueError(f"'{key}': DoRA LoRAs (weight-decomposed) are not supported")
        split = _split_kohya(key)
        flat = split is not None
        if split is None:
            split = _split_diffusers(key)
        if split is None or (split[2] not in TENSOR_NAMES and split[2] != "alpha"):
            unmatched.append(key)
            continue
        component, module, tensor = split
        layer = layers.setdefault((component, module), LoraLayer(component, module, flat, first_key=key))
        if tensor == "alpha":
            layer.alpha = float(value.float().item())
        else:
            layer.tensors[tensor] = value
    out = []
    for layer in layers.values():
        if not layer.tensors:  # an alpha with no weights
            unmatched.append(layer.first_key)
            continue
        if layer.alpha is None and not layer.flat:
            layer.alpha = alphas.get(layer.component)
        out.append(layer)
    return out, unmatched


def flat_module_names(names: list[str], component: str,
                      compvis_prefixes: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """{kohya flat name: our module name} for a model's module names.

    Text encoders are matched with and without transformers' `text_model.` level (transformers 5
    dropped it from CLIPTextModel; kohya's names always have it). For the U-Net, CompVis names are
    added when `compvis_prefixes` (ldm.io.compvis.unet_prefix_map) is given."""
    table: dict[str, str] = {}
    for name in names:
        if not name:
            continue
        table[name.replace(".", "_")] = name
        if component != "unet":
            bare = name.removeprefix("text_model.")
            table["text_model_" + bare.replace(".", "_")] = name
        elif compvis_prefixes:
            for ours, theirs in compvis_prefixes:
                if name == ours or name.startswith(ours + "."):
                    table[(theirs + name[len(ours):]).replace(".", "_")] = name
                    break
    return table
