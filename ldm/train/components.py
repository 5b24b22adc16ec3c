"""The model a stage-2 run starts from: a whole model to fine-tune, or a trained VAE + a text
encoder + a fresh U-Net, checked against each other before any training starts."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from ldm.models.autoencoder import AutoencoderKL
from ldm.io.diffusers_config import upgrade_legacy_vae_keys, vae_config_from_diffusers
from ldm.io.model_files import ModelParts, load_model
from ldm.models.attention import SpatialTransformer
from ldm.text import load_text_encoder
from ldm.models.unet import UNet
from ldm.io.weights import CheckpointError, load_state_dict_checked, read_safetensors
from ldm.train.config import UNetStageConfig

logger = logging.getLogger(__name__)

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def load_vae_folder(path: Path | str) -> AutoencoderKL:
    """A VAE folder (config.json + diffusion_pytorch_model.safetensors, as stage 1 writes) or a model
    folder's `vae/`."""
    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a VAE folder (no config.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    vae = AutoencoderKL(vae_config_from_diffusers(cfg))
    state = upgrade_legacy_vae_keys(read_safetensors(folder / VAE_WEIGHTS)[0])
    load_state_dict_checked(vae, {k: v.float() for k, v in state.items()}, "vae")
    return vae.eval().requires_grad_(False)


def warm_start_unet(unet: UNet, source: Path | str) -> list[str]:
    """Copies the U-Net of the model at `source` into `unet`, which may add attention blocks.

    Each added block's output projection is zeroed: a SpatialTransformer returns `x + proj_out(...)`,
    so it starts as the identity and `unet` computes exactly what the source U-Net did. Any other
    difference (a changed width, a missing resnet, an unknown key) is an error. Returns the names of
    the added blocks.
    """
    state = load_model(source).unet.state_dict()
    expected = unet.state_dict()
    for key, tensor in state.items():
        if key not in expected or expected[key].shape != tensor.shape:
            have = tuple(expected[key].shape) if key in expected else "no such key"
            raise CheckpointError(f"warm_start {source}: '{key}' {tuple(tensor.shape)} does not fit this U-Net "
                                  f"({have}); only added attention levels can differ")
    missing = {k for k in expected if k not in state}
    added = [name for name, m in unet.named_modules()
             if isinstance(m, SpatialTransformer) and any(k.startswith(name + ".") for k in missing)]
    uncovered = sorted(k for k in missing if not any(k.startswith(name + ".") for name in added))
    if uncovered:
        raise CheckpointError(f"warm_start {source}: this U-Net's '{uncovered[0]}' is not in the source and not part "
                              f"of an added attention block")
    unet.load_state_dict(state, strict=False)
    for name in added:
        proj_out = unet.get_submodule(name).proj_out
        nn.init.zeros_(proj_out.weight)
        nn.init.zeros_(proj_out.bias)
    return added


def build_parts(cfg: UNetStageConfig, name: str) -> ModelParts:
    """Every part on the CPU in fp32; the U-Net is trainable, the VAE and text encoder frozen."""
    if cfg.init_from is not None:
        parts = load_model(cfg.init_from)
        if cfg.vae is not None:
            parts.vae = load_vae_folder(cfg.vae)
            logger.info("using the VAE from %s instead of %s's", cfg.vae, cfg.init_from)
        if cfg.data.resolution is None:
            cfg.data.resolution = parts.unet.config.sample_size * parts.vae.config.downscale
    else:
        vae = load_vae_folder(cfg.vae)
        t = cfg.text_encoder
        kwargs = {k: v for k, v in (("max_length", t.max_length), ("num_layers", t.num_layers)) if v is not None}
        if "num_layers" in kwargs and t.kind not in ("bert", "minilm"):
            raise ValueError(f"text_encoder.num_layers applies to bert/minilm encoders, not {t.kind}")
        text = load_text_encoder(t.kind, Path(t.path) if t.path else None, **kwargs)
        ucfg = cfg.unet
        if cfg.data.resolution is None:
            raise ValueError("data.resolution must be set when training a U-Net from scratch")
        if ucfg.cross_attention_dim != text.hidden_size:
            raise ValueError(f"unet.cross_attention_dim is {ucfg.cross_attention_dim} but the {t.kind} text encoder's "
                             f"states are {text.hidden_size}-d: set unet.cross_attention_dim={text.hidden_size}")
        lc = vae.config.latent_channels
        if ucfg.in_channels != lc or ucfg.out_channels != lc:
            raise ValueError(f"unet.in_channels/out_channels are {ucfg.in_channels}/{ucfg.out_channels} but the VAE "
                             f"has {lc} latent channels")
        # the size `ldm generate` uses by default is the training size
        ucfg.sample_size = cfg.data.resolution // vae.config.downscale
        unet = UNet(ucfg)
        if cfg.warm_start is not None:
            added = warm_start_unet(unet, cfg.warm_start)
            logger.info("U-Net warm-started from %s; new attention blocks (identity at start): %s",
                        cfg.warm_start, ", ".join(added) or "none")
        parts = ModelParts(unet, vae, text, cfg.schedule, name, "")
    if cfg.data.resolution % parts.vae.config.downscale:
        raise ValueError(f"data.resolution {cfg.data.resolution} is not a multiple of the VAE factor "
                         f"{parts.vae.config.downscale}")
    parts.unet.train()
    return parts
