"""The `ldm` command. Bad input ends with one `error:` line and a non-zero exit, never a traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers folder or single-file checkpoint (default: the embedded model)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt pickle files (loaded with weights_only)")
    p.add_argument("--tokenizer", type=Path, help="CLIP tokenizer folder for single-file checkpoints")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override the model's")
    p.add_argument("--clip-skip", type=int, help="use the output of the k-th-from-last CLIP layer (diffusers' meaning)")
    p.add_argument("--lora", type=_lora_option, action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA file into the U-Net (repeatable)")
    perf = p.add_argument_group("speed and memory (opt-in)")
    perf.add_argument("--vae-tiling", action="store_true", help="decode/encode large images in overlapping tiles")
    perf.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    perf.add_argument("--channels-last", action="store_true")
    perf.add_argument("--fuse-qkv", action="store_true", help="one matmul for attention projections")
    wino = perf.add_mutually_exclusive_group()
    wino.add_argument("--winograd", action="store_const", const="cached", default=False,
                      help="deep 3x3 convolutions as Winograd F(2x2,3x3) (fp32 CPU; holds transformed kernels)")
    wino.add_argument("--winograd-transient", dest="winograd", action="store_const", const="transient",
                      help="Winograd where a per-call kernel transform pays; holds nothing")
    perf.add_argument("--im2col", action="store_true", help="deep 3x3 convolutions on small maps as one GEMM (fp32 CPU)")
    perf.add_argument("--compile", action="store_true", help="torch.compile the U-Net (slow first call)")
    perf.add_argument("--step-cache", type=int, metavar="N",
                      help="DeepCache-style: full U-Net every N-th call (changes the output)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")


def _lora_option(value: str) -> tuple[Path, float]:
    path, _, scale = value.partition(":")
    try:
        return Path(path), float(scale) if scale else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FILE[:scale], got '{value}'") from None


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


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line (exit 2) like every other bad input; the
    usage text stays one `--help` away."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="ldm", description="Latent diffusion: generate, img2img, convert, train.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text -> image")
    _sampling_options(gen)
    model_options(gen)
    i2i = sub.add_parser("img2img", help="image + text -> image variation")
    i2i.add_argument("image", type=Path)
    _sampling_options(i2i)
    i2i.add_argument("--strength", type=float, default=0.8)
    model_options(i2i)
    conv = sub.add_parser("convert", help="diffusers folder <-> single .safetensors file")
    conv.add_argument("src")
    conv.add_argument("dst", type=Path, help="a folder, or a file ending in .safetensors")
    conv.add_argument("--allow-pickle", action="store_true")
    conv.add_argument("--tokenizer", type=Path)
    conv.add_argument("--prediction-type", choices=["epsilon", "v_prediction"])
    data = sub.add_parser("data", help="write datasets").add_subparsers(dest="dataset", required=True)
    shapes = data.add_parser("shapes", help="the procedural captioned shapes dataset")
    shapes.add_argument("--out", type=Path, required=True)
    shapes.add_argument("--n", type=int, required=True)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--edit-pairs", type=int, default=0,
                        help="also write this many img2img pairs (an object, and the same object recoloured)")
    for name, handler in COMMANDS.items():
        sub.choices[name].set_defaults(handler=handler)
    from ldm.shapes.eval_command import register as register_eval
    from ldm.train.commands import register as register_train

    for register in (register_eval, register_train):
        for name, handler in register(sub).items():
            sub.choices[name].set_defaults(handler=handler)
    return parser


def load_pipeline(args: argparse.Namespace):
    import torch
    import transformers

    from ldm.pipeline import Pipeline, check_settings

    # settings that do not depend on the model fail before the (slow) load
    check_settings(height=8, width=8, factor=1, steps=args.steps, guidance_scale=args.guidance,
                   strength=getattr(args, "strength", None), sampler=args.sampler,
                   num_images=getattr(args, "num_images", 1))
    transformers.logging.set_verbosity_error()  # its per-file "Loading weights" bars are noise here
    transformers.logging.disable_progress_bar()

    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=getattr(torch, _DTYPES[args.dtype]),
                                    allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                                    prediction_type=args.prediction_type, clip_skip=args.clip_skip)
    from ldm.io.lora import apply_lora

    for path, scale in args.lora:
        apply_lora(pipe.parts.unet, path, scale)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if args.vae_slicing:
        pipe.enable_vae_slicing()
    if args.step_cache:
        pipe.enable_step_cache(args.step_cache)
    pipe.optimize(channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile=args.compile,
                  winograd=args.winograd, im2col=args.im2col)
    pipe.progress = not args.quiet
    return pipe


def output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def _save_images(pipe, result, args: argparse.Namespace, extra: dict | None = None) -> None:
    from ldm.io.png_info import infotext, save_png

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
    pipe = load_pipeline(args)
    result = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, sampler=args.sampler, karras=args.karras, eta=args.eta,
                  guidance_rescale=args.guidance_rescale, height=args.height, width=args.width, seed=args.seed,
                  num_images_per_prompt=args.num_images)
    _save_images(pipe, result, args)


def cmd_img2img(args: argparse.Namespace) -> None:
    from ldm.pipeline import load_image

    image = load_image(args.image)  # fail on a bad image before spending time loading the model
    pipe = load_pipeline(args)
    result = pipe.img2img(image, args.prompt, strength=args.strength, negative_prompt=args.negative,
                          num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                          karras=args.karras, eta=args.eta, guidance_rescale=args.guidance_rescale,
                          height=args.height, width=args.width, seed=args.seed,
                          num_images_per_prompt=args.num_images)
    print(f"img2img: ran {result.steps_run} of {args.steps} steps (strength {args.strength:g})", file=sys.stderr)
    _save_images(pipe, result, args, {"Denoising strength": f"{args.strength:g}"})


def cmd_convert(args: argparse.Namespace) -> None:
    from ldm.io.model_files import load_model, save_diffusers_folder, save_single_file

    parts = load_model(args.src, allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                       prediction_type=args.prediction_type)
    if args.dst.suffix == ".safetensors":
        save_single_file(parts, args.dst)
    elif args.dst.suffix:
        raise ValueError(f"{args.dst}: export to a folder or a .safetensors file")
    else:
        save_diffusers_folder(parts, args.dst)
    print(args.dst)


def cmd_data(args: argparse.Namespace) -> None:
    from ldm.shapes.dataset import write_shapes_dataset

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    print(write_shapes_dataset(args.out, args.n, seed=args.seed, edit_pairs=args.edit_pairs))


COMMANDS = {"generate": cmd_generate, "img2img": cmd_img2img, "convert": cmd_convert, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (one line, see OneLineErrorParser) and --help
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    from ldm.pipeline import GenerationError
    from ldm.io.weights import CheckpointError

    try:
        if args.command in ("train", "finetune"):
            logging.getLogger().setLevel(logging.INFO)  # per-step progress lines
        args.handler(args)
    except (ValueError, CheckpointError, GenerationError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
