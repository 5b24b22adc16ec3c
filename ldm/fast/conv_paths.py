"""Opt-in CPU paths for the 3x3 convolutions of the U-Net and VAE, applied from outside the models.

oneDNN's direct kernel on this CPU is efficient on wide, shallow maps but far from the FMA peak on
the deep, small maps of a U-Net: 1280 channels on a 4x4 map take as long as 4x the arithmetic at 320
channels on 32x32 (docs/BENCHMARKS.md). The exact alternatives (fp32 rounding only):

- im2col: one GEMM against the weight as it is stored (a view, no copy), for outputs of at most
  IM2COL_MAX_PIXELS, stride 1 or 2. It holds no extra memory.
- Winograd F(2x2, 3x3) (ldm/fast/winograd.py): 16 multiplies per 2x2 output tile instead of 36, for
  maps of at most WINOGRAD_MAX_PIXELS. "cached" keeps each layer's transformed kernel (16/9 of its
  weight) for the session; "transient" transforms the kernel on every call and keeps nothing, which
  pays only where the kernel is small enough for the transform to stay in cache
  (TRANSIENT_MAX_CHANNELS); larger layers then take im2col or the direct kernel.

All apply only to fp32 CPU inputs without gradients and at least MIN_CHANNELS input channels;
everything else, and everything by default, takes nn.Conv2d's path.

The models build plain `nn.Conv2d` layers; `configure_convolutions` turns the 3x3 ones of a model
into `PathConv2d` (same parameters, same checkpoint keys) and back, so a model file never needs to
know that these paths exist.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.fast.winograd import transform_kernel, transform_kernel_fp32, winograd_conv3x3

# Bounds measured per layer on a 2-core AVX2 CPU (scripts/conv_layers.py, docs/BENCHMARKS.md).
MIN_CHANNELS = 256
WINOGRAD_MAX_PIXELS = 32 * 32  # 1.2-1.6x at 32x32, 0.8x at 64x64, 0.4x at 256x256
IM2COL_MAX_PIXELS = 8 * 8  # output pixels: 2.2-2.4x at 8x8, 4.3-4.6x at 4x4 (also stride 2)
IM2COL_WIDE_PIXELS, IM2COL_WIDE_WEIGHTS = 16 * 16, 1920 * 640  # 1.35x for C_in x C_out >= this at 16x16
IM2COL_OVER_WINOGRAD_PIXELS = 4 * 4  # with cached Winograd on: im2col where it beats Winograd too
TRANSIENT_MAX_CHANNELS = 640  # C_in and C_out up to which a per-call kernel transform pays (1.2-1.8x)
WINOGRAD_MODES = ("cached", "transient")


def im2col_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: int = 1, padding: int = 1) -> torch.Tensor:
    """conv2d(x, weight, bias, stride, padding) as one GEMM over the 3x3 neighbourhoods.

    The columns follow the weight's memory order, so the weight is read in place: (C_in, kh, kw)
    for a contiguous weight, (kh, kw, C_in) for a channels_last one (whose output is channels_last).
    """
    n, c, h, w = x.shape
    co = weight.shape[0]
    ho, wo = (h + 2 * padding - 3) // stride + 1, (w + 2 * padding - 3) // stride + 1
    if weight.is_contiguous():
        out = weight.reshape(co, c * 9) @ F.unfold(x, 3, padding=padding, stride=stride)  # [n, co, ho*wo]
        out = out.view(n, co, ho, wo)
        return out + bias[:, None, None] if bias is not None else out
    p = padding
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, p, p, p, p))  # NHWC, padded
    rows, cols_ = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    cols = torch.cat([xp[:, i:i + rows:stride, j:j + cols_:stride, :] for i in range(3) for j in range(3)], dim=3)
    w2 = weight.permute(0, 2, 3, 1).reshape(co, 9 * c)  # a view of the channels_last weight
    flat = cols.reshape(n * ho * wo, 9 * c)
    out = torch.addmm(bias, flat, w2.t()) if bias is not None else flat @ w2.t()
    return out.view(n, ho, wo, co).permute(0, 3, 1, 2)


class PathConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and checkpoint keys) with the opt-in im2col and Winograd paths.

    Made only by `configure_convolutions`, which swaps the class of an existing layer in place. A
    cached Winograd kernel is rebuilt when the weight changes in place (optimizer step,
    load_state_dict) or is replaced (.to()).
    """
    winograd: str | None = None
    im2col: bool = False
    _kernel: torch.Tensor | None = None
    _kernel_from: tuple = ()

    def _path(self, x: torch.Tensor) -> str:
        if not (self.winograd or self.im2col) or torch.is_grad_enabled() or x.device.type != "cpu" \
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.ndim != 4 \
                or self.kernel_size != (3, 3) or self.stride not in ((1, 1), (2, 2)) \
                or self.padding not in ((1, 1), (0, 0)) or self.dilation != (1, 1) or self.groups != 1 \
                or self.padding_mode != "zeros" or self.in_channels < MIN_CHANNELS:
            return "direct"
        s, p = self.stride[0], self.padding[0]
        pixels = ((x.shape[2] + 2 * p - 3) // s + 1) * ((x.shape[3] + 2 * p - 3) // s + 1)
        cached = self.winograd == "cached"
        winograd = self.winograd is not None and (s, p) == (1, 1) and pixels <= WINOGRAD_MAX_PIXELS and (
            cached or max(self.in_channels, self.out_channels) <= TRANSIENT_MAX_CHANNELS)
        if self.im2col and pixels <= (IM2COL_OVER_WINOGRAD_PIXELS if winograd and cached else IM2COL_MAX_PIXELS):
            return "im2col"
        if winograd:
            return "winograd"
        if self.im2col and pixels <= IM2COL_WIDE_PIXELS and self.in_channels * self.out_channels >= IM2COL_WIDE_WEIGHTS:
            return "im2col"
        return "direct"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self._path(x)
        if path == "im2col":
            return im2col_conv3x3(x, self.weight, self.bias, self.stride[0], self.padding[0])
        if path == "winograd":
            if self.winograd == "transient":
                return winograd_conv3x3(x, transform_kernel_fp32(self.weight), self.bias)
            state = (self.weight.data_ptr(), self.weight._version)
            if self._kernel is None or state != self._kernel_from:
                self._kernel, self._kernel_from = transform_kernel(self.weight), state
            return winograd_conv3x3(x, self._kernel, self.bias)
        return super().forward(x)


def configure_convolutions(model: nn.Module, winograd: bool | str = False, im2col: bool = False) -> int:
    """Switches the opt-in paths of every 3x3 convolution of `model`; returns how many it has.

    winograd: False, "cached" (or True) or "transient". With both off every layer is a plain
    nn.Conv2d again.
    """
    mode = "cached" if winograd is True else winograd or None
    if mode is not None and mode not in WINOGRAD_MODES:
        raise ValueError(f"winograd must be one of {', '.join(WINOGRAD_MODES)}, got {winograd!r}")
    on = mode is not None or im2col
    count = 0
    for module in model.modules():
        if type(module) not in (nn.Conv2d, PathConv2d) or module.kernel_size != (3, 3):
            continue
        count += 1
        if on:
            module.__class__ = PathConv2d
            module.winograd, module.im2col = mode, im2col
            module._kernel, module._kernel_from = None, ()
        elif type(module) is PathConv2d:
            for name in ("winograd", "im2col", "_kernel", "_kernel_from"):
                module.__dict__.pop(name, None)
            module.__class__ = nn.Conv2d
    return count
