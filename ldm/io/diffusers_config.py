"""Translating diffusers' `config.json` files to our dataclass configs and back.

Only the features SD 1.x/2.x and SDXL models use are accepted; anything else (class labels, image
or text-image added embeddings, other block types) is refused with a message naming the key, rather
than silently building a different network.
"""
from __future__ import annotations

from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.unet import UNetConfig

_UNET_UNSUPPORTED_IF_SET = (
    "class_embed_type", "encoder_hid_dim", "time_cond_proj_dim", "num_class_embeds", "time_embedding_dim",
    "timestep_post_act", "cross_attention_norm", "reverse_transformer_layers_per_block",
)
_UNET_REQUIRED_VALUES = {
    "act_fn": "silu", "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default", "center_input_sample": False,
    "dual_cross_attention": False, "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


def _unsupported(what: str, key: str, value) -> ValueError:
    return ValueError(f"unsupported {what} config: {key}={value!r} (ldm supports SD 1.x/2.x and SDXL models)")


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    for key in _UNET_UNSUPPORTED_IF_SET:
        if cfg.get(key) is not None:
            raise _unsupported("U-Net", key, cfg[key])
    for key, want in _UNET_REQUIRED_VALUES.items():
        value = cfg.get(key, want)
        if isinstance(value, list) and not isinstance(want, list):
            ok = all(v == want for v in value)
        else:
            ok = value == want or value is None
        if not ok:
            raise _unsupported("U-Net", key, value)
    down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    down_kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    up_kinds = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    for name in down:
        if name not in down_kinds:
            raise _unsupported("U-Net", "down_block_types", name)
    for name in up:
        if name not in up_kinds:
            raise _unsupported("U-Net", "up_block_types", name)
    levels = [down_kinds[n] for n in down]
    if [up_kinds[n] for n in reversed(up)] != levels:
        raise _unsupported("U-Net", "up_block_types", up)
    if isinstance(cfg.get("cross_attention_dim"), list):
        raise _unsupported("U-Net", "cross_attention_dim", cfg["cross_attention_dim"])
    added = cfg.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise _unsupported("U-Net", "addition_embed_type", added)
    if added == "text_time" and not (cfg.get("addition_time_embed_dim") and cfg.get("projection_class_embeddings_input_dim")):
        raise _unsupported("U-Net", "addition_embed_type", "text_time without addition_time_embed_dim and "
                           "projection_class_embeddings_input_dim")
    # diffusers' historical naming: `attention_head_dim` holds the number of heads for SD models
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    depth = cfg.get("transformer_layers_per_block", 1)
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
        block_out_channels=list(cfg.get("block_out_channels", [320, 640, 1280, 1280])),
        layers_per_block=_single(cfg.get("layers_per_block", 2), "layers_per_block"),
        attention_levels=levels, cross_attention_dim=cfg.get("cross_attention_dim", 1280),
        num_heads=list(heads) if isinstance(heads, (list, tuple)) else heads,
        transformer_depth=list(depth) if isinstance(depth, (list, tuple)) else depth,
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
        sample_size=_single(cfg.get("sample_size") or 64, "sample_size"),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        addition_time_embed_dim=cfg.get("addition_time_embed_dim") if added else None,
        projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim") if added else None,
    )


def _single(value, key: str):
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise _unsupported("model", key, value)
        return value[0]
    return value


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    added = {}
    if cfg.has_vector_conditioning:
        added = {"addition_embed_type": "text_time", "addition_time_embed_dim": cfg.addition_time_embed_dim,
                 "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim}
    return {**added,
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": cfg.num_heads,
        "block_out_channels": list(cfg.block_out_channels), "center_input_sample": False,
        "cross_attention_dim": cfg.cross_attention_dim, "down_block_types": down, "downsample_padding": 1,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift, "in_channels": cfg.in_channels,
        "layers_per_block": cfg.layers_per_block, "mid_block_scale_factor": 1, "norm_eps": cfg.norm_eps,
        "norm_num_groups": cfg.norm_num_groups, "out_channels": cfg.out_channels, "sample_size": cfg.sample_size,
        "transformer_layers_per_block": cfg.transformer_depth, "up_block_types": up,
        "use_linear_projection": cfg.use_linear_projection, "upcast_attention": cfg.upcast_attention,
    }


def vae_config_from_diffusers(cfg: dict) -> AutoencoderConfig:
    for key, want in (("act_fn", "silu"), ("norm_type", "group")):
        if cfg.get(key, want) != want:
            raise _unsupported("VAE", key, cfg[key])
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for name in cfg.get(key, [want]):
            if name != want:
                raise _unsupported("VAE", key, name)
    if cfg.get("latents_mean") is not None:
        raise _unsupported("VAE", "latents_mean", "...")
    return AutoencoderConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        latent_channels=cfg.get("latent_channels", 4),
        block_out_channels=list(cfg.get("block_out_channels", [64])),
        layers_per_block=cfg.get("layers_per_block", 1), norm_num_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215), shift_factor=cfg.get("shift_factor"),
        use_quant_conv=cfg.get("use_quant_conv", True), use_post_quant_conv=cfg.get("use_post_quant_conv", True),
        mid_block_add_attention=cfg.get("mid_block_add_attention", True),
        sample_size=_single(cfg.get("sample_size", 512), "sample_size"),
        force_upcast=bool(cfg.get("force_upcast", True)),
    )


def vae_config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    n = len(cfg.block_out_channels)
    out = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
        "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size, "scaling_factor": cfg.scaling_factor,
        "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_block_add_attention, "force_upcast": cfg.force_upcast,
    }
    if cfg.shift_factor is not None:
        out["shift_factor"] = cfg.shift_factor
    return out


# Older diffusers folders name the VAE's attention projections after the original LDM code.
_LEGACY_VAE_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def upgrade_legacy_vae_keys(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for old, new in _LEGACY_VAE_ATTENTION.items():
            if ".attentions.0." + old in key:
                key = key.replace(".attentions.0." + old, ".attentions.0." + new)
        out[key] = value
    return out
