"""The embedded default model: a small text-to-image model trained by this project on the procedural
shapes dataset (see ldm/default_model/MODEL_CARD.md once shipped), installed inside the package so
`ldm generate` works with no downloads."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent.parent / "default_model"  # package data: ldm/default_model/


def default_model_path() -> Path:
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise ValueError("this installation has no embedded default model yet; pass --model PATH "
                         "(a diffusers folder or a .safetensors checkpoint)")
    return DEFAULT_MODEL_DIR
