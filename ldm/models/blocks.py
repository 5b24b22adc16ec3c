"""The resolution-level blocks shared by the U-Net and the autoencoder: down, middle and up.

Attribute names (`resnets`, `attentions`, `downsamplers`, `upsamplers`) are diffusers' checkpoint keys.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.models.attention import SpatialTransformer
from ldm.models.layers import Downsample, ResnetBlock, Upsample


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
