"""Per-layer time of a 3x3 convolution: oneDNN's direct kernel against ldm's Winograd F(2x2, 3x3)
(cached kernel, and kernel transformed on every call) and im2col paths.

The shapes are every distinct 3x3 convolution of SD1.5's U-Net at 256x256 (batch 2: CFG; with the
number of such layers), the VAE decoder's at 256x256, and two of the default model's. This is the
measurement behind the bounds in ldm/fast/conv_paths.py (where each path switches on); the bounds are lifted
here to time every layer. channels_last (NHWC) layout, as with `--channels-last`.

    .venv/bin/python scripts/conv_layers.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ldm.fast.conv_paths as c

SHAPES = [  # (C_in, C_out, height = width, batch, stride, layers)
    (320, 320, 32, 2, 1, 7), (640, 320, 32, 2, 1, 2), (960, 320, 32, 2, 1, 1), (640, 640, 32, 2, 1, 1),
    (320, 320, 32, 2, 2, 1), (320, 640, 16, 2, 1, 1), (640, 640, 16, 2, 1, 6), (960, 640, 16, 2, 1, 1),
    (1280, 640, 16, 2, 1, 1), (1920, 640, 16, 2, 1, 1), (1280, 1280, 16, 2, 1, 1), (640, 640, 16, 2, 2, 1),
    (640, 1280, 8, 2, 1, 1), (1280, 1280, 8, 2, 1, 7), (1920, 1280, 8, 2, 1, 1), (2560, 1280, 8, 2, 1, 2),
    (1280, 1280, 8, 2, 2, 1), (1280, 1280, 4, 2, 1, 11), (2560, 1280, 4, 2, 1, 3),  # SD1.5 U-Net, 256 px
    (128, 128, 256, 1, 1, 1), (256, 256, 128, 1, 1, 1), (512, 512, 64, 1, 1, 1), (512, 512, 32, 1, 1, 1),  # VAE
    (64, 64, 16, 2, 1, 1), (128, 128, 8, 2, 1, 1),  # the default model's U-Net
]


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c.MIN_CHANNELS, c.WINOGRAD_MAX_PIXELS, c.IM2COL_MAX_PIXELS = 1, 10**9, 10**9
    c.TRANSIENT_MAX_CHANNELS = 10**9
    paths = {"Winograd, cached": dict(winograd="cached"), "Winograd, transient": dict(winograd="transient"),
             "im2col": dict(im2col=True)}
    print("| C_in | C_out | map | batch | stride | layers | direct (ms) | "
          + " | ".join(f"{p} (ms) | speed-up" for p in paths) + " |\n|" + "---|" * (7 + 2 * len(paths)))
    with torch.no_grad():
        for ci, co, hw, n, stride, layers in SHAPES:
            conv = torch.nn.Conv2d(ci, co, 3, stride=stride, padding=1).to(memory_format=torch.channels_last)
            x = torch.randn(n, ci, hw, hw).contiguous(memory_format=torch.channels_last)
            c.configure_convolutions(conv)
            direct = median_ms(lambda: conv(x), args.runs)
            cells = []
            for kwargs in paths.values():
                c.configure_convolutions(conv, **kwargs)
                if conv._path(x) == "direct":  # Winograd is stride 1 only
                    cells.append("| ")
                    continue
                ms = median_ms(lambda: conv(x), args.runs)
                cells.append(f"{ms:.1f} | {direct / ms:.2f}x")
            print(f"| {ci} | {co} | {hw}x{hw} | {n} | {stride} | {layers} | {direct:.1f} | " + " | ".join(cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
