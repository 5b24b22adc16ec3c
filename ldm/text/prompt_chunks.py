"""Token chunks of a weighted prompt, and A1111's emphasis: how a CLIP encoder turns syntax into states.

A prompt's fragments (ldm/text/prompt_syntax.py) are tokenized one by one and laid into chunks of
75 tokens, each token carrying its fragment's weight. A BREAK closes the current chunk. A
textual-inversion trigger (the token ids of an embedding's name) becomes that many vectors, never
split across two chunks: its tokens are placeholders whose token embeddings are replaced (`fixes`).
These are A1111's rules (`sd_hijack_clip.tokenize_line`), except that a chunk is cut at exactly 75
tokens rather than moved back to the last comma, so a prompt with no syntax chunks as it did before
this module existed (and as ClipTextEncoder always has).

Emphasis (A1111's `sd_emphasis`), applied to each chunk's states `z` with per-token weights `w`:
    original: z * w, then scaled so that the chunk's mean equals its mean before weighting
    no-norm:  z * w
    none:     the prompt is not parsed at all; brackets are text (see prompt_syntax.prompt_fragments)
A1111 takes the mean over the whole batch's chunk; here it is per prompt, so that an image does not
depend on the other prompts of its batch (for a batch of one prompt, as A1111 runs it, they agree).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ldm.text.prompt_syntax import Fragment


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)  # content ids, without BOS/EOS; at most the chunk size
    weights: list[float] = field(default_factory=list)  # one per token
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (offset in tokens, vectors [n, D])


@dataclass(frozen=True)
class Trigger:
    ids: tuple[int, ...]  # the name's token ids, matched in the prompt's token stream
    vectors: torch.Tensor  # [n, D], the n tokens it stands for


def trigger_table(triggers: Sequence[Trigger]) -> dict[int, list[Trigger]]:
    """Triggers by first token, longest first, so that `name_v2` wins over `name` where both fit."""
    table: dict[int, list[Trigger]] = {}
    for trigger in sorted(triggers, key=lambda t: -len(t.ids)):
        table.setdefault(trigger.ids[0], []).append(trigger)
    return table


def _trigger_at(ids: list[int], pos: int, table: Mapping[int, list[Trigger]]) -> Trigger | None:
    for trigger in table.get(ids[pos], ()):
        if tuple(ids[pos:pos + len(trigger.ids)]) == trigger.ids:
            return trigger
    return None


def chunk_prompt(fragments: Sequence[Fragment], fragment_ids: Sequence[list[int]], size: int,
                 table: Mapping[int, list[Trigger]], placeholder: int) -> list[PromptChunk]:
    """Lay the tokenized fragments into chunks of at most `size` tokens (at least one chunk)."""
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()

    def close() -> PromptChunk:
        chunks.append(chunk)
        return PromptChunk()

    for fragment, ids in zip(fragments, fragment_ids):
        if fragment.is_break:
            chunk = close()
            continue
        pos = 0
        while pos < len(ids):
            if len(chunk.tokens) == size:
                chunk = close()
            trigger = _trigger_at(ids, pos, table) if table else None
            if trigger is None:
                chunk.tokens.append(ids[pos])
                chunk.weights.append(fragment.weight)
                pos += 1
                continue
            n = len(trigger.vectors)
            if n > size:
                raise ValueError(f"an embedding of {n} vectors does not fit a {size}-token chunk")
            if len(chunk.tokens) + n > size:
                chunk = close()
            chunk.fixes.append((len(chunk.tokens), trigger.vectors))
            chunk.tokens += [placeholder] * n
            chunk.weights += [fragment.weight] * n
            pos += len(trigger.ids)
    if chunk.tokens or not chunks:
        close()
    return chunks


def apply_emphasis(states: torch.Tensor, weights: torch.Tensor, emphasis: str) -> torch.Tensor:
    """states [B, k, L, D] and weights [B, k, L] -> weighted states (see the module docstring)."""
    if emphasis == "none" or bool((weights == 1).all()):
        return states  # nothing to weight: the states stay bit for bit what the encoder gave
    weights = weights.to(states.dtype)[..., None]
    if emphasis == "no-norm":
        return states * weights
    if emphasis != "original":
        raise ValueError(f"unknown emphasis {emphasis!r}")
    before = states.mean(dim=(2, 3), keepdim=True)
    weighted = states * weights
    return weighted * (before / weighted.mean(dim=(2, 3), keepdim=True))
