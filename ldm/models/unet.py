"""The conditional U-Net: `UNet(x, t, context) -> eps or v`, enough for SD 1.x and SD 2.x weights."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import SpatialTransformer
from ldm.models.blocks import DownBlock, MidBlock, UpBlock
from ldm.models.layers import TimestepEmbedding, timestep_embedding


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int = 2
    # which resolution levels (down path order) carry spatial transformers
    attention_levels: list[bool] = field(default_factory=lambda: [True, True, True, False])
    cross_attention_dim: int = 768
    num_heads: int | list[int] = 8  # per level; diffusers stores this as `attention_head_dim`
    transformer_depth: int | list[int] = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    sample_size: int = 64
    upcast_attention: bool = False  # kept for export; SDPA accumulates in fp32 already

    def per_level(self, value: int | list[int]) -> list[int]:
        levels = len(self.block_out_channels)
        values = [value] * levels if isinstance(value, int) else list(value)
        if len(values) != levels:
            raise ValueError(f"expected {levels} per-level values, got {values}")
        return values


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        chs = cfg.block_out_channels
        heads, depths = cfg.per_level(cfg.num_heads), cfg.per_level(cfg.transformer_depth)
        temb_dim = chs[0] * 4
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, context_dim=cfg.cross_attention_dim,
                      linear_projection=cfg.use_linear_projection)
        last = len(chs) - 1
        self.gradient_checkpointing = False

        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb_dim)

        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]  # channel count of every tensor the down path hands to the up path
        for i, ch in enumerate(chs):
            attn = cfg.attention_levels[i]
            self.down_blocks.append(DownBlock(
                chs[max(i - 1, 0)], ch, cfg.layers_per_block, temb_dim, i < last,
                heads=heads[i] if attn else None, depth=depths[i], **common))
            skip_chs += [ch] * (cfg.layers_per_block + (i < last))

        self.mid_block = MidBlock(chs[-1], temb_dim, SpatialTransformer(
            chs[-1], heads[-1], cfg.cross_attention_dim, depths[-1], cfg.norm_num_groups, cfg.use_linear_projection),
            groups=cfg.norm_num_groups, eps=cfg.norm_eps)

        self.up_blocks = nn.ModuleList()
        prev = chs[-1]
        for j, ch in enumerate(reversed(chs)):
            level = last - j
            n = cfg.layers_per_block + 1
            skips, skip_chs = skip_chs[-n:], skip_chs[:-n]
            attn = cfg.attention_levels[level]
            self.up_blocks.append(UpBlock(
                prev, ch, list(reversed(skips)), temb_dim, level > 0,
                heads=heads[level] if attn else None, depth=depths[level], **common))
            prev = ch

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed_time(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        return self.time_embedding(
            timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype))

    def down(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
             blocks: nn.ModuleList | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conv_in's output through the down blocks; returns h and every skip, conv_in's first."""
        skips = [h]
        for block in self.down_blocks if blocks is None else blocks:
            h, block_skips = self._run(block, h, temb, context)
            skips += block_skips
        return h, skips

    def up(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
           blocks: list[nn.Module] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Through the up blocks, each taking its skips from the end of `skips`; returns h and the
        skips left for any up blocks not run."""
        for block in self.up_blocks if blocks is None else blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # the next level's skip fixes the upsampled size when latents are not a power-of-two multiple
            size = tuple(skips[-1].shape[-2:]) if skips and block.upsamplers is not None else None
            h = self._run(block, h, block_skips, temb, context, size)
        return h, skips

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        temb = self.embed_time(t, x)
        h, skips = self.down(self.conv_in(x), temb, context)
        h = self._run(self.mid_block, h, temb, context)
        h, _ = self.up(h, skips, temb, context)
        return self.head(h)
