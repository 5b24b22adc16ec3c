"""The 3x3 convolution of every U-Net and VAE block, with two opt-in CPU paths that need less time.

oneDNN's direct kernel on AVX2 is efficient on wide, shallow maps but far from the FMA peak on the
deep, small maps of a U-Net: 1280 channels on a 4x4 map take as long as 4x the arithmetic at 320
channels on 32x32 (docs/BENCHMARKS.md). Two exact alternatives (fp32 rounding only):

- im2col: one GEMM against the weight as it is stored (a view, no copy), for maps of at most
  IM2COL_MAX_PIXELS. It holds no extra memory.
- Winograd F(2x2, 3x3) (ldm/winograd.py): 16 multiplies per 2x2 output tile instead of 36, for
  maps of at most WINOGRAD_MAX_PIXELS; its transformed kernels (16/9 of the weight) stay cached.

Both apply only to fp32 CPU inputs without gradients and at least MIN_CHANNELS input channels;
everything else, and everything by default, takes nn.Conv2d's path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .winograd import transform_kernel, winograd_conv3x3

# Bounds measured per layer on a 2-core AVX2 CPU (scripts/conv_layers.py, docs/BENCHMARKS.md).
MIN_CHANNELS = 256
WINOGRAD_MAX_PIXELS = 32 * 32  # 1.2-1.6x at 32x32, 0.8x at 64x64, 0.4x at 256x256
IM2COL_MAX_PIXELS = 8 * 8  # 1.9x at 8x8, 3.9x at 4x4, 0.8x at 16x16
IM2COL_OVER_WINOGRAD_PIXELS = 4 * 4  # with both on: im2col where it beats Winograd too (5.5 vs 7.6 ms)


def im2col_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, stride=1, padding=1) as one GEMM over the 3x3 neighbourhoods.

    The columns follow the weight's memory order, so the weight is read in place: (C_in, kh, kw)
    for a contiguous weight, (kh, kw, C_in) for a channels_last one (whose output is channels_last).
    """
    n, c, h, w = x.shape
    co = weight.shape[0]
    if weight.is_contiguous():
        out = weight.reshape(co, c * 9) @ F.unfold(x, 3, padding=1)  # [n, co, h*w]
        out = out.view(n, co, h, w)
        return out + bias[:, None, None] if bias is not None else out
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # NHWC, padded
    cols = torch.cat([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], dim=3)
    w2 = weight.permute(0, 2, 3, 1).reshape(co, 9 * c)  # a view of the channels_last weight
    flat = cols.reshape(n * h * w, 9 * c)
    out = torch.addmm(bias, flat, w2.t()) if bias is not None else flat @ w2.t()
    return out.view(n, h, w, co).permute(0, 3, 1, 2)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and checkpoint keys) with the opt-in im2col and Winograd paths.

    `configure_convolutions` switches them. Winograd's transformed kernel is cached and rebuilt when
    the weight changes in place (optimizer step, load_state_dict) or is replaced (.to()).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.winograd = False
        self.im2col = False
        self._kernel: torch.Tensor | None = None
        self._kernel_from: tuple = ()

    def _path(self, x: torch.Tensor) -> str:
        if not (self.winograd or self.im2col) or torch.is_grad_enabled() or x.device.type != "cpu" \
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.ndim != 4 \
                or self.kernel_size != (3, 3) or self.stride != (1, 1) or self.padding != (1, 1) \
                or self.dilation != (1, 1) or self.groups != 1 or self.padding_mode != "zeros" \
                or self.in_channels < MIN_CHANNELS:
            return "direct"
        pixels = x.shape[2] * x.shape[3]
        if self.im2col and pixels <= (IM2COL_OVER_WINOGRAD_PIXELS if self.winograd else IM2COL_MAX_PIXELS):
            return "im2col"
        if self.winograd and pixels <= WINOGRAD_MAX_PIXELS:
            return "winograd"
        return "direct"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self._path(x)
        if path == "im2col":
            return im2col_conv3x3(x, self.weight, self.bias)
        if path == "winograd":
            state = (self.weight.data_ptr(), self.weight._version)
            if self._kernel is None or state != self._kernel_from:
                self._kernel, self._kernel_from = transform_kernel(self.weight), state
            return winograd_conv3x3(x, self._kernel, self.bias)
        return super().forward(x)


def configure_convolutions(model: nn.Module, winograd: bool = False, im2col: bool = False) -> int:
    """Switches the opt-in paths of every `Conv2d` of `model`; returns how many 3x3 layers it has."""
    count = 0
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.winograd, module.im2col = winograd, im2col
            module._kernel, module._kernel_from = None, ()
            count += module.kernel_size == (3, 3) and module.stride == (1, 1)
    return count
