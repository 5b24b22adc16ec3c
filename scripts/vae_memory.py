"""Peak memory (RSS) and time of one VAE decode at a large size, with or without tiling.

Issue 5 sets a target: a 2048x2048 decode on CPU, with tiling and the SD VAE architecture
(128/256/512/512), must stay under 8 GB peak RSS. The weights are random unless --model is given.
Peak RSS is the process's high-water mark (getrusage), so it includes the weights and the Python
runtime. The script exits with status 1 when the peak is over --limit-gb.

    .venv/bin/python scripts/vae_memory.py --resolution 2048                  # the target, about minutes
    .venv/bin/python scripts/vae_memory.py --resolution 256 --tile 128 --compare   # smoke test

--compare then runs the untiled decode too, and reports how far the tiled image is from it. That is
the quality cost of tiling. Memory is measured before the comparison runs, but the untiled decode
needs memory for the whole image.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.fast.vae_tiling import VaeTiling, decode_latents


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def load_vae(model: str | None) -> AutoencoderKL:
    if model is None:
        torch.manual_seed(0)
        return AutoencoderKL(AutoencoderConfig()).eval()  # the defaults are SD's VAE architecture
    from ldm.io.model_files import load_model
    return load_model(model).vae.eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two decoded images, each mapped from [-1, 1] to [0, 1] the way the pipeline maps them."""
    mse = ((a / 2 + 0.5).clamp(0, 1) - (b / 2 + 0.5).clamp(0, 1)).pow(2).mean().item()
    return math.inf if mse == 0 else -10 * math.log10(mse)  # inf: identical (written as null in the JSON)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=2048, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tile", type=int, default=512, help="tile side in pixels")
    ap.add_argument("--overlap", type=int, default=128, help="tile overlap in pixels")
    ap.add_argument("--no-tiling", action="store_true", help="measure the plain decode instead")
    ap.add_argument("--compare", action="store_true", help="afterwards, also decode untiled and report the error")
    ap.add_argument("--model", help="a model folder or checkpoint whose VAE to use (default: random SD VAE)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--limit-gb", type=float, default=8.0, help="exit with status 1 above this peak RSS")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    vae = load_vae(args.model)
    f = vae.config.downscale
    if args.resolution <= 0 or args.resolution % f:
        ap.error(f"--resolution must be a positive multiple of {f}")
    tiling = None if args.no_tiling else VaeTiling(args.tile, args.overlap)
    if tiling is not None:
        try:
            tiling.check(f)
        except ValueError as e:
            ap.error(str(e))
    latent = args.resolution // f
    z = torch.randn(args.batch, vae.config.latent_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    baseline = peak_rss_gb()
    with torch.inference_mode():
        start = time.perf_counter()
        image = decode_latents(vae, z, tiling)
        seconds = time.perf_counter() - start
    peak = peak_rss_gb()
    report = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__, "resolution": args.resolution, "batch": args.batch,
        "tiling": None if tiling is None else {"tile": tiling.tile, "overlap": tiling.overlap},
        "vae": args.model or "random SD VAE (128/256/512/512)", "decode_s": round(seconds, 2),
        "peak_rss_gb": round(peak, 3), "rss_before_decode_gb": round(baseline, 3), "limit_gb": args.limit_gb,
        "under_limit": peak <= args.limit_gb, "finite": bool(torch.isfinite(image).all()),
    }
    if args.compare and tiling is not None:
        with torch.inference_mode():
            plain = vae.decode(z)
        err = (image - plain).abs()
        report["vs_untiled"] = {"max_abs": err.max().item(), "mean_abs": err.mean().item(),
                                "psnr_db": _finite_or_none(round(psnr(image, plain), 2))}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    sys.exit(0 if report["under_limit"] and report["finite"] else 1)


if __name__ == "__main__":
    main()
