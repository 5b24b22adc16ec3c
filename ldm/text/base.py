"""The interface every frozen text encoder shares, and the tokenizing helpers they reuse.

A text encoder turns prompts into token states `[B, L, D]` for the U-Net's cross-attention, plus a
pooled vector `[B, D']` where the model family has one. The weights are never trained here: they are
put in eval mode with `requires_grad=False` and run under `torch.no_grad`.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

logger = logging.getLogger(__name__)


@dataclass
class TextEmbedding:
    states: torch.Tensor  # [B, L, D]: what the U-Net cross-attends to
    pooled: torch.Tensor | None  # [B, D'], or None for families without a pooled output (T5)


class TextEncoder(ABC):
    """A frozen transformers text model and its tokenizer, behind `encode(prompts)`."""

    kind: ClassVar[str]
    clip_skip: int | None = None  # only CLIP encoders can skip layers (ClipTextEncoder.set_clip_skip)
    # whether encode() takes emphasis= and embeddings= (A1111's prompt syntax, textual inversion);
    # the other families encode the text as written
    prompt_syntax: ClassVar[bool] = False

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer

    def set_clip_skip(self, clip_skip: int | None) -> None:
        if clip_skip is not None:
            raise ValueError(f"clip skip applies to CLIP text encoders only, not to this model's {self.kind}")

    @property
    def hidden_size(self) -> int:
        """D of `states`; the U-Net's cross_attention_dim must equal it."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def use_attention_mask(self) -> bool:
        # The same switch diffusers' encode_prompt reads, so that a folder we export is encoded the
        # same way by diffusers: it lives in the model's config.json, not in our code.
        return bool(getattr(self.model.config, "use_attention_mask", False))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def save(self, directory: Path, suffix: str = "") -> None:
        """Write `<directory>/text_encoder` and `<directory>/tokenizer` in the layout diffusers loads
        (with `suffix="_2"`: SDXL's second encoder's folders)."""
        directory = Path(directory)
        self.model.save_pretrained(directory / f"text_encoder{suffix}")
        self.tokenizer.save_pretrained(directory / f"tokenizer{suffix}")

    def model_index_entries(self, suffix: str = "") -> dict[str, list[str]]:
        """The `text_encoder` / `tokenizer` entries of a diffusers model_index.json for what `save` writes."""
        return {
            f"text_encoder{suffix}": ["transformers", type(self.model).__name__],
            f"tokenizer{suffix}": ["transformers", type(self.tokenizer).__name__],
        }

    def embedding_vectors(self, embedding):
        """A textual-inversion embedding's vectors as this encoder's `encode(embeddings=...)` takes them."""
        return embedding.for_encoder()

    @property
    def pooled_size(self) -> int | None:
        """Width of `pooled`, or None for families without one."""
        return None

    def num_chunks(self, prompts: list[str]) -> int:
        """How many 77-token chunks `encode` produces; only CLIP chunks, the others truncate."""
        check_prompts(prompts)
        return 1

    @abstractmethod
    def encode(self, prompts: list[str], *, pad_to_chunks: int | None = None) -> TextEmbedding:
        ...

    def _check_no_chunks(self, pad_to_chunks: int | None) -> None:
        if pad_to_chunks not in (None, 1):
            raise ValueError(f"{self.kind} text encoders do not chunk prompts; got pad_to_chunks={pad_to_chunks}")


def check_prompts(prompts: list[str]) -> None:
    # A bare string would be iterated character by character and silently give one embedding per letter.
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts must not be empty")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"prompts must be a list of strings, got an item of type {type(p).__name__}")


def set_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int | None, max_positions: int | None) -> int:
    """Fix the token limit on the tokenizer itself, so `save` writes it and a reload encodes the same way."""
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        tokenizer.model_max_length = max_length
    limit = int(tokenizer.model_max_length)
    if limit >= VERY_LARGE_INTEGER:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} sets no model_max_length; pass max_length")
    if max_positions is not None and limit > max_positions:
        raise ValueError(f"max_length {limit} is longer than the model's {max_positions} position embeddings")
    return limit


def tokenize_truncating(tokenizer: PreTrainedTokenizerBase, prompts: list[str], kind: str) -> BatchEncoding:
    """Tokenize exactly as diffusers' encode_prompt does, warning with the words that do not fit."""
    max_length = int(tokenizer.model_max_length)
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    # Truncation keeps the special tokens (CLS/SEP, EOS), so that many fewer content tokens fit.
    keep = max_length - tokenizer.num_special_tokens_to_add()
    for i, ids in enumerate(tokenizer(prompts, add_special_tokens=False, verbose=False).input_ids):
        if len(ids) > keep:
            dropped = tokenizer.decode(ids[keep:]).strip()
            logger.warning("prompt %d is longer than the %s text encoder's %d tokens; truncated, dropping: %r",
                           i, kind, max_length, dropped)
    return batch


def from_pretrained_checked(model_cls, model_dir: Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """transformers only warns about missing weights and initialises them randomly; a text encoder
    with random layers would silently give wrong images, so every missing key is an error here."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    model, info = model_cls.from_pretrained(model_dir, local_files_only=True, output_loading_info=True, **kwargs)
    problems = list(info.get("missing_keys") or []) + [str(m) for m in info.get("mismatched_keys") or []]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{model_dir}: text encoder weights do not fit its config: '{problems[0]}'{more}")
    return model
