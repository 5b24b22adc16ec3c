"""The conditional U-Net: `UNet(x, t, context) -> eps or v`, enough for SD 1.x and SD 2.x weights."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SpatialTransformer
from .layers import Downsample, ResnetBlock, TimestepEmbedding, Upsample, timestep_embedding
from .conv import Conv2d


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


class DownBlock(nn.Module):
    """`layers_per_block` ResnetBlocks (each optionally followed by a SpatialTransformer), then a downsampler.

    The autoencoder's encoder reuses it with `temb_dim=None` and asymmetric padding.
    """

    def __init__(self, in_ch: int, out_ch: int, layers: int, temb_dim: int | None, downsample: bool, *,
                 groups: int, eps: float, heads: int | None = None, context_dim: int | None = None, depth: int = 1,
                 linear_projection: bool = False, asymmetric_pad: bool = False) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_dim, groups, eps) for i in range(layers)])
        if heads is not None:
            self.attentions = nn.ModuleList([
                SpatialTransformer(out_ch, heads, context_dim, depth, groups, linear_projection) for _ in range(layers)])
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample(out_ch, asymmetric_pad)]) if downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (attention may be a cross-attention
    SpatialTransformer for the U-Net or a plain spatial self-attention for the autoencoder)."""

    def __init__(self, ch: int, temb_dim: int | None, attention: nn.Module | None, *, groups: int, eps: float) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb_dim, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([attention]) if attention is not None else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x, context) if context is not None else self.attentions[0](x)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """`layers_per_block + 1` ResnetBlocks, each eating one skip connection, then an upsampler."""

    def __init__(self, prev_ch: int, out_ch: int, skip_chs: list[int], temb_dim: int, upsample: bool, *, groups: int,
                 eps: float, heads: int | None = None, context_dim: int | None = None, depth: int = 1,
                 linear_projection: bool = False) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock((prev_ch if i == 0 else out_ch) + skip, out_ch, temb_dim, groups, eps)
            for i, skip in enumerate(skip_chs)])
        if heads is not None:
            self.attentions = nn.ModuleList([
                SpatialTransformer(out_ch, heads, context_dim, depth, groups, linear_projection) for _ in skip_chs])
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        # the deepest skip comes first; `skips` is left untouched so checkpoint recomputation sees it again
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            x = resnet(torch.cat([x, skip], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


@dataclass
class StepCache:
    """Opt-in DeepCache-style step caching (Ma et al. 2023). It changes the output.

    Adjacent sampling steps produce nearly the same deep U-Net features. So every `interval`-th call
    runs the whole U-Net and keeps the input of the last up block. The calls in between run only
    conv_in, the first down block and the last up block on top of that cached input. Use one
    StepCache per sampling run: `calls` counts the U-Net calls of that run.
    """
    interval: int = 3
    calls: int = 0
    deep: torch.Tensor | None = None
    full_calls: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"step cache interval must be an integer >= 1, got {self.interval!r}")

    def next_is_shallow(self, h: torch.Tensor) -> bool:
        """Whether this call may reuse the cache; `h` (conv_in's output) guards against a batch or size change."""
        refresh = self.calls % self.interval == 0
        self.calls += 1
        if refresh or self.deep is None or self.deep.shape[0] != h.shape[0] or self.deep.shape[2:] != h.shape[2:]:
            self.full_calls += 1
            return False
        return True


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

        self.conv_in = Conv2d(cfg.in_channels, chs[0], 3, padding=1)
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
        self.conv_out = Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                cache: StepCache | None = None) -> torch.Tensor:
        cfg = self.config
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        temb = self.time_embedding(
            timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype))

        h = self.conv_in(x)
        skips = [h]
        if cache is not None and cache.next_is_shallow(h):
            return self._shallow(skips, temb, context, cache)
        for block in self.down_blocks:
            h, block_skips = self._run(block, h, temb, context)
            skips += block_skips
        h = self._run(self.mid_block, h, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # the next level's skip fixes the upsampled size when latents are not a power-of-two multiple
            size = tuple(skips[-1].shape[-2:]) if skips and block.upsamplers is not None else None
            if cache is not None and block is self.up_blocks[-1]:
                cache.deep = h
            h = self._run(block, h, block_skips, temb, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _shallow(self, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                 cache: StepCache) -> torch.Tensor:
        """A cached step: the first down block feeds the skips of the last up block, whose other input
        comes from the cache. (The first block's downsampler also runs; only the deep path needs it.)"""
        _, block_skips = self._run(self.down_blocks[0], skips[0], temb, context)
        skips = (skips + block_skips)[:len(self.up_blocks[-1].resnets)]
        h = self._run(self.up_blocks[-1], cache.deep, skips, temb, context, None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

