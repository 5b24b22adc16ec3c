"""Per-layer time of a 3x3 convolution: oneDNN's direct kernel against ldm's Winograd F(2x2, 3x3).

The shapes are those of SD1.5's U-Net at 256x256 (batch 2: CFG) and of its VAE decoder at 256x256,
plus two of the default model's. This is the measurement behind ldm.winograd.MIN_CHANNELS and
MAX_PIXELS (where the Winograd path switches on); the bounds are lifted here to time every layer.

    .venv/bin/python scripts/winograd_layers.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ldm.winograd as w

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
    w.MIN_CHANNELS, w.MAX_PIXELS = 1, 10**9
    print("| channels | map | batch | layout | direct (ms) | Winograd (ms) | speed-up |\n|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for c, hw, n in SHAPES:
            conv, x = w.Conv2d(c, c, 3, padding=1), torch.randn(n, c, hw, hw)
            for layout in ("NCHW", "NHWC"):
                if layout == "NHWC":
                    conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
                conv.winograd = False
                direct = median_ms(lambda: conv(x), args.runs)
                conv.winograd = True
                conv(x)  # builds the transformed kernel
                wino = median_ms(lambda: conv(x), args.runs)
                print(f"| {c} | {hw}x{hw} | {n} | {layout} | {direct:.1f} | {wino:.1f} | {direct / wino:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
