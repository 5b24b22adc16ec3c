"""`ldm train`, `ldm finetune` and `ldm recipe`: argparse front ends over `runner.train` and the recipes.

`register(subparsers)` adds the subcommands to the `ldm` CLI; `python -m ldm.train.commands ...`
runs them stand-alone (which is also what `accelerate launch` / `torchrun` should be pointed at).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldm.train.config import load_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", type=Path, required=True, help="checkpoints, samples, logs and the final model")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (a resumed run continues up to it)")
    p.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint or from PATH")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=16 (repeatable)")


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a VAE (stage: vae) or a U-Net (stage: unet) from a YAML config")
    p.add_argument("config", type=Path, help="YAML config, e.g. configs/default_unet.yaml")
    _common(p)
    return p


def add_finetune_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help="fine-tune a model's U-Net on captioned images (fully or with LoRA)")
    p.add_argument("--model", required=True, help="diffusers folder or single-file checkpoint")
    p.add_argument("--data", required=True, help="images + .txt captions, metadata.jsonl or metadata.csv")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the whole U-Net")
    p.add_argument("--rank", type=int, help="LoRA rank (default 4)")
    p.add_argument("--lora-format", choices=["diffusers", "kohya"],
                   help="key layout of the saved LoRA: diffusers (default) or kohya, with its ss_* metadata")
    p.add_argument("--learning-rate", type=float, help="default 1e-5, or 1e-4 with --lora")
    p.add_argument("--batch-size", type=int, help="per process (default 4)")
    p.add_argument("--resolution", type=int, help="default: the model's own resolution")
    p.add_argument("--config", type=Path, help="optional YAML with further settings (the flags above win)")
    _common(p)
    return p


def _max_steps(args: argparse.Namespace) -> list[str]:
    if args.max_steps is None:
        return []
    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    return [f"train.max_steps={args.max_steps}"]


def cmd_train(args: argparse.Namespace) -> None:
    from ldm.train.runner import train

    cfg = load_config(args.config, [*args.overrides, *_max_steps(args)])
    train(cfg, args.output_dir, resume=args.resume)


def finetune_config(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tuning defaults, then the --config YAML, then the flags the user actually gave."""
    from ldm.train.config_io import deep_merge, read_config

    for flag in ("rank", "batch_size", "resolution"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    defaults = {
        "stage": "unet",
        "data": {"resolution": None, "random_flip": True, "caption_dropout": 0.05},
        "train": {"max_steps": 1000, "batch_size": 4, "checkpoint_every": 250},
        "optim": {"learning_rate": 1e-4 if args.lora else 1e-5},
    }
    given: dict[str, Any] = {"init_from": args.model, "data": {"path": args.data}, "lora": {"enabled": bool(args.lora)}}
    flags = (("lora", "rank", args.rank), ("lora", "format", args.lora_format), ("train", "batch_size", args.batch_size),
             ("data", "resolution", args.resolution), ("optim", "learning_rate", args.learning_rate))
    for section, key, value in flags:
        if value is not None:
            given.setdefault(section, {})[key] = value
    return deep_merge(deep_merge(defaults, read_config(args.config)) if args.config else defaults, given)


def cmd_finetune(args: argparse.Namespace) -> None:
    from ldm.train.runner import train

    cfg = load_config(None, [*args.overrides, *_max_steps(args)], base=finetune_config(args))
    train(cfg, args.output_dir, resume=args.resume)


def add_recipe_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("recipe", help="rebuild a model stage by stage (done stages are skipped, a stopped one resumes)")
    p.add_argument("name", metavar="NAME", help="the recipe: default-model (the embedded default model)")
    p.add_argument("--out", type=Path, required=True, help="folder for every stage's output; the model lands in OUT/model")
    p.add_argument("--smoke", action="store_true", help="the whole chain at tiny sizes and step counts (seconds)")
    return p


def cmd_recipe(args: argparse.Namespace) -> None:
    from ldm.shapes.recipe import run_recipe

    run_recipe(args.name, args.out, smoke=args.smoke)


def register(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Adds `train`, `finetune` and `recipe` to the `ldm` CLI's subparsers; returns their handlers by name."""
    add_train_parser(subparsers)
    add_finetune_parser(subparsers)
    add_recipe_parser(subparsers)
    return {"train": cmd_train, "finetune": cmd_finetune, "recipe": cmd_recipe}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="ldm", description="ldm training commands")
    handlers = register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        handlers[args.command](args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
