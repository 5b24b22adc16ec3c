"""ldm: latent diffusion text-to-image, numerically equal to diffusers on the same weights."""
from __future__ import annotations

__all__ = ["Pipeline", "GenerationSettings", "LoraRef"]


def __getattr__(name: str):
    # lazy, so `import ldm` (and `ldm --help`) does not pay for torch/transformers start-up
    if name == "Pipeline":
        from ldm.pipeline import Pipeline
        return Pipeline
    if name in ("GenerationSettings", "LoraRef"):
        from ldm import settings
        return getattr(settings, name)
    raise AttributeError(name)
