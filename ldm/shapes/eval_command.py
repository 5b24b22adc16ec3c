"""`ldm eval shapes`: prompt fidelity of a model on the shapes world, scored from pixels, as JSON."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
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
    ev_shapes.add_argument("--seed", type=int, default=0, help="which seeded prompt set to draw (--prompt-set seeded)")
    ev_shapes.add_argument("--prompt-set", choices=["seeded", "frozen"], default="seeded",
                           help="seeded: drawn from --seed; frozen: the committed set no stage was selected on")
    ev_shapes.add_argument("--json-out", type=Path, metavar="FILE", help="also write the JSON result to FILE")
    ev_shapes.add_argument("--save-images", type=Path, help="folder for every generated image, marked ok/fail")
    ev_shapes.add_argument("--quiet", action="store_true")
    ev_shapes.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None)
    model_options(ev_shapes)
    return {"eval": run_eval}


def run_eval(args: argparse.Namespace) -> None:
    import json

    from ldm.io.weights import write_text_atomic
    from ldm.shapes.evaluate import run_shapes_eval
    from ldm.shapes.prompt_sets import eval_cases, frozen_cases

    # the prompt set first: a bad --n fails before the (slow) load
    frozen = args.prompt_set == "frozen"
    cases = frozen_cases(args.n) if frozen else eval_cases(args.n, args.seed)
    base = eval_settings(args)  # bad settings fail before the load too
    pipe = load_pipeline(args)
    pipe.progress = False  # one bar over the whole evaluation instead of one per image
    size = pipe.parts.unet.config.sample_size * pipe.vae_scale_factor
    base = replace(base, width=size, height=size)

    def generate(prompt: str, seed: int):
        return pipe.generate(replace(base, prompt=prompt, seed=seed), output_type="np").images[0]

    def img2img(image, prompt: str, strength: float, seed: int):
        from PIL import Image
        settings = replace(base, prompt=prompt, seed=seed, strength=strength, width=None, height=None)
        return pipe.generate(settings, image=Image.fromarray(image), output_type="np").images[0]

    scores = run_shapes_eval(generate, img2img, n=args.n, seed=None if frozen else args.seed, progress=not args.quiet,
                             save_dir=args.save_images, resolution=size, cases=cases)
    scores.update(prompt_set=args.prompt_set, **run_identity(args, pipe, base))
    text = json.dumps(scores, indent=2)
    print(text)
    if args.json_out is not None:
        write_text_atomic(args.json_out, text + "\n")


# meant to leave the images as they are, but recorded: float rounding may differ
_SPEED_PATHS = ("vae_tiling", "vae_slicing", "channels_last", "fuse_qkv", "winograd", "im2col", "compile")


def eval_settings(args: argparse.Namespace):
    """The settings every case shares; each case sets its prompt, seed (and strength)."""
    from ldm.cli import lora_refs
    from ldm.settings import GenerationSettings

    return GenerationSettings(
        prompt="", steps=args.steps, sampler=args.sampler, karras=args.karras, guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale, clip_skip=args.clip_skip, step_cache=args.step_cache,
        loras=lora_refs(args.lora, ())).validate()


def run_identity(args: argparse.Namespace, pipe, settings) -> dict:
    """What besides the prompt set decides the numbers: the model and every setting that changes an image."""
    from datetime import date
    from importlib.metadata import PackageNotFoundError, version

    try:
        ldm_version = version("ldm")
    except PackageNotFoundError:
        ldm_version = None
    return dict(model=pipe.parts.name, model_hash=pipe.parts.hash, steps=args.steps, sampler=args.sampler,
                guidance=args.guidance, guidance_rescale=args.guidance_rescale, karras=args.karras,
                lora=[[str(lora.path), lora.weight, lora.hash] for lora in settings.loras], clip_skip=args.clip_skip,
                prediction_type=args.prediction_type, step_cache=args.step_cache, dtype=args.dtype,
                device=args.device, speed_paths=[k for k in _SPEED_PATHS if getattr(args, k)],
                ldm_version=ldm_version, date=date.today().isoformat())
