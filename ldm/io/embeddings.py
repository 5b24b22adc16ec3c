"""Textual-inversion embeddings: reading the files the community shares, and finding them by name.

Formats, told apart by their keys:
- A1111 `.pt`: `{"string_to_param": {"*": [n, D]}, "name": ..., ...}`;
- A1111/kohya `.safetensors`: `{"emb_params": [n, D]}`;
- diffusers' `learned_embeds.bin/.safetensors`: `{"<token>": [D] or [n, D]}` (one key);
- SDXL: `{"clip_l": [n, 768], "clip_g": [n, 1280]}`, one set of vectors per text encoder.
As in A1111, the file's stem is the word that triggers it (`--embeddings-dir`, `LDM_EMBEDDINGS_DIR`).

`.pt`/`.bin` files are pickles: they are read only through torch's restricted unpickler
(`weights_only=True`), which builds tensors, dicts and numbers and refuses anything that would run code.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.io.weights import CheckpointError, folder_option, file_sha256, read_safetensors

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
EMBEDDINGS_DIR_ENV = "LDM_EMBEDDINGS_DIR"
SINGLE = ""  # the key of the vectors of a one-text-encoder (SD 1/2) embedding
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class Embedding:
    name: str  # the trigger word: the file's stem
    vectors: dict[str, torch.Tensor]  # {SINGLE: [n, D]} or {"clip_l": ..., "clip_g": ...}
    hash: str  # A1111's `TI hashes` entry: the first 12 hex digits of the file's sha256

    def for_encoder(self, key: str = SINGLE) -> torch.Tensor:
        """The vectors for one text encoder (SINGLE for SD 1/2; "clip_l"/"clip_g" for SDXL's two)."""
        if key not in self.vectors:
            have = ", ".join(k or "one text encoder" for k in self.vectors)
            raise ValueError(f"embedding '{self.name}' is for {have}, not for this model's text encoder")
        return self.vectors[key]


def _load_pickle(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a refused class, a truncated file: one line naming the file
        raise CheckpointError(f"{path}: refused or unreadable embedding file ({str(e).splitlines()[0]})") from None


def _as_vectors(path: Path, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointError(f"{path}: embedding vectors must be [D] or [n, D], got {shape}")
    return value.detach().float().reshape(-1, value.shape[-1])


def read_embedding(path: Path | str) -> Embedding:
    """One embedding file, in any of the formats above."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such embedding file")
    data = read_safetensors(path)[0] if path.suffix == ".safetensors" else _load_pickle(path)
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path}: not an embedding file (expected a dict of tensors)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise CheckpointError(f"{path}: 'string_to_param' must hold one tensor")
        vectors = {SINGLE: _as_vectors(path, next(iter(params.values())))}
    elif "emb_params" in data:
        vectors = {SINGLE: _as_vectors(path, data["emb_params"])}
    elif set(SDXL_KEYS) <= set(data):
        vectors = {key: _as_vectors(path, data[key]) for key in SDXL_KEYS}
        if len({len(v) for v in vectors.values()}) != 1:
            raise CheckpointError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    elif len(data) == 1:  # diffusers: {token: vectors}
        vectors = {SINGLE: _as_vectors(path, next(iter(data.values())))}
    else:
        raise CheckpointError(f"{path}: not a textual-inversion embedding (keys: {', '.join(sorted(map(str, data))[:5])})")
    return Embedding(path.stem, vectors, file_sha256(path)[:12])


def embeddings_dir(given: Path | str | None) -> Path | None:
    """The folder to look in: the one given, else $LDM_EMBEDDINGS_DIR, else none."""
    return folder_option(given, EMBEDDINGS_DIR_ENV, "embeddings")


def embedding_files(folder: Path) -> dict[str, Path]:
    """{trigger word: file} of every embedding under `folder` (subfolders too, as A1111 scans them)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix in EMBEDDING_SUFFIXES and path.is_file():
            if path.stem in found:
                raise ValueError(f"two embeddings are named '{path.stem}': {found[path.stem]} and {path}")
            found[path.stem] = path
    return found


def mentioned(name: str, texts: Sequence[str]) -> bool:
    """Whether `name` stands as a word of its own in any of the texts (so `cat` is not in `concat`)."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
    return any(pattern.search(text) for text in texts)


def embeddings_in(folder: Path | None, texts: Sequence[str]) -> list[Embedding]:
    """The embeddings of `folder` whose trigger word appears in the prompts or negative prompts."""
    if folder is None:
        return []
    return [read_embedding(path) for name, path in embedding_files(folder).items() if mentioned(name, texts)]
