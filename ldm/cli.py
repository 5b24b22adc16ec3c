"""The `ldm` command. Bad input ends with one `error:` line and a non-zero exit, never a traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers folder or single-file checkpoint (default: the embedded model)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt pickle files (loaded with weights_only)")
    p.add_argument("--tokenizer", type=Path, help="CLIP tokenizer folder for single-file checkpoints")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the model's")
    p.add_argument("--clip-skip", type=int, help="use the output of the k-th-from-last CLIP layer (diffusers' meaning)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None, help="Karras sigmas")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("out.png"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion: generate, img2img, convert, train.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text -> image")
    _sampling_options(gen)
    _model_options(gen)
    i2i = sub.add_parser("img2img", help="image + text -> image variation")
    i2i.add_argument("image", type=Path)
    _sampling_options(i2i)
    i2i.add_argument("--strength", type=float, default=0.8)
    _model_options(i2i)
    conv = sub.add_parser("convert", help="diffusers folder <-> single .safetensors file")
    conv.add_argument("src")
    conv.add_argument("dst", type=Path, help="a folder, or a file ending in .safetensors")
    conv.add_argument("--allow-pickle", action="store_true")
    conv.add_argument("--tokenizer", type=Path)
    conv.add_argument("--prediction-type", choices=["epsilon", "v_prediction"])
    return parser


def _load_pipeline(args: argparse.Namespace):
    import torch

    from .pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=getattr(torch, _DTYPES[args.dtype]),
                                    allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                                    prediction_type=args.prediction_type, clip_skip=args.clip_skip)
    pipe.progress = not args.quiet
    return pipe


def output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def _save_images(pipe, result, args: argparse.Namespace, extra: dict | None = None) -> None:
    from .png_info import infotext, save_png

    s = result.settings
    paths = output_paths(args.out, len(result.images))
    for i, (image, path) in enumerate(zip(result.images, paths)):
        fields = dict(extra or {})
        if len(paths) > 1:
            fields.update({"Batch size": len(paths), "Batch pos": i})
        text = infotext(s["prompt"][0], s["negative_prompt"][0], steps=s["steps"], sampler=s["sampler"],
                        karras=s["karras"], guidance_scale=s["guidance_scale"], seed=s["seed"], width=s["width"],
                        height=s["height"], model_hash=pipe.parts.hash, model_name=pipe.parts.name, extra=fields)
        save_png(image, path, text)
        print(path)


def cmd_generate(args: argparse.Namespace) -> None:
    pipe = _load_pipeline(args)
    result = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, sampler=args.sampler, karras=args.karras, eta=args.eta,
                  guidance_rescale=args.guidance_rescale, height=args.height, width=args.width, seed=args.seed,
                  num_images_per_prompt=args.num_images)
    _save_images(pipe, result, args)


def cmd_img2img(args: argparse.Namespace) -> None:
    from .pipeline import load_image

    image = load_image(args.image)  # fail on a bad image before spending time loading the model
    pipe = _load_pipeline(args)
    result = pipe.img2img(image, args.prompt, strength=args.strength, negative_prompt=args.negative,
                          num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                          karras=args.karras, eta=args.eta, guidance_rescale=args.guidance_rescale,
                          height=args.height, width=args.width, seed=args.seed,
                          num_images_per_prompt=args.num_images)
    logging.getLogger("ldm").info("img2img ran %d of %d steps (strength %g)", result.steps_run, args.steps, args.strength)
    print(f"img2img: ran {result.steps_run} of {args.steps} steps (strength {args.strength:g})", file=sys.stderr)
    _save_images(pipe, result, args, {"Denoising strength": f"{args.strength:g}"})


def cmd_convert(args: argparse.Namespace) -> None:
    from .model_io import load_model, save_diffusers_folder, save_single_file

    parts = load_model(args.src, allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                       prediction_type=args.prediction_type)
    if args.dst.suffix == ".safetensors":
        save_single_file(parts, args.dst)
    elif args.dst.suffix:
        raise ValueError(f"{args.dst}: export to a folder or a .safetensors file")
    else:
        save_diffusers_folder(parts, args.dst)
    print(args.dst)


COMMANDS = {"generate": cmd_generate, "img2img": cmd_img2img, "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .pipeline import GenerationError
    from .weights import CheckpointError

    try:
        COMMANDS[args.command](args)
    except (ValueError, CheckpointError, GenerationError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
