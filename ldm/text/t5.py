"""T5 encoder (Imagen / DeepFloyd / SD3 style): token states only, no pooled output.

T5 has relative position biases, so there is no hard window; the limit is the tokenizer's
model_max_length (or `max_length`), and anything past it is truncated with a warning naming the words.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from ldm.text.base import from_pretrained_checked, TextEmbedding, TextEncoder, check_prompts, set_max_length, tokenize_truncating


class T5TextEncoder(TextEncoder):
    kind = "t5"

    def __init__(self, model: T5EncoderModel, tokenizer: PreTrainedTokenizerBase,
                 max_length: int | None = None) -> None:
        super().__init__(model, tokenizer)
        self.max_length = set_max_length(tokenizer, max_length, None)

    @torch.no_grad()
    def encode(self, prompts: list[str], *, pad_to_chunks: int | None = None) -> TextEmbedding:
        check_prompts(prompts)
        self._check_no_chunks(pad_to_chunks)
        batch = tokenize_truncating(self.tokenizer, list(prompts), self.kind)
        attention_mask = batch.attention_mask.to(self.device) if self.use_attention_mask else None
        out = self.model(batch.input_ids.to(self.device), attention_mask=attention_mask)
        return TextEmbedding(states=out.last_hidden_state, pooled=None)


def load_t5(model_dir: Path, tokenizer_dir: Path, *, max_length: int | None = None,
            dtype: torch.dtype | None = None) -> T5TextEncoder:
    model = from_pretrained_checked(T5EncoderModel, model_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return T5TextEncoder(model, tokenizer, max_length=max_length)
