"""Per-layer time of a 3x3 convolution: oneDNN's direct kernel against ldm's Winograd F(2x2, 3x3)
and im2col paths.

The shapes are those of SD1.5's U-Net at 256x256 (batch 2: CFG) and of its VAE decoder at 256x256,
plus two of the default model's. This is the measurement behind the bounds in ldm/conv.py (where each
path switches on); the bounds are lifted here to time every layer.

    .venv/bin/python scripts/conv_layers.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ldm.conv as c

SHAPES = [  # (channels, height = width, batch)
    (128, 256, 1), (256, 128, 1), (512, 64, 1), (512, 32, 1),  # VAE decoder
    (320, 32, 2), (640, 16, 2), (1280, 8, 2), (1280, 4, 2),    # SD1.5 U-Net, 256 px
    (64, 16, 2), (128, 8, 2),                                  # the default model's U-Net
]


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c.MIN_CHANNELS, c.WINOGRAD_MAX_PIXELS, c.IM2COL_MAX_PIXELS = 1, 10**9, 10**9
    print("| channels | map | batch | layout | direct (ms) | Winograd (ms) | speed-up | im2col (ms) | speed-up |\n"
          "|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for ch, hw, n in SHAPES:
            conv, x = c.Conv2d(ch, ch, 3, padding=1), torch.randn(n, ch, hw, hw)
            for layout in ("NCHW", "NHWC"):
                if layout == "NHWC":
                    conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
                c.configure_convolutions(conv)
                direct = median_ms(lambda: conv(x), args.runs)
                c.configure_convolutions(conv, winograd=True)
                conv(x)  # builds the transformed kernel
                wino = median_ms(lambda: conv(x), args.runs)
                c.configure_convolutions(conv, im2col=True)
                gemm = median_ms(lambda: conv(x), args.runs)
                print(f"| {ch} | {hw}x{hw} | {n} | {layout} | {direct:.1f} | {wino:.1f} | {direct / wino:.2f}x | "
                      f"{gemm:.1f} | {direct / gemm:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
