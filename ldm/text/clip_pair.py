"""SDXL's two CLIP text encoders, one text encoder to the pipeline.

The base model conditions on CLIP ViT-L and OpenCLIP bigG (converted to a transformers
CLIPTextModelWithProjection); the refiner on bigG alone. As in diffusers' StableDiffusionXLPipeline:
- the context is each encoder's penultimate hidden states, without the final LayerNorm, concatenated
  along the feature axis (768 + 1280 = 2048 for the base);
- the pooled vector is the last encoder's projected text embedding;
- both encoders read the same prompt.
Long prompts are chunked by each encoder alike (A1111 style), so both give the same number of chunks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ldm.text.base import TextEmbedding, TextEncoder, check_prompts
from ldm.text.clip import ClipTextEncoder


class ClipPairTextEncoder(TextEncoder):
    kind = "clip_pair"
    prompt_syntax = True  # A1111's syntax, read by each CLIP encoder alike

    def __init__(self, first: ClipTextEncoder | None, second: ClipTextEncoder) -> None:
        # no TextEncoder.__init__: the pair has two models, each already frozen by its own encoder
        self.first, self.second = first, second
        for enc in self.encoders:
            if not enc.penultimate:
                raise ValueError("SDXL text encoders condition on the penultimate layer (penultimate=True)")
        if second.pooled_size is None or not hasattr(second.model, "text_projection"):
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection")
        self.clip_skip = second.clip_skip

    @property
    def encoders(self) -> list[ClipTextEncoder]:
        return [e for e in (self.first, self.second) if e is not None]

    @property
    def model(self) -> torch.nn.Module:
        """The second (bigG) model: the one whose pooled output conditions the U-Net."""
        return self.second.model

    @property
    def tokenizer(self):
        return self.second.tokenizer

    def set_clip_skip(self, clip_skip: int | None) -> None:
        for enc in self.encoders:
            enc.set_clip_skip(clip_skip)
        self.clip_skip = clip_skip

    @property
    def hidden_size(self) -> int:
        return sum(enc.hidden_size for enc in self.encoders)

    @property
    def pooled_size(self) -> int:
        return self.second.pooled_size

    @property
    def device(self) -> torch.device:
        return self.second.device

    @property
    def dtype(self) -> torch.dtype:
        return self.second.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ClipPairTextEncoder:
        for enc in self.encoders:
            enc.to(device, dtype)
        return self

    def save(self, directory: Path, suffix: str = "") -> None:
        if suffix:
            raise ValueError("an SDXL text-encoder pair saves to text_encoder/ and text_encoder_2/ only")
        if self.first is not None:
            self.first.save(directory)
        self.second.save(directory, "_2")

    def model_index_entries(self, suffix: str = "") -> dict[str, list]:
        first = (self.first.model_index_entries() if self.first is not None
                 else {"text_encoder": [None, None], "tokenizer": [None, None]})
        return {**first, **self.second.model_index_entries("_2")}

    def embedding_vectors(self, embedding) -> dict[str, torch.Tensor]:
        """SDXL embeddings carry a set of vectors per encoder: clip_l for CLIP-L, clip_g for bigG."""
        keys = ["clip_l", "clip_g"] if self.first is not None else ["clip_g"]
        return {key: embedding.for_encoder(key) for key in keys}

    def _per_encoder(self, embeddings: Mapping[str, dict[str, torch.Tensor]] | None) -> list[dict | None]:
        if not embeddings:
            return [None] * len(self.encoders)
        keys = ["clip_l", "clip_g"] if self.first is not None else ["clip_g"]
        return [{word: vectors[key] for word, vectors in embeddings.items()} for key in keys]

    def num_chunks(self, prompts: list[str], *, emphasis: str = "none",
                   embeddings: Mapping[str, dict[str, torch.Tensor]] | None = None) -> int:
        check_prompts(prompts)
        return max(enc.num_chunks(prompts, emphasis=emphasis, embeddings=table)
                   for enc, table in zip(self.encoders, self._per_encoder(embeddings)))

    @torch.no_grad()
    def encode(self, prompts: list[str], *, pad_to_chunks: int | None = None, emphasis: str = "none",
               embeddings: Mapping[str, dict[str, torch.Tensor]] | None = None) -> TextEmbedding:
        """Both encoders' states side by side; prompt syntax and embeddings as ClipTextEncoder.encode reads them."""
        k = self.num_chunks(prompts, emphasis=emphasis, embeddings=embeddings) if pad_to_chunks is None else pad_to_chunks
        outs = [enc.encode(prompts, pad_to_chunks=k, emphasis=emphasis, embeddings=table)
                for enc, table in zip(self.encoders, self._per_encoder(embeddings))]
        device = outs[-1].states.device
        states = torch.cat([o.states.to(device) for o in outs], dim=-1)
        return TextEmbedding(states=states, pooled=outs[-1].pooled)
