"""3x3 convolutions as Winograd F(2x2, 3x3) on the CPU: 16 multiplies per 2x2 output tile instead of 36.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015). Each 4x4 input tile d and
each 3x3 kernel g are transformed (V = B^T d B, U = G g G^T); the convolution becomes 16 independent
matrix products over channels, M[k] = V[k] @ U[k], and each output tile is A^T M A. The transforms
have entries 0, +-1/2, +-1, so in fp32 the result differs from a direct convolution by rounding only
(about 1e-6 relative; tests/test_conv_paths.py). oneDNN's CPU convolutions on AVX2 have no Winograd
path, which is why this wins there; on CUDA cuDNN already chooses its own algorithms, so this path is
CPU-only. ldm.fast.conv_paths.Conv2d decides where it is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)
# vec(B^T d B) = (B^T kron B^T) vec(d): both input-transform passes as one small matmul, same for output
_IN = torch.kron(_BT, _BT).float()    # [16, 16]
_OUT = torch.kron(_AT, _AT).float()   # [4, 16]


# [16, 9]: vec(G g G^T) = (G kron G) vec(g). Its entries (0, +-1/4, +-1/2, 1) are exact in fp32, so
# the per-call fp32 transform uses it as is and the float64 one widens it exactly.
_KERNEL = torch.kron(_G, _G).float()


def transform_kernel(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> U: [16, C_in, C_out], computed in float64 so only the product rounds
    (the cached kernel: built once, kept contiguous)."""
    return transform_kernel_fp32(weight.double()).to(weight.dtype).contiguous()


def transform_kernel_fp32(weight: torch.Tensor) -> torch.Tensor:
    """transform_kernel in the weight's own precision, as one small matmul per output channel, for a
    kernel that is transformed on every call and not kept. Its entries are sums of at most 9 weights
    times powers of two, so in fp32 it rounds a little (~1e-7 relative) where float64 does not.

    Returns a [16, C_in, C_out] view of a [C_out, 16, C_in] buffer: each of the 16 matrices has unit
    stride along C_in, which the batched GEMM takes as a transposed operand, with no copy."""
    co, ci = weight.shape[:2]
    u = torch.matmul(_KERNEL.to(weight.dtype), weight.detach().permute(0, 2, 3, 1).reshape(co, 9, ci))
    return u.permute(1, 2, 0)


# Bound on each transform buffer. Large feature maps (a VAE decoding 512 px and up) are done in
# bands of tile rows, so the transient memory stays near this instead of ~4x the input per buffer.
BAND_BYTES = 32 * 2**20


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, stride=1, padding=1) with U = transform_kernel(weight).

    Keeps x's memory format: a channels_last input gives a channels_last output.
    """
    n, c, h, w = x.shape
    co = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2  # odd sizes: compute one extra row/column and crop it
    # NHWC, zero-padded by 1 (plus 1 on the far side for odd sizes): a channels_last input permutes for free
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = x.new_empty((n, 2 * th, 2 * tw, co) if nhwc else (n, co, 2 * th, 2 * tw))
    shaped_bias = None if bias is None else bias if nhwc else bias[:, None, None, None, None]
    band = max(1, BAND_BYTES // (16 * n * tw * max(c, co) * x.element_size()))
    for r0 in range(0, th, band):
        rows = min(band, th - r0)
        y = _tile_rows(xp[:, 2 * r0:2 * (r0 + rows) + 2], u, rows, tw)  # [a, b, n, ti, tj, co]
        # adding the bias and laying the tiles out in output order is one pass, straight into `out`
        if nhwc:
            dst, src = out[:, 2 * r0:2 * (r0 + rows)].view(n, rows, 2, tw, 2, co), y.permute(2, 3, 0, 4, 1, 5)
        else:
            dst, src = out[:, :, 2 * r0:2 * (r0 + rows)].view(n, co, rows, 2, tw, 2), y.permute(2, 5, 3, 0, 4, 1)
        torch.add(src, shaped_bias, out=dst) if bias is not None else dst.copy_(src)
    if nhwc:
        return out[:, :h, :w].permute(0, 3, 1, 2)
    return out[:, :, :h, :w] if (2 * th, 2 * tw) != (h, w) else out


def _tile_rows(xp: torch.Tensor, u: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """Output tiles [2, 2, N, th, tw, C_out] of the padded NHWC rows `xp` (2 * th + 2 of them)."""
    n, c = xp.shape[0], xp.shape[3]
    tiles = torch.stack([xp[:, p:p + 2 * th:2, q:q + 2 * tw:2, :] for p in range(4) for q in range(4)])
    v = (_IN @ tiles.reshape(16, -1)).reshape(16, n * th * tw, c)
    m = torch.bmm(v, u)  # [16, tiles, C_out]: the only O(C_in * C_out) work
    return (_OUT @ m.reshape(16, -1)).reshape(2, 2, n, th, tw, u.shape[2])
