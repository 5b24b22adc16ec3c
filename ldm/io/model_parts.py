"""A loaded model's components, and building a module from checked weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.io.weights import file_sha256, load_state_dict_checked
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNet
from ldm.sampling.schedule import NoiseSchedule
from ldm.text import TextEncoder


@dataclass
class ModelParts:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    schedule: NoiseSchedule
    name: str
    hash: str  # A1111-style short sha256, shown in PNG parameters
    # SDXL (diffusers' pipeline config): an empty negative prompt conditions on zeros, not on encoded ""
    force_zeros_for_empty_prompt: bool = False

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ModelParts":
        self.unet.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        return self

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.has_vector_conditioning

    @property
    def requires_aesthetics_score(self) -> bool:
        """SDXL's refiner: its size ids end in an aesthetic score instead of the target size."""
        return self.is_sdxl and self.unet.config.num_time_ids(self.text_encoder.pooled_size) == 5

    @property
    def architecture(self) -> str:
        if self.is_sdxl:
            return "sdxl_refiner" if self.requires_aesthetics_score else "sdxl_base"
        return "sd"


def short_hash(path: Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]


def build_module(module_cls, cfg, state: dict[str, torch.Tensor], what: str):
    """`module_cls(cfg)` holding exactly `state`. Built on the meta device and then given the tensors
    themselves, so an SDXL U-Net (10 GB in fp32) is never in memory twice while it loads."""
    with torch.device("meta"):
        model = module_cls(cfg)
    load_state_dict_checked(model, {k: v.float() for k, v in state.items()}, what, assign=True)
    return model.eval().requires_grad_(False)
