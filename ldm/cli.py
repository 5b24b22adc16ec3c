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
    p.add_argument("--clip-skip", type=int,
                   help="use the output of the k-th-from-last CLIP layer (diffusers' count: 1 = penultimate; "
                        "the PNG's 'Clip skip' is A1111's, one more)")
    p.add_argument("--refiner", help="SDXL refiner (folder or file) that takes over at --refiner-switch")
    p.add_argument("--lora", type=_lora_option, action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA file (kohya, LyCORIS or diffusers layout) to the U-Net and text encoder "
                        "(repeatable; weight 1, or the PNG's with --from-png)")
    p.add_argument("--lora-dir", type=Path, metavar="DIR",
                   help="where <lora:name:weight> prompt tags and a PNG's LoRAs are found (default $LDM_LORA_DIR)")
    p.add_argument("--embeddings-dir", type=Path, metavar="DIR",
                   help="textual-inversion embeddings; a file's stem in the prompt triggers it "
                        "(default $LDM_EMBEDDINGS_DIR)")
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
                      help="DeepCache-style: full U-Net every N-th call (changes the output; recorded in the PNG)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")


def _lora_option(value: str) -> tuple[Path, float | None]:
    path, sep, weight = value.rpartition(":")
    if sep:
        try:
            return Path(path), float(weight)
        except ValueError:  # a colon that is part of the path
            pass
    return Path(value), None


def _sampling_options(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that with --from-png only the options given override the PNG's settings;
    # GenerationSettings holds the real defaults.
    p.add_argument("prompt", nargs="?", help="the prompt (optional with --from-png)")
    p.add_argument("--from-png", type=Path, metavar="PNG", help="start from the settings in this PNG's infotext")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default 25)")
    p.add_argument("--sampler", help="ddpm, ddim, euler, euler_ancestral, heun, dpmpp_2m (default)")
    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None, help="Karras sigmas")
    p.add_argument("--eta", type=float, help="DDIM eta")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--guidance-rescale", type=float)
    p.add_argument("--emphasis", choices=["original", "no-norm", "none"],
                   help="A1111 prompt weighting: (word:1.2) with the mean restored (original, the default), "
                        "without (no-norm), or the text as written (none)")
    p.add_argument("--seed", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-images", type=int)
    p.add_argument("--out", type=Path, default=Path("out.png"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    xl = p.add_argument_group("SDXL conditioning (diffusers' keywords and defaults)")
    xl.add_argument("--refiner-switch", type=float, metavar="F",
                    help="with --refiner: the fraction of the schedule the base runs (default 0.8)")
    for name, what in (("original-size", "HEIGHT WIDTH"), ("target-size", "HEIGHT WIDTH"),
                       ("crops-coords-top-left", "TOP LEFT")):
        for prefix in ("", "negative-"):
            xl.add_argument(f"--{prefix}{name}", type=int, nargs=2, metavar=tuple(what.split()))
    hires = p.add_argument_group("hires fix (text-to-image)")
    hires.add_argument("--hires-scale", type=float, help="generate at the size, then upscale by this and img2img")
    hires.add_argument("--hires-steps", type=int, help="steps of the second pass (default: --steps)")
    hires.add_argument("--hires-denoise", type=float, help="denoising strength of the second pass (default 0.7)")
    hires.add_argument("--hires-upscaler", choices=["latent", "lanczos"], help="default latent")
    xl.add_argument("--aesthetic-score", type=float, help="refiner conditioning (default 6)")
    xl.add_argument("--negative-aesthetic-score", type=float, help="refiner conditioning (default 2.5)")


def _inpaint_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inpainting (A1111's controls)")
    g.add_argument("--strength", type=float, help="denoising strength (default 0.75, as A1111; 1: from pure noise)")
    g.add_argument("--mask-blur", type=int, metavar="PX", help="Gaussian blur of the mask (default 4; outpaint 8)")
    g.add_argument("--fill", choices=["original", "latent-noise", "latent-nothing", "fill"],
                   help="what the masked area starts from (A1111's masked content; default original, outpaint fill)")
    g.add_argument("--only-masked", action="store_true", default=None,
                   help="inpaint a crop around the mask at full resolution and paste it back")
    g.add_argument("--padding", type=int, metavar="PX", help="with --only-masked: pixels around the mask (default 32)")
    g.add_argument("--invert-mask", action="store_true", default=None, help="repaint where the mask is black")


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
    i2i.add_argument("--strength", type=float, help="how much of the schedule to run (default 0.8)")
    model_options(i2i)
    inp = sub.add_parser("inpaint", help="repaint where a mask is white")
    inp.add_argument("image", type=Path)
    inp.add_argument("mask", type=Path, help="white = repaint; RGBA/palette masks are converted")
    _sampling_options(inp)
    _inpaint_options(inp)
    model_options(inp)
    out = sub.add_parser("outpaint", help="grow the canvas and paint the new border")
    out.add_argument("image", type=Path)
    _sampling_options(out)
    for side in ("left", "right", "up", "down"):
        out.add_argument(f"--{side}", type=int, default=0, metavar="PX")
    _inpaint_options(out)
    model_options(out)
    info = sub.add_parser("png-info", help="print a PNG's generation settings as JSON")
    info.add_argument("png", type=Path)
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
    """The model with the command's speed and memory options; settings come from `settings_from_args`."""
    import torch
    import transformers

    from ldm.pipeline import Pipeline

    transformers.logging.set_verbosity_error()  # its per-file "Loading weights" bars are noise here
    transformers.logging.disable_progress_bar()
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=getattr(torch, _DTYPES[args.dtype]),
                                    allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                                    prediction_type=args.prediction_type, refiner=args.refiner)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if args.vae_slicing:
        pipe.enable_vae_slicing()
    pipe.optimize(channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile=args.compile,
                  winograd=args.winograd, im2col=args.im2col)
    pipe.progress = not args.quiet
    pipe.lora_dir, pipe.embeddings_dir = args.lora_dir, args.embeddings_dir
    return pipe


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def lora_refs(given: list[tuple[Path, float | None]], recorded: tuple, folder: Path | None = None) -> tuple:
    """The LoRAs to apply: the PNG's (each needs its file among --lora, matched by name, or in the
    LoRA folder) and the rest given."""
    from ldm.io.lora import find_lora, lora_dir
    from ldm.settings import LoraRef

    given = list(given)
    loras = []
    for lora in recorded:
        match = next((g for g in given if g[0].stem == lora.name), None)
        if match is None:
            where = lora_dir(folder)
            if where is None:
                raise ValueError(f"the PNG used LoRA '{lora.name}' (hash {lora.hash}): pass its file with --lora "
                                 "or its folder with --lora-dir")
            match = (find_lora(lora.name, where), None)
        else:
            given.remove(match)
        path, weight = match
        ref = LoraRef.from_file(path, lora.weight if weight is None else weight)
        if lora.hash and ref.hash != lora.hash:
            _warn(f"LoRA {path}: its hash {ref.hash} is not the PNG's {lora.hash}; the image will differ")
        loras.append(ref)
    return tuple(loras) + tuple(LoraRef.from_file(path, 1.0 if w is None else w) for path, w in given)


def settings_from_args(args: argparse.Namespace):
    """GenerationSettings from the command line (over a PNG's, with --from-png), validated."""
    from dataclasses import replace

    from ldm.io.png_info import read_parameters
    from ldm.settings import GenerationSettings

    if args.from_png is not None:
        text = read_parameters(args.from_png)
        if text is None:
            raise ValueError(f"{args.from_png}: no generation parameters in this PNG")
        base = GenerationSettings.from_infotext(text)
        if base.strength is not None and args.command == "generate":
            raise ValueError(f"{args.from_png} was made by img2img (Denoising strength {base.strength:g}): "
                             "use `ldm img2img IMAGE --from-png ...`")
    elif args.prompt is None:
        raise ValueError("give a prompt (or --from-png FILE)")
    else:
        strength = {"img2img": 0.8, "inpaint": 0.75, "outpaint": 1.0}.get(args.command)
        base = GenerationSettings(prompt=args.prompt, strength=strength)
        if args.command == "outpaint":
            base = replace(base, inpaint_fill="fill", mask_blur=8)
    settings = base.override(
        prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, sampler=args.sampler, karras=args.karras,
        eta=args.eta, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale, seed=args.seed,
        height=args.height, width=args.width, num_images=args.num_images, strength=getattr(args, "strength", None),
        clip_skip=args.clip_skip, step_cache=args.step_cache, emphasis=args.emphasis,
        loras=lora_refs(args.lora, base.loras, args.lora_dir),
        refiner_switch=args.refiner_switch, aesthetic_score=args.aesthetic_score, hires_scale=args.hires_scale,
        hires_steps=args.hires_steps, hires_denoise=args.hires_denoise, hires_upscaler=args.hires_upscaler,
        mask_blur=getattr(args, "mask_blur", None), inpaint_fill=getattr(args, "fill", None),
        only_masked=getattr(args, "only_masked", None), masked_padding=getattr(args, "padding", None),
        invert_mask=getattr(args, "invert_mask", None),
        negative_aesthetic_score=args.negative_aesthetic_score,
        **{name: tuple(getattr(args, name)) for name in _XL_PAIR_OPTIONS if getattr(args, name) is not None})
    if args.num_images is not None:  # a new batch size: every image of it is wanted
        settings = replace(settings, batch_pos=None)
    if args.command == "img2img" and settings.strength is None:  # a text-to-image PNG as the start
        settings = replace(settings, strength=0.8)
    if args.command in ("inpaint", "outpaint"):
        settings = replace(settings, inpaint=True, strength=0.75 if settings.strength is None else settings.strength)
    elif settings.inpaint:
        raise ValueError(f"{args.from_png} was made by inpainting: use `ldm inpaint IMAGE MASK --from-png ...`")
    return settings.validate()


_XL_PAIR_OPTIONS = [prefix + name for name in ("original_size", "target_size", "crops_coords_top_left")
                    for prefix in ("", "negative_")]


def output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def _generate(args: argparse.Namespace, image=None, mask=None) -> None:
    from ldm.io.png_info import save_png

    settings = settings_from_args(args)  # bad settings fail before the (slow) model load
    pipe = load_pipeline(args)
    if settings.model_hash and settings.model_hash != pipe.parts.hash:
        _warn(f"the PNG was made with model hash {settings.model_hash} ({settings.model_name}), "
              f"but {pipe.parts.name} has {pipe.parts.hash}; the image will differ")
    if settings.refiner_hash and pipe.refiner is not None and settings.refiner_hash != pipe.refiner.hash:
        _warn(f"the PNG was made with refiner hash {settings.refiner_hash} ({settings.refiner_name}), "
              f"but {pipe.refiner.name} has {pipe.refiner.hash}; the image will differ")
    result = pipe.generate(settings, image=image, mask=mask)
    if image is not None and mask is None:
        print(f"img2img: ran {result.steps_run} of {settings.steps} steps (strength {settings.strength:g})",
              file=sys.stderr)
    indices = range(len(result.images))
    if settings.batch_pos is not None:  # a PNG from a batch: the batch is regenerated, its image kept
        indices = [settings.batch_pos]
    for index, path in zip(indices, output_paths(args.out, len(indices))):
        save_png(result.images[index], path, result.image_settings(index).to_infotext())
        print(path)


def cmd_generate(args: argparse.Namespace) -> None:
    _generate(args)


def cmd_img2img(args: argparse.Namespace) -> None:
    from ldm.pipeline import load_image

    _generate(args, load_image(args.image))  # a bad image fails before the model loads


def cmd_inpaint(args: argparse.Namespace) -> None:
    from ldm.inpaint_masks import load_mask
    from ldm.pipeline import load_image

    _generate(args, load_image(args.image), load_mask(args.mask))  # bad files fail before the model loads


def cmd_outpaint(args: argparse.Namespace) -> None:
    from ldm.inpaint_masks import outpaint_canvas
    from ldm.pipeline import load_image

    settings_from_args(args)  # bad settings fail before anything else
    blur = 8 if args.mask_blur is None else args.mask_blur
    # the VAE factor is the model's; 8 (every SD/SDXL VAE) rounds any of them up to a size they accept
    canvas, mask = outpaint_canvas(load_image(args.image), args.left, args.right, args.up, args.down, 8, blur)
    _generate(args, canvas, mask)


def cmd_png_info(args: argparse.Namespace) -> None:
    import json

    from ldm.io.png_info import read_parameters
    from ldm.settings import GenerationSettings

    text = read_parameters(args.png)
    if text is None:
        raise ValueError(f"{args.png}: no generation parameters in this PNG")
    print(json.dumps(GenerationSettings.from_infotext(text).to_dict(), indent=2))


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


COMMANDS = {"generate": cmd_generate, "img2img": cmd_img2img, "inpaint": cmd_inpaint, "outpaint": cmd_outpaint, "png-info": cmd_png_info, "convert": cmd_convert,
            "data": cmd_data}


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
