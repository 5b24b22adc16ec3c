"""How far each sampler lands from the converged answer, as a function of its number of function
evaluations (NFE): latent MSE against a high-step reference, with the same model, prompt and
starting noise for every run.

The reference solves the same probability-flow ODE with many steps (heun, 500 steps = 999 NFE by
default). Its own error is estimated as its distance to the same solver at half the steps, and the
report gives it as the floor. By default every sampler uses "trailing" timestep spacing, so all of
them start from the same top noise level as the reference. Every run also starts from the same VE
point x = noise * sqrt(1 + sigma_max^2). Without that, the Euler family would start from
noise * sigma_max, which is diffusers' convention, and would solve a slightly different ODE.

Stochastic samplers (euler_ancestral, ddpm) converge to a different sample, not to the ODE
solution, so their error settles at a plateau. DDIM stops at t = 0, which is not sigma = 0, so it
also has a small floor.

--step-cache adds the DeepCache-style cached U-Net (ldm.models.unet.StepCache) to chosen samplers. Their
rows show the quality cost of caching at equal NFE. The full_unet column counts only the calls that
ran the whole U-Net.

    .venv/bin/python scripts/sampler_error.py --model PATH --out docs/sampler_error
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from ldm.pipeline import Pipeline
from ldm.sampling.plan import plan_sampling
from ldm.sampling.samplers import SAMPLERS

logger = logging.getLogger("sampler_error")
STOCHASTIC = {"euler_ancestral", "ddpm"}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def start_latents(pipe: Pipeline, noise: torch.Tensor, sampler: str, steps: int, karras: bool) -> torch.Tensor:
    """The `latents` argument that makes the pipeline start `sampler` from the VE point noise * sqrt(1 + sigma^2)."""
    plan = plan_sampling(pipe.parts.schedule, sampler, steps, karras=karras)
    sigma = plan.sigmas[0].item()
    if math.isinf(sigma):  # zero terminal SNR on DDIM/DDPM: they start from the VP noise itself
        return noise
    ve_per_latent = plan.init_noise_sigma * (math.sqrt(1 + sigma**2) if plan.vp_latents else 1.0)
    return noise * (math.sqrt(1 + sigma**2) / ve_per_latent)


def run(pipe: Pipeline, noise: torch.Tensor, sampler: str, steps: int, args: argparse.Namespace,
        cache: int | None = None) -> tuple[torch.Tensor, int, float]:
    """Final latents (float64), NFE, and wall seconds for one sampling run."""
    if cache is None:
        pipe.disable_step_cache()
    else:
        pipe.enable_step_cache(cache)
    latents = start_latents(pipe, noise, sampler, steps, args.karras)
    start = time.perf_counter()
    out = pipe(args.prompt, num_inference_steps=steps, guidance_scale=args.guidance, sampler=sampler,
               height=args.resolution, width=args.resolution, latents=latents, seed=args.seed,
               karras=args.karras, output_type="latent").images
    seconds = time.perf_counter() - start
    nfe = plan_sampling(pipe.parts.schedule, sampler, steps, karras=args.karras).model_evaluations
    return out.double(), nfe, seconds


def markdown(rows: list[dict], steps: list[int], floor: float) -> str:
    """One row per sampler (and cache setting), one column per step count: MSE (NFE)."""
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name in names:
        cells = {r["steps"]: f"{r['mse']:.2e} ({r['nfe']})" for r in rows if r["sampler"] == name}
        tag = " (stochastic)" if name in STOCHASTIC else ""
        lines.append(f"| {name}{tag} | " + " | ".join(cells.get(s, "n/a") for s in steps) + " |")
    lines.append(f"\nCells: latent MSE against the reference (NFE). Reference floor (its distance to the same "
                 f"solver at half the steps): {floor:.2e}.")
    return "\n".join(lines)


def plot(rows: list[dict], floor: float, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        pts = [(r["nfe"], r["mse"]) for r in rows if r["sampler"] == name]
        ax.loglog(*zip(*pts), marker="o", linestyle="--" if name in STOCHASTIC else "-", label=name)
    ax.axhline(floor, color="grey", linewidth=0.8, label="reference floor")
    ax.set_xlabel("function evaluations (NFE)")
    ax.set_ylabel("latent MSE vs reference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder or checkpoint (default: the embedded default model)")
    ap.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated")
    ap.add_argument("--steps", default="5,10,20,50,100",
                    help="comma-separated step counts (divisors of 1000 keep DDIM on its timestep grid)")
    ap.add_argument("--reference-sampler", default=None,
                    help="default heun; dpmpp_2m for zero-terminal-SNR models, which heun cannot sample")
    ap.add_argument("--reference-steps", type=int, default=500)
    ap.add_argument("--spacing", default="trailing", choices=["trailing", "linspace", "leading", "config"],
                    help="timestep spacing for every sampler ('config': the model's own)")
    ap.add_argument("--karras", action="store_true", help="Karras noise levels for every sampler")
    ap.add_argument("--step-cache", default="2,3", help="comma-separated step-cache intervals to add ('': none)")
    ap.add_argument("--cache-samplers", default="dpmpp_2m,euler", help="samplers to run with --step-cache")
    ap.add_argument("--prompt", default="a red circle above a blue square")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("sampler_error"), help="writes <out>.csv, .md, .png")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    samplers = [s for s in args.samplers.split(",") if s]
    for name in samplers + [args.reference_sampler or ""] + args.cache_samplers.split(","):
        if name and name not in SAMPLERS:
            ap.error(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    if args.reference_sampler in STOCHASTIC:
        ap.error("the reference must be a deterministic sampler")
    pipe = Pipeline.from_pretrained(args.model)
    pipe.progress = False
    zero_snr = pipe.parts.schedule.rescale_betas_zero_snr
    args.reference_sampler = args.reference_sampler or ("dpmpp_2m" if zero_snr else "heun")
    if zero_snr:  # heun refuses these models
        samplers = [s for s in samplers if s != "heun"]
    if args.spacing != "config":
        pipe.parts.schedule = dataclasses.replace(pipe.parts.schedule, timestep_spacing=args.spacing)
    f = pipe.vae_scale_factor
    args.resolution = args.resolution or pipe.parts.unet.config.sample_size * f
    shape = (1, pipe.parts.unet.config.in_channels, args.resolution // f, args.resolution // f)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))

    logger.info("reference: %s, %d steps", args.reference_sampler, args.reference_steps)
    ref, ref_nfe, _ = run(pipe, noise, args.reference_sampler, args.reference_steps, args)
    half, _, _ = run(pipe, noise, args.reference_sampler, args.reference_steps // 2, args)
    floor = (half - ref).pow(2).mean().item()
    scale = ref.pow(2).mean().item()

    steps = ints(args.steps)
    jobs = [(s, None) for s in samplers]
    jobs += [(s, c) for c in ints(args.step_cache) for s in args.cache_samplers.split(",") if s]
    rows = []
    for sampler, cache in jobs:
        for n in steps:
            out, nfe, seconds = run(pipe, noise, sampler, n, args, cache)
            mse = (out - ref).pow(2).mean().item()
            rows.append({"sampler": sampler if cache is None else f"{sampler}+cache{cache}", "steps": n, "nfe": nfe,
                         "full_unet": nfe if cache is None else -(-nfe // cache), "mse": mse,
                         "relative_mse": mse / scale, "seconds": round(seconds, 3)})
            logger.info("%-22s steps %3d  NFE %3d  MSE %.3e", rows[-1]["sampler"], n, nfe, mse)
    pipe.disable_step_cache()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    settings = (f"Model `{args.model or 'default'}`, {args.resolution}x{args.resolution} px, guidance "
                f"{args.guidance}, seed {args.seed}, spacing {args.spacing}{', Karras' if args.karras else ''}; "
                f"reference {args.reference_sampler} x {args.reference_steps} steps ({ref_nfe} NFE), "
                f"mean squared reference latent {scale:.3g}.")
    table = settings + "\n\n" + markdown(rows, steps, floor)
    args.out.with_suffix(".md").write_text(table + "\n")
    plotted = plot(rows, floor, args.out.with_suffix(".png"))
    print(table)
    print(f"\nwrote {args.out.with_suffix('.csv')}, {args.out.with_suffix('.md')}"
          + (f", {args.out.with_suffix('.png')}" if plotted else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
