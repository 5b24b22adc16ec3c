"""3x3 convolutions as Winograd F(2x2, 3x3) on the CPU: 16 multiplies per 2x2 output tile instead of 36.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015). Each 4x4 input tile d and
each 3x3 kernel g are transformed (V = B^T d B, U = G g G^T); the convolution becomes 16 independent
matrix products over channels, M[k] = V[k] @ U[k], and each output tile is A^T M A. The transforms
have entries 0, +-1/2, +-1, so in fp32 the result differs from a direct convolution by rounding only
(about 1e-6 relative; tests/test_winograd.py). oneDNN's CPU convolutions on AVX2 have no Winograd
path, which is why this wins there; on CUDA cuDNN already chooses its own algorithms, so this path is
CPU-only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)
# vec(B^T d B) = (B^T kron B^T) vec(d): both input-transform passes as one small matmul, same for output
_IN = torch.kron(_BT, _BT).float()    # [16, 16]
_OUT = torch.kron(_AT, _AT).float()   # [4, 16]


def transform_kernel(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> U: [16, C_in, C_out], computed in float64 so only the product rounds."""
    u = torch.einsum("ap,oipq,bq->abio", _G, weight.detach().double(), _G)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, stride=1, padding=1) with U = transform_kernel(weight).

    Keeps x's memory format: a channels_last input gives a channels_last output.
    """
    n, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2  # odd sizes: compute one extra row/column and crop it
    # NHWC, zero-padded by 1 (plus 1 on the far side for odd sizes): a channels_last input permutes for free
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
    tiles = torch.stack([xp[:, p:p + 2 * th:2, q:q + 2 * tw:2, :] for p in range(4) for q in range(4)])
    v = (_IN @ tiles.reshape(16, -1)).reshape(16, n * th * tw, c)
    m = torch.bmm(v, u)  # [16, tiles, C_out]: the only O(C_in * C_out) work
    co = u.shape[2]
    y = (_OUT @ m.reshape(16, -1)).reshape(2, 2, n, th, tw, co)  # [row in tile, col in tile, n, ti, tj, co]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = _add_bias_contiguous(y.permute(2, 3, 0, 4, 1, 5), bias, bias)  # n, ti, a, tj, b, co
        return y.reshape(n, 2 * th, 2 * tw, co)[:, :h, :w].permute(0, 3, 1, 2)
    y = y.permute(2, 5, 3, 0, 4, 1)  # n, co, ti, a, tj, b
    y = _add_bias_contiguous(y, bias, bias[:, None, None, None, None] if bias is not None else None)
    y = y.reshape(n, co, 2 * th, 2 * tw)
    return y[:, :, :h, :w] if (2 * th, 2 * tw) != (h, w) else y


def _add_bias_contiguous(y: torch.Tensor, bias: torch.Tensor | None, shaped: torch.Tensor | None) -> torch.Tensor:
    # one pass that both adds the bias and lays the tiles out in output order (an elementwise op on
    # a permuted view would keep the permuted strides and need another copy to reshape)
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    return torch.add(y, shaped, out=out) if bias is not None else out.copy_(y)

class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and checkpoint keys) that can run its 3x3 case as Winograd.

    Off by default (`winograd = False`); `configure_convolutions` switches it on. It then applies to
    fp32 CPU inputs without gradients; anything else (training, CUDA, half precision, other kernel
    shapes) takes the ordinary path. The transformed kernel is cached and rebuilt when the weight
    changes in place (optimizer step, load_state_dict) or is replaced (.to()).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.winograd = False
        self._kernel: torch.Tensor | None = None
        self._kernel_from: tuple = ()

    def _eligible(self, x: torch.Tensor) -> bool:
        return (self.winograd and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.weight.dtype == torch.float32 and x.ndim == 4
                and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._eligible(x):
            return super().forward(x)
        state = (self.weight.data_ptr(), self.weight._version)
        if self._kernel is None or state != self._kernel_from:
            self._kernel, self._kernel_from = transform_kernel(self.weight), state
        return winograd_conv3x3(x, self._kernel, self.bias)


def configure_convolutions(model: nn.Module, winograd: bool) -> int:
    """Switches Winograd on or off for every `Conv2d` of `model`; returns how many can use it."""
    count = 0
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.winograd = winograd
            module._kernel, module._kernel_from = None, ()
            count += module.kernel_size == (3, 3) and module.stride == (1, 1)
    return count
