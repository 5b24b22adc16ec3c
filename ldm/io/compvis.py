"""Key maps between the original CompVis single-file layout and ours (= diffusers' module names).

Each map is a list of explicit (ours, compvis) prefix pairs generated from the config, so a
conversion is a dictionary lookup per key, and both directions use the same table.
"""
from __future__ import annotations

import torch

from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.unet import UNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_VAE_RESNET = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
               ("conv_shortcut", "nin_shortcut")]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def unet_prefix_map(cfg: UNetConfig) -> list[tuple[str, str]]:
    """(our module prefix, CompVis module prefix) for every module of the U-Net."""
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    if cfg.has_vector_conditioning:  # SDXL: sgm's label_emb is diffusers' add_embedding
        pairs += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
    L, levels = cfg.layers_per_block, len(cfg.block_out_channels)

    def resnet(ours: str, theirs: str) -> None:
        pairs.extend((f"{ours}.{a}", f"{theirs}.{b}") for a, b in _RESNET)

    for i in range(levels):
        for j in range(L):
            n = 1 + i * (L + 1) + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
            pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1"))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (L + 1) + L}.0.op"))
    resnet("mid_block.resnets.0", "middle_block.0")
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    resnet("mid_block.resnets.1", "middle_block.2")
    for i in range(levels):
        has_attention = cfg.attention_levels[levels - 1 - i]
        for j in range(L + 1):
            n = i * (L + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0")
            pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1"))
        if i < levels - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (L + 1) + L}.{2 if has_attention else 1}.conv"))
    return pairs


def vae_prefix_map(cfg: AutoencoderConfig) -> list[tuple[str, str]]:
    levels = len(cfg.block_out_channels)
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in"), (f"{side}.conv_out", f"{side}.conv_out"),
                  (f"{side}.conv_norm_out", f"{side}.norm_out")]
        for k, name in ((0, "block_1"), (1, "block_2")):
            pairs += [(f"{side}.mid_block.resnets.{k}.{a}", f"{side}.mid.{name}.{b}") for a, b in _VAE_RESNET]
        pairs += [(f"{side}.mid_block.attentions.0.{a}", f"{side}.mid.attn_1.{b}") for a, b in _VAE_ATTENTION]
    for i in range(levels):
        for j in range(cfg.layers_per_block):
            pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.{a}", f"encoder.down.{i}.block.{j}.{b}") for a, b in _VAE_RESNET]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        # the CompVis decoder numbers its levels from the lowest resolution up
        up = levels - 1 - i
        for j in range(cfg.layers_per_block + 1):
            pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.{a}", f"decoder.up.{up}.block.{j}.{b}") for a, b in _VAE_RESNET]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv"))
    return pairs


def _rename(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]], src: int, src_prefix: str,
            dst_prefix: str, what: str) -> dict[str, torch.Tensor]:
    table = {p[src]: p[1 - src] for p in pairs}
    out = {}
    for key, value in state.items():
        if not key.startswith(src_prefix):
            continue
        rest = key[len(src_prefix):]
        module, _, leaf = rest.rpartition(".")
        # attention sub-modules (transformer_blocks.*) keep their names below the mapped prefix
        head, tail = module, ""
        while head and head not in table:
            head, _, last = head.rpartition(".")
            tail = f"{last}.{tail}" if tail else last
        if not head:
            raise ValueError(f"{what}: unknown checkpoint key '{key}' (unknown layout)")
        new = table[head] + (f".{tail}" if tail else "") + f".{leaf}"
        out[dst_prefix + new] = value
    return out


def unet_to_compvis(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return _rename(state, unet_prefix_map(cfg), 0, "", UNET_PREFIX, "unet")


def unet_from_compvis(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return _rename(state, unet_prefix_map(cfg), 1, UNET_PREFIX, "", "unet")


def _is_vae_attention_projection(key: str) -> bool:
    return ".mid_block.attentions.0.to_" in key and key.endswith(".weight")


def vae_to_compvis(state: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    # the original autoencoder computes its mid-block attention with 1x1 convolutions
    state = {k: (v[:, :, None, None] if _is_vae_attention_projection(k) else v) for k, v in state.items()}
    return _rename(state, vae_prefix_map(cfg), 0, "", VAE_PREFIX, "vae")


def vae_from_compvis(state: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    out = _rename(state, vae_prefix_map(cfg), 1, VAE_PREFIX, "", "vae")
    return {k: (v[:, :, 0, 0] if _is_vae_attention_projection(k) and v.ndim == 4 else v) for k, v in out.items()}


def infer_unet_config(state: dict[str, torch.Tensor], pooled_dim: int | None = None,
                      num_time_ids: int = 6) -> UNetConfig:
    """Reads the architecture off the weight shapes of a CompVis/sgm U-Net (SD 1.x, 2.x or SDXL).

    SDXL's `label_emb` input is the pooled text vector (`pooled_dim` wide) followed by `num_time_ids`
    embedded size ids (6 for the base, 5 for the refiner): the caller knows both from its text encoders."""
    p = UNET_PREFIX
    try:
        conv_in = state[p + "input_blocks.0.0.weight"]
    except KeyError:
        raise ValueError("not a Stable Diffusion checkpoint: no 'model.diffusion_model.input_blocks.0.0.weight'") from None
    blocks = sorted({int(k[len(p):].split(".")[1]) for k in state if k.startswith(p + "input_blocks.")})
    downs = [n for n in blocks if p + f"input_blocks.{n}.0.op.weight" in state]
    levels = len(downs) + 1
    layers = (downs[0] - 1) if downs else len(blocks) - 1
    chs = [state[p + f"input_blocks.{1 + i * (layers + 1)}.0.out_layers.3.weight"].shape[0] for i in range(levels)]
    attention = [p + f"input_blocks.{1 + i * (layers + 1)}.1.proj_in.weight" in state for i in range(levels)]
    mid_proj = state[p + "middle_block.1.proj_in.weight"]
    context_dim = state[p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]

    def depth(block: str) -> int:
        return len({k[len(block):].split(".")[0] for k in state if k.startswith(block)})

    mid_depth = depth(p + "middle_block.1.transformer_blocks.")
    # levels without attention have no depth of their own; the deepest one's is the mid block's (UNet reads it)
    depths = [depth(p + f"input_blocks.{1 + i * (layers + 1)}.1.transformer_blocks.") if attention[i]
              else (mid_depth if i == levels - 1 else 1) for i in range(levels)]
    linear = mid_proj.ndim == 2
    # SD1 uses 8 heads everywhere; SD2 and SDXL 64-dim heads, which is how the original configs differ
    heads: int | list[int] = 8 if context_dim == 768 else [max(1, c // 64) for c in chs]
    added: dict = {}
    if p + "label_emb.0.0.weight" in state:
        adm = state[p + "label_emb.0.0.weight"].shape[1]
        if pooled_dim is None or adm <= pooled_dim or (adm - pooled_dim) % num_time_ids:
            raise ValueError(f"U-Net label_emb takes {adm} features, which no pooled text vector of {pooled_dim} "
                             f"plus {num_time_ids} size ids fills")
        added = {"projection_class_embeddings_input_dim": adm,
                 "addition_time_embed_dim": (adm - pooled_dim) // num_time_ids}
    return UNetConfig(in_channels=conv_in.shape[1], out_channels=state[p + "out.2.weight"].shape[0],
                      block_out_channels=chs, layers_per_block=layers, attention_levels=attention,
                      cross_attention_dim=context_dim, num_heads=heads,
                      transformer_depth=depths if len(set(depths)) > 1 else depths[0],
                      use_linear_projection=linear, sample_size=128 if added else 96 if context_dim == 1024 else 64,
                      **added)


def infer_vae_config(state: dict[str, torch.Tensor]) -> AutoencoderConfig:
    p = VAE_PREFIX
    if p + "encoder.conv_in.weight" not in state:
        raise ValueError("not a Stable Diffusion checkpoint: no 'first_stage_model.encoder.conv_in.weight'")
    levels = len({k.split(".")[3] for k in state if k.startswith(p + "encoder.down.")})
    chs = [state[p + f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    layers = len({k.split(".")[5] for k in state if k.startswith(p + "encoder.down.0.block.")})
    return AutoencoderConfig(in_channels=state[p + "encoder.conv_in.weight"].shape[1],
                             out_channels=state[p + "decoder.conv_out.weight"].shape[0],
                             latent_channels=state[p + "decoder.conv_in.weight"].shape[1],
                             block_out_channels=chs, layers_per_block=layers,
                             use_quant_conv=p + "quant_conv.weight" in state,
                             use_post_quant_conv=p + "post_quant_conv.weight" in state)


def openclip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 2.x's OpenCLIP text tower -> transformers CLIPTextModel keys.

    SD 2.x conditions on the penultimate block's output, so (as diffusers does) the last block is
    dropped and the final LayerNorm applied to what remains.
    """
    p = TEXT_PREFIX + "model."
    blocks = sorted({int(k[len(p):].split(".")[2]) for k in state if k.startswith(p + "transformer.resblocks.")})
    out = {"text_model.embeddings.token_embedding.weight": state[p + "token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state[p + "positional_embedding"],
           "text_model.final_layer_norm.weight": state[p + "ln_final.weight"],
           "text_model.final_layer_norm.bias": state[p + "ln_final.bias"]}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in blocks[:-1]:
        src, dst = f"{p}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in names.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{b}.{leaf}"] = state[f"{src}{a}.{leaf}"]
        for leaf in ("weight", "bias"):
            q, k, v = state[f"{src}attn.in_proj_{leaf}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{leaf}"], out[f"{dst}self_attn.k_proj.{leaf}"] = q, k
            out[f"{dst}self_attn.v_proj.{leaf}"] = v
    return out
