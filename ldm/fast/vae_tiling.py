"""VAE tiling and slicing, so that the size of the image no longer sets peak memory.

Slicing runs the VAE on one image of a batch at a time. Every op in the VAE is per sample, so the
result is the same up to rounding. Convolution kernels chosen by batch size round differently; the
difference stays within 1e-5.

Tiling runs the VAE on overlapping tiles and cross-fades them where they overlap. This is an
approximation. A tile's GroupNorm statistics and its mid-block attention see only the tile, and
convolutions near a tile edge see zero padding instead of the neighbouring tile. The linear
cross-fade gives each tile's edge a weight near zero, which hides the seams.
tests/test_vae_tiling.py states the measured error. An image that fits in one tile is decoded in
one piece, so its result is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussian


@dataclass
class VaeTiling:
    tile: int = 512  # tile side, in pixels
    overlap: int = 128  # pixels that neighbouring tiles share and cross-fade over

    def check(self, factor: int) -> None:
        if self.tile <= 0 or self.tile % factor:
            raise ValueError(f"VAE tile size must be a positive multiple of {factor} pixels, got {self.tile}")
        if self.overlap < 0 or self.overlap % factor or self.overlap >= self.tile:
            raise ValueError(f"VAE tile overlap must be a multiple of {factor} pixels in [0, tile), "
                             f"got {self.overlap} for tile {self.tile}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """The start of each tile that covers [0, length). Starts are spread evenly, so neighbours share
    at least `overlap` cells and no tile hangs past the end."""
    if length <= tile:
        return [0]
    n = -(-(length - overlap) // (tile - overlap))  # ceil
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramp(size: int, fade_in: int, fade_out: int) -> torch.Tensor:
    """A weight of 1 that falls linearly toward 0 over the first `fade_in` and the last `fade_out` cells.

    The values (k + 0.5) / n and (n - k - 0.5) / n add up to 1, so two tiles that fade over the same
    cells sum to 1. The blend still divides by the summed weight, because tiles spread evenly can
    overlap unevenly.
    """
    k = torch.arange(size, dtype=torch.float64) + 0.5
    w = torch.ones(size, dtype=torch.float64)
    if fade_in:
        w = torch.minimum(w, k / fade_in)
    if fade_out:
        w = torch.minimum(w, (size - k) / fade_out)
    return w.float()


def _axis(length: int, tile: int, overlap: int, scale: int) -> list[tuple[slice, slice, torch.Tensor]]:
    """For one axis: (input slice, output slice, output weights) per tile. The input is tiled in cells
    of the input grid, and `scale` is the number of output cells per input cell."""
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    out = []
    for i, s in enumerate(starts):
        fade_in = (starts[i - 1] + size - s) * scale if i > 0 else 0
        fade_out = (s + size - starts[i + 1]) * scale if i + 1 < len(starts) else 0
        out.append((slice(s, s + size), slice(s * scale, (s + size) * scale), _ramp(size * scale, fade_in, fade_out)))
    return out


def blend_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                scale: int = 1, shrink: int = 1) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of x [B, C, H, W] and cross-fade the results.

    `fn` maps an h x w tile to an (h * scale / shrink) x (w * scale / shrink) output. `tile` and
    `overlap` count input cells, and tiles start on multiples of `shrink` input cells. Output
    weights are accumulated in float32. The result has the dtype that `fn` returns.
    """
    h, w = x.shape[-2:]
    if h % shrink or w % shrink or tile % shrink or overlap % shrink:
        raise ValueError(f"tiled input {h}x{w}, tile {tile} and overlap {overlap} must be multiples of {shrink}")
    rows = _axis(h // shrink, tile // shrink, overlap // shrink, scale)
    cols = _axis(w // shrink, tile // shrink, overlap // shrink, scale)
    out = weight = None
    dtype = x.dtype
    for r_in, r_out, r_w in rows:
        for c_in, c_out, c_w in cols:
            rs, cs = slice(r_in.start * shrink, r_in.stop * shrink), slice(c_in.start * shrink, c_in.stop * shrink)
            y = fn(x[..., rs, cs])
            if out is None:
                dtype = y.dtype
                out = torch.zeros(*y.shape[:2], (h // shrink) * scale, (w // shrink) * scale, device=y.device)
                weight = torch.zeros(out.shape[-2:], device=y.device)
            mask = (r_w[:, None] * c_w[None, :]).to(y.device)
            out[..., r_out, c_out] += y.float() * mask
            weight[r_out, c_out] += mask
    return (out / weight).to(dtype)


def _per_sample(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])


def decode_latents(vae: AutoencoderKL, z: torch.Tensor, tiling: VaeTiling | None = None,
                   slicing: bool = False) -> torch.Tensor:
    """vae.decode(z) for unscaled latents z [B, C, h, w], optionally one sample at a time and/or tiled."""
    f = vae.config.downscale
    if tiling is not None:
        tiling.check(f)

    def decode(z: torch.Tensor) -> torch.Tensor:
        if tiling is None or (z.shape[-2] * f <= tiling.tile and z.shape[-1] * f <= tiling.tile):
            return vae.decode(z)  # one tile: exactly the untiled decode
        return blend_tiles(vae.decode, z, tiling.tile // f, tiling.overlap // f, scale=f)

    return _per_sample(decode, z) if slicing else decode(z)


def encode_images(vae: AutoencoderKL, x: torch.Tensor, tiling: VaeTiling | None = None,
                  slicing: bool = False) -> DiagonalGaussian:
    """vae.encode(x) for images x [B, 3, H, W] in [-1, 1], optionally one sample at a time and/or tiled.
    Tiles cross-fade the posterior's moments (its mean and log-variance)."""
    f = vae.config.downscale
    if tiling is not None:
        tiling.check(f)

    def moments(x: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(x)
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    def encode(x: torch.Tensor) -> torch.Tensor:
        if tiling is None or (x.shape[-2] <= tiling.tile and x.shape[-1] <= tiling.tile):
            return moments(x)
        return blend_tiles(moments, x, tiling.tile, tiling.overlap, shrink=f)

    if tiling is None and not slicing:
        return vae.encode(x)
    return DiagonalGaussian(_per_sample(encode, x) if slicing else encode(x))
