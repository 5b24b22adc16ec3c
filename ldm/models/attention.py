"""Attention blocks: SDPA attention, GEGLU feed-forward, the transformer block and the spatial transformer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention on `torch.nn.functional.scaled_dot_product_attention`.

    Self-attention when `context` is None, cross-attention otherwise. The autoencoder's mid-block uses
    the `norm_groups` variant: a GroupNorm in front, biased projections and a residual connection.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False,
                 norm_groups: int | None = None, norm_eps: float = 1e-6) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.group_norm = nn.GroupNorm(norm_groups, dim, eps=norm_eps) if norm_groups else None
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.is_cross = context_dim is not None

    def _project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        ctx = x if context is None else context
        return self.to_q(x), self.to_k(ctx), self.to_v(ctx)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def attend(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, C] tokens; context: [B, M, D] or None."""
        b = x.shape[0]
        # reshape, not view: projections may be strided slices of one matmul output (ldm/fast/attention.py)
        q, k, v = (t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in self._project(x, context))
        out = self._sdpa(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3])
        return self.to_out[1](self.to_out[0](out))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim == 3:
            return self.attend(x, context)
        # image input [B, C, H, W]: the autoencoder's residual spatial self-attention
        b, c, h, w = x.shape
        y = self.group_norm(x) if self.group_norm is not None else x
        # reshape, not view: the input may be channels_last
        y = self.attend(y.reshape(b, c, h * w).transpose(1, 2), context)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class GEGLU(nn.Module):
    """Gated GELU: half of the projection gates the other half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        # ModuleList indices are checkpoint keys: net.0.proj and net.2
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text states, then GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the pixels of a feature map.

    SD1 projects in and out with 1x1 convs; SD2 with linear layers applied after flattening.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1, groups: int = 32,
                 linear_projection: bool = False) -> None:
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear_projection else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear_projection:
            y = self.proj_in(y)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear_projection:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_projection:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear_projection:
            y = self.proj_out(y.contiguous())
        return x + y
