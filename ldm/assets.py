"""A generation's community assets, found from its settings: the LoRAs its prompt tags name and the
textual-inversion embeddings its prompts use, recorded back into the settings for the infotext.

The pipeline calls these once per generation; the files are looked up in the LoRA and embeddings
folders (`--lora-dir` / $LDM_LORA_DIR, `--embeddings-dir` / $LDM_EMBEDDINGS_DIR).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from ldm.io.embeddings import embeddings_dir, embeddings_in
from ldm.io.lora import find_lora, lora_dir
from ldm.settings import EmbeddingRef, GenerationSettings, LoraRef, split_lora_tags
from ldm.text import TextEncoder

logger = logging.getLogger(__name__)


def take_lora_tags(settings: GenerationSettings, folder: Path | None) -> GenerationSettings:
    """A1111's `<lora:name:w>` tags cut out of the prompts, each a LoRA found in the LoRA folder."""
    prompts, tags = [], {}
    for prompt in settings.prompts:
        text, found = split_lora_tags(prompt)
        prompts.append(text)
        for name, weight in found:
            if tags.setdefault(name, weight) != weight:
                raise ValueError(f"the prompts give LoRA '{name}' two weights ({tags[name]:g} and {weight:g})")
    if not tags:
        return settings
    where = lora_dir(folder)
    loras = settings.loras + tuple(LoraRef.from_file(find_lora(name, where), w) for name, w in tags.items())
    return replace(settings, prompt=prompts[0] if isinstance(settings.prompt, str) else prompts, loras=loras)


def prompt_embeddings(settings: GenerationSettings, folder: Path | None,
                      encoder: TextEncoder) -> tuple[GenerationSettings, dict[str, torch.Tensor]]:
    """The embeddings the prompts and negative prompts name: the settings with them recorded (`TI
    hashes`), and {trigger word: vectors} as `encoder.encode(embeddings=...)` takes them."""
    found = embeddings_in(embeddings_dir(folder), settings.prompts + settings.negative_prompts)
    if found and not encoder.prompt_syntax:
        raise ValueError(f"embedding '{found[0].name}': textual inversion needs a CLIP text encoder, "
                         f"this model's is {encoder.kind}")
    recorded = {e.name: e.hash for e in settings.embeddings}  # from a PNG's TI hashes
    for e in found:
        if recorded.get(e.name) and recorded[e.name] != e.hash:
            logger.warning("embedding %s: its hash %s is not the PNG's %s; the image will differ",
                           e.name, e.hash, recorded[e.name])
    for name in sorted(set(recorded) - {e.name for e in found}):
        logger.warning("the PNG used embedding %s, which is not in the embeddings folder; the image will differ", name)
    refs = tuple(EmbeddingRef(e.name, e.hash) for e in found)
    return replace(settings, embeddings=refs), {e.name: encoder.embedding_vectors(e) for e in found}
