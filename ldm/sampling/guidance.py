"""Classifier-free guidance as a wrapper that turns a U-Net call into a ModelFn (x, t) -> eps or v."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ldm.sampling.denoiser import ModelFn


@dataclass
class Conditioning:
    """What the U-Net is conditioned on besides x and t, for a batch of B."""
    context: torch.Tensor  # [B, L, D] text states for cross-attention
    y: torch.Tensor | None = None  # [B, F] SDXL's added vector: pooled text and embedded size ids
    concat: torch.Tensor | None = None  # [B, C, h, w] extra U-Net input channels: an inpainting model's mask + masked image

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def check_like(self, other: Conditioning) -> None:
        for name in ("context", "y", "concat"):
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
                shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
                raise ValueError(f"negative {name} shape {shape(b)} != prompt {name} shape {shape(a)}")

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        def cat(name: str) -> torch.Tensor | None:
            return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
        return Conditioning(cat("context"), cat("y"), cat("concat"))


# (x, t, conditioning) -> raw model output
UNetFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def _conditioning(c: Conditioning | torch.Tensor) -> Conditioning:
    return c if isinstance(c, Conditioning) else Conditioning(c)


def rescale_noise_cfg(guided: torch.Tensor, cond_out: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. (2023) 3.4: pull the guided output's per-sample std back toward the conditional
    output's, which undoes the over-exposure large guidance causes (diffusers' rescale_noise_cfg)."""
    dims = list(range(1, cond_out.ndim))
    rescaled = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def classifier_free_guidance(unet: UNetFn, cond: Conditioning | torch.Tensor,
                             uncond: Conditioning | torch.Tensor | None, guidance_scale: float,
                             guidance_rescale: float = 0.0) -> ModelFn:
    """A ModelFn applying classifier-free guidance to the raw model output, as diffusers' pipeline does.

    cond/uncond: the conditioning (or a bare context tensor) for a batch of B, like x; uncond holds the
    negative prompt's.
    One batched call per step with the negative half first, like diffusers. guidance_scale <= 1
    means no guidance (and no unconditional pass), also like diffusers.
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    cond = _conditioning(cond)
    if guidance_scale <= 1.0:
        def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            _check_batch(x, cond)
            return unet(x, t, cond)
        return conditional
    if uncond is None:
        raise ValueError(f"guidance_scale {guidance_scale} > 1 needs unconditional (negative prompt) context")
    uncond = _conditioning(uncond)
    cond.check_like(uncond)
    both = Conditioning.cat([uncond, cond])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_batch(x, cond)
        out_uncond, out_cond = unet(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0.0:
            out = rescale_noise_cfg(out, out_cond, guidance_rescale)
        return out
    return guided


def _check_batch(x: torch.Tensor, cond: Conditioning) -> None:
    if x.shape[0] != cond.batch:
        raise ValueError(f"latent batch {x.shape[0]} != text context batch {cond.batch}")
