"""`ldm eval shapes`: prompt fidelity of a model on the shapes world, scored from pixels, as JSON."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ldm.cli import load_pipeline, model_options


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    ev = sub.add_parser("eval", help="score a model").add_subparsers(dest="benchmark", required=True)
    ev_shapes = ev.add_parser("shapes", help="prompt fidelity on the shapes world, scored from pixels (JSON)")
    ev_shapes.add_argument("--steps", type=int, default=25)
    ev_shapes.add_argument("--sampler", default="dpmpp_2m")
    ev_shapes.add_argument("--guidance", type=float, default=7.5)
    ev_shapes.add_argument("--guidance-rescale", type=float, default=0.0,
                           help="CFG rescale (Lin et al.; 0.7 is usual for zero-terminal-SNR models)")
    ev_shapes.add_argument("--n", type=int, default=50, help="prompts per category")
    ev_shapes.add_argument("--seed", type=int, default=0)
    ev_shapes.add_argument("--save-images", type=Path, help="folder for every generated image, marked ok/fail")
    ev_shapes.add_argument("--quiet", action="store_true")
    ev_shapes.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None)
    model_options(ev_shapes)
    return {"eval": run_eval}


def run_eval(args: argparse.Namespace) -> None:
    import json

    from ldm.shapes.evaluate import run_shapes_eval

    pipe = load_pipeline(args)
    pipe.progress = False  # one bar over the whole evaluation instead of one per image
    size = pipe.parts.unet.config.sample_size * pipe.vae_scale_factor
    options = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                   karras=args.karras, guidance_rescale=args.guidance_rescale, output_type="np")

    def generate(prompt: str, seed: int):
        return pipe(prompt, seed=seed, height=size, width=size, **options).images[0]

    def img2img(image, prompt: str, strength: float, seed: int):
        from PIL import Image
        return pipe.img2img(Image.fromarray(image), prompt, strength=strength, seed=seed, **options).images[0]

    scores = run_shapes_eval(generate, img2img, n=args.n, seed=args.seed, progress=not args.quiet,
                             save_dir=args.save_images, resolution=size)
    scores.update(model=pipe.parts.name, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                  guidance_rescale=args.guidance_rescale)
    print(json.dumps(scores, indent=2))
