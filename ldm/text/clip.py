"""CLIP text encoders (SD1's CLIP ViT-L, and SD2/SDXL's OpenCLIP once converted), with A1111 chunking.

Prompts longer than the 77-token window are not cut: as AUTOMATIC1111 does, the tokens are split into
75-token chunks, each wrapped in BOS/EOS and padded to 77, encoded separately and concatenated along
the sequence axis. The U-Net's cross-attention does not care about the sequence length, so a
`[B, 77*k, D]` context works unchanged. A prompt of at most 75 tokens is one chunk, tokenized exactly as
diffusers' `StableDiffusionPipeline.encode_prompt` tokenizes it.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.text.base import from_pretrained_checked, TextEmbedding, TextEncoder, check_prompts, set_max_length


class ClipTextEncoder(TextEncoder):
    kind = "clip"

    def __init__(self, model: CLIPTextModel | CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                 clip_skip: int | None = None, penultimate: bool = False) -> None:
        super().__init__(model, tokenizer)
        # SDXL's convention (diffusers' StableDiffusionXLPipeline, sgm's "penultimate" layer): the states
        # are the penultimate layer's output, with no final LayerNorm; clip_skip counts back from there.
        self.penultimate = penultimate
        self.set_clip_skip(clip_skip)
        self.window = set_max_length(tokenizer, None, model.config.max_position_embeddings)
        if self.window < 3:
            raise ValueError(f"a CLIP window of {self.window} tokens leaves no room for the prompt")

    def set_clip_skip(self, clip_skip: int | None) -> None:
        """Use the output of the clip_skip-th layer from the end (diffusers' count; None or 0: the last)."""
        num_layers = self.model.config.num_hidden_layers - self.penultimate
        if clip_skip is not None and not 0 <= clip_skip < num_layers:
            raise ValueError(
                f"clip_skip must be in [0, {num_layers - 1}] for this CLIP, got {clip_skip}")
        self.clip_skip = clip_skip

    @property
    def pooled_size(self) -> int:
        if isinstance(self.model, CLIPTextModelWithProjection):
            return int(self.model.config.projection_dim)
        return self.hidden_size

    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens per chunk: the window less BOS and EOS (75 for the usual 77)."""
        return self.window - 2

    def num_chunks(self, prompts: list[str]) -> int:
        check_prompts(prompts)
        return max(self._chunks_for(len(ids)) for ids in self._prompt_ids(prompts))

    @torch.no_grad()
    def encode(self, prompts: list[str], *, pad_to_chunks: int | None = None) -> TextEmbedding:
        """States `[B, 77*k, D]` with k = max chunks over the batch (or pad_to_chunks), pooled `[B, D']`.

        Prompts with fewer chunks than k get empty-prompt chunks appended, which is how the negative
        prompt is brought to the positive prompt's length so both can go through the U-Net in one batch.
        The pooled output is the first chunk's (as A1111 does for SDXL), from the final layer whatever
        clip_skip is (as diffusers' SDXL pipeline does).
        """
        check_prompts(prompts)
        prompt_ids = self._prompt_ids(prompts)
        k = max(self._chunks_for(len(ids)) for ids in prompt_ids)
        if pad_to_chunks is not None:
            if pad_to_chunks < k:
                raise ValueError(f"pad_to_chunks={pad_to_chunks} is fewer than the {k} chunks these prompts need")
            k = pad_to_chunks
        input_ids, mask = self._chunk_ids(prompt_ids, k)  # [B*k, window], chunks of one prompt adjacent
        input_ids = input_ids.to(self.device)
        # The mask only goes in when the config asks for it, exactly like diffusers' encode_prompt.
        attention_mask = mask.to(self.device) if self.use_attention_mask else None
        out = self.model(input_ids, attention_mask=attention_mask,
                         output_hidden_states=self.clip_skip is not None or self.penultimate)
        if self.penultimate:
            states = out.hidden_states[-(2 + (self.clip_skip or 0))]
        elif self.clip_skip is None:
            states = out.last_hidden_state
        else:
            # hidden_states[-1] is the last layer before final_layer_norm, so clip_skip=0 equals the default,
            # and every skipped layer's output still goes through the final norm (diffusers' semantics).
            states = self._final_layer_norm()(out.hidden_states[-(self.clip_skip + 1)])
        pooled = out.text_embeds if isinstance(self.model, CLIPTextModelWithProjection) else out.pooler_output
        batch = len(prompts)
        states = states.reshape(batch, k * self.window, states.shape[-1])
        pooled = pooled.reshape(batch, k, pooled.shape[-1])[:, 0]
        return TextEmbedding(states=states, pooled=pooled)

    def _final_layer_norm(self) -> torch.nn.LayerNorm:
        # transformers 5 flattened CLIPTextModel (no `.text_model`); WithProjection and transformers 4 keep it.
        return getattr(self.model, "text_model", self.model).final_layer_norm

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        # verbose=False: long prompts are expected here, they are chunked rather than truncated.
        return self.tokenizer(list(prompts), add_special_tokens=False, verbose=False).input_ids

    def _chunks_for(self, n_tokens: int) -> int:
        return max(1, math.ceil(n_tokens / self.chunk_tokens))  # the empty prompt is still one chunk

    def _chunk_ids(self, prompt_ids: list[list[int]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        rows, masks = [], []
        for ids in prompt_ids:
            for c in range(k):
                piece = [bos, *ids[c * self.chunk_tokens:(c + 1) * self.chunk_tokens], eos]
                rows.append(piece + [pad] * (self.window - len(piece)))
                masks.append([1] * len(piece) + [0] * (self.window - len(piece)))
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


def load_clip(model_dir: Path, tokenizer_dir: Path, *, clip_skip: int | None = None,
              dtype: torch.dtype | None = None, projection: bool = False, penultimate: bool = False) -> ClipTextEncoder:
    """A CLIPTextModel (or CLIPTextModelWithProjection, whose pooled output is the projected one);
    `penultimate`: SDXL's states (see ClipTextEncoder)."""
    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = from_pretrained_checked(model_cls, model_dir, dtype)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return ClipTextEncoder(model, tokenizer, clip_skip=clip_skip, penultimate=penultimate)
