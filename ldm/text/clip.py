"""CLIP text encoders (SD1's CLIP ViT-L, and SD2/SDXL's OpenCLIP once converted), with A1111 chunking.

Prompts longer than the 77-token window are not cut: as AUTOMATIC1111 does, the tokens are split into
75-token chunks, each wrapped in BOS/EOS and padded to 77, encoded separately and concatenated along
the sequence axis. The U-Net's cross-attention does not care about the sequence length, so a
`[B, 77*k, D]` context works unchanged. A prompt of at most 75 tokens is one chunk, tokenized exactly as
diffusers' `StableDiffusionPipeline.encode_prompt` tokenizes it.

With `emphasis=` the prompt is read in A1111's syntax (weights, BREAK) and with `embeddings=`
textual-inversion words stand for their vectors (ldm/text/prompt_chunks.py). These are per-encoder
arguments, so a pair of CLIP encoders (SDXL) gives each its own embedding vectors.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.text.base import from_pretrained_checked, TextEmbedding, TextEncoder, check_prompts, set_max_length
from ldm.text.prompt_chunks import PromptChunk, Trigger, apply_emphasis, chunk_prompt, trigger_table
from ldm.text.prompt_syntax import prompt_fragments


class ClipTextEncoder(TextEncoder):
    kind = "clip"
    prompt_syntax = True

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

    def num_chunks(self, prompts: list[str], *, emphasis: str = "none",
                   embeddings: Mapping[str, torch.Tensor] | None = None) -> int:
        check_prompts(prompts)
        table = self.trigger_table(embeddings)
        return max(len(self.prompt_chunks(p, emphasis, table)) for p in prompts)

    @torch.no_grad()
    def encode(self, prompts: list[str], *, pad_to_chunks: int | None = None, emphasis: str = "none",
               embeddings: Mapping[str, torch.Tensor] | None = None) -> TextEmbedding:
        """States `[B, 77*k, D]` with k = max chunks over the batch (or pad_to_chunks), pooled `[B, D']`.

        Prompts with fewer chunks than k get empty-prompt chunks appended, which is how the negative
        prompt is brought to the positive prompt's length so both can go through the U-Net in one batch.
        The pooled output is the first chunk's (as A1111 does for SDXL), from the final layer whatever
        clip_skip is (as diffusers' SDXL pipeline does), and never weighted.

        `emphasis` "original" or "no-norm" reads A1111's prompt syntax (ldm/text/prompt_chunks.py);
        the default "none" encodes the text as written. `embeddings` maps a textual-inversion trigger
        word to its vectors `[n, D]`; the word in a prompt stands for those n tokens.
        """
        check_prompts(prompts)
        table = self.trigger_table(embeddings)
        chunked = [self.prompt_chunks(p, emphasis, table) for p in prompts]
        k = max(len(chunks) for chunks in chunked)
        if pad_to_chunks is not None:
            if pad_to_chunks < k:
                raise ValueError(f"pad_to_chunks={pad_to_chunks} is fewer than the {k} chunks these prompts need")
            k = pad_to_chunks
        rows = [chunks[c] if c < len(chunks) else PromptChunk() for chunks in chunked for c in range(k)]
        input_ids, mask, weights = self._chunk_rows(rows)  # [B*k, window], chunks of one prompt adjacent
        fixes = [(r, 1 + offset, vectors) for r, row in enumerate(rows) for offset, vectors in row.fixes]
        states, pooled = self._run(input_ids, mask, fixes)
        batch = len(prompts)
        states = states.reshape(batch, k, self.window, states.shape[-1])
        states = apply_emphasis(states, weights.reshape(batch, k, self.window), emphasis)
        pooled = pooled.reshape(batch, k, pooled.shape[-1])[:, 0]
        return TextEmbedding(states=states.reshape(batch, k * self.window, states.shape[-1]), pooled=pooled)

    def _run(self, input_ids: torch.Tensor, mask: torch.Tensor,
             fixes: list[tuple[int, int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer over token rows; `fixes` (row, position, vectors) replace token embeddings."""
        input_ids = input_ids.to(self.device)
        # The mask only goes in when the config asks for it, exactly like diffusers' encode_prompt.
        attention_mask = mask.to(self.device) if self.use_attention_mask else None

        def replace_vectors(module, args, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            for row, pos, vectors in fixes:
                output[row, pos:pos + len(vectors)] = vectors.to(output.device, output.dtype)
            return output

        hook = self.model.get_input_embeddings().register_forward_hook(replace_vectors) if fixes else None
        try:
            out = self.model(input_ids, attention_mask=attention_mask,
                             output_hidden_states=self.clip_skip is not None or self.penultimate)
        finally:
            if hook is not None:
                hook.remove()
        if self.penultimate:
            states = out.hidden_states[-(2 + (self.clip_skip or 0))]
        elif self.clip_skip is None:
            states = out.last_hidden_state
        else:
            # hidden_states[-1] is the last layer before final_layer_norm, so clip_skip=0 equals the default,
            # and every skipped layer's output still goes through the final norm (diffusers' semantics).
            states = self._final_layer_norm()(out.hidden_states[-(self.clip_skip + 1)])
        pooled = out.text_embeds if isinstance(self.model, CLIPTextModelWithProjection) else out.pooler_output
        return states, pooled

    def _final_layer_norm(self) -> torch.nn.LayerNorm:
        # transformers 5 flattened CLIPTextModel (no `.text_model`); WithProjection and transformers 4 keep it.
        return getattr(self.model, "text_model", self.model).final_layer_norm

    @property
    def token_width(self) -> int:
        """The width of one token embedding: what a textual-inversion vector must have."""
        return int(self.model.get_input_embeddings().weight.shape[1])

    def trigger_table(self, embeddings: Mapping[str, torch.Tensor] | None) -> dict[int, list[Trigger]]:
        """Textual-inversion triggers by first token id, checked against this encoder's token width."""
        if not embeddings:
            return {}
        triggers = []
        for name, vectors in embeddings.items():
            if vectors.ndim != 2 or vectors.shape[1] != self.token_width:
                raise ValueError(f"embedding '{name}' has vectors of shape {tuple(vectors.shape)}; this text "
                                 f"encoder's tokens are {self.token_width} wide")
            ids = self.tokenizer(name, add_special_tokens=False, verbose=False).input_ids
            if ids:
                triggers.append(Trigger(tuple(ids), vectors))
        return trigger_table(triggers)

    def prompt_chunks(self, prompt: str, emphasis: str, table: Mapping[int, list[Trigger]]) -> list[PromptChunk]:
        """One prompt's token chunks (A1111's tokenize_line); see ldm/text/prompt_chunks.py."""
        fragments = prompt_fragments(prompt, emphasis)
        texts = [f.text for f in fragments]
        # verbose=False: long prompts are expected here, they are chunked rather than truncated.
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False).input_ids
        # placeholder for embedding vectors: id 0, as A1111 uses; its token embedding is replaced anyway
        return chunk_prompt(fragments, ids, self.chunk_tokens, table, placeholder=0)

    def _chunk_rows(self, rows: list[PromptChunk]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        ids, masks, weights = [], [], []
        for row in rows:
            piece = [bos, *row.tokens, eos]
            rest = self.window - len(piece)
            ids.append(piece + [pad] * rest)
            masks.append([1] * len(piece) + [0] * rest)
            weights.append([1.0, *row.weights] + [1.0] * (rest + 1))
        return (torch.tensor(ids, dtype=torch.long), torch.tensor(masks, dtype=torch.long),
                torch.tensor(weights, dtype=torch.float32))


def load_clip(model_dir: Path, tokenizer_dir: Path, *, clip_skip: int | None = None,
              dtype: torch.dtype | None = None, projection: bool = False, penultimate: bool = False) -> ClipTextEncoder:
    """A CLIPTextModel (or CLIPTextModelWithProjection, whose pooled output is the projected one);
    `penultimate`: SDXL's states (see ClipTextEncoder)."""
    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = from_pretrained_checked(model_cls, model_dir, dtype)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return ClipTextEncoder(model, tokenizer, clip_skip=clip_skip, penultimate=penultimate)
