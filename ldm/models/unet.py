"""The conditional U-Net: `UNet(x, t, context, y) -> eps or v`, for SD 1.x, SD 2.x and SDXL weights.

SDXL adds a second conditioning vector `y` (sgm's `label_emb` input, diffusers' `add_embeds`): the
pooled text embedding followed by the sinusoidal embeddings of its size (and, for the refiner,
aesthetic-score) conditioning, mapped by `add_embedding` and added to the timestep embedding.
"""
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
    # SDXL's "text_time" added embedding: each time id gets a sinusoidal embedding of this width...
    addition_time_embed_dim: int | None = None
    # ...and add_embedding maps [pooled text, embedded time ids] (this many features) to the time embedding
    projection_class_embeddings_input_dim: int | None = None

    @property
    def has_vector_conditioning(self) -> bool:
        return self.addition_time_embed_dim is not None

    def num_time_ids(self, pooled_dim: int) -> int:
        """How many size/score numbers `y` carries beside a pooled text vector of `pooled_dim`: 6 for the
        SDXL base (original size, crop corner, target size), 5 for the refiner (aesthetic score for target size)."""
        extra = (self.projection_class_embeddings_input_dim or 0) - pooled_dim
        if not self.has_vector_conditioning or extra <= 0 or extra % self.addition_time_embed_dim:
            raise ValueError(f"U-Net added-embedding input {self.projection_class_embeddings_input_dim} does not fit "
                             f"a pooled text vector of {pooled_dim} plus {self.addition_time_embed_dim}-wide time ids")
        return extra // self.addition_time_embed_dim

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
        self.add_embedding = None
        if cfg.has_vector_conditioning:
            if not cfg.projection_class_embeddings_input_dim:
                raise ValueError("addition_time_embed_dim needs projection_class_embeddings_input_dim")
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)

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

    def vector_conditioning(self, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SDXL's `y`: the pooled text [B, P] then each of the time ids [B, n] sinusoidally embedded."""
        cfg = self.config
        if not cfg.has_vector_conditioning:
            raise ValueError("this U-Net takes no added (pooled text and size) conditioning")
        if time_ids.shape[-1] != cfg.num_time_ids(pooled.shape[-1]):
            raise ValueError(f"this U-Net takes {cfg.num_time_ids(pooled.shape[-1])} time ids, got {time_ids.shape[-1]}")
        embedded = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                      cfg.freq_shift).reshape(time_ids.shape[0], -1)
        return torch.cat([pooled, embedded.to(pooled.device)], dim=-1)

    def embed_time(self, t: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        temb = self.time_embedding(
            timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype))
        if self.add_embedding is None:
            if y is not None:
                raise ValueError("this U-Net takes no added conditioning vector y")
            return temb
        if y is None:
            raise ValueError("this SDXL U-Net needs its added conditioning vector y (pooled text and size ids)")
        return temb + self.add_embedding(y.to(temb.dtype))

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

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.embed_time(t, x, y)
        h, skips = self.down(self.conv_in(x), temb, context)
        h = self._run(self.mid_block, h, temb, context)
        h, _ = self.up(h, skips, temb, context)
        return self.head(h)
