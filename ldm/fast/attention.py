"""Opt-in attention paths that keep the output: fused q/k/v projections and query chunking.

`configure_attention` turns the `Attention` modules of a model into `FastAttention` (same
parameters, same checkpoint keys) and back, so the model files stay plain.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.attention import Attention


class FastAttention(Attention):
    """Attention with the opt-in switches; made only by `configure_attention`. Neither is part of
    the checkpoint: the fused weight is a copy, rebuilt when the projections change."""
    query_chunk: int | None = None
    fused_weight: torch.Tensor | None = None
    fused_bias: torch.Tensor | None = None
    _fused_from: tuple = ()

    def _fused_linears(self) -> tuple[nn.Module, ...]:
        return (self.to_k, self.to_v) if self.is_cross else (self.to_q, self.to_k, self.to_v)

    def _weights_state(self) -> tuple:
        # in-place updates (optimizer steps, load_state_dict) bump _version; .to() swaps the storage
        return tuple((lin.weight.data_ptr(), lin.weight._version) for lin in self._fused_linears())

    def fuse_projections(self) -> None:
        """One matmul for q, k and v (self-attention) or k and v (cross-attention), from the weights
        concatenated now; rebuilt by itself when they change. Used only with gradients off, since the
        concatenated copy carries no gradient to the projections."""
        linears = self._fused_linears()
        if any(type(lin) is not nn.Linear for lin in linears):
            raise ValueError("cannot fuse attention projections wrapped by adapters (LoRA): merge them first")
        with torch.no_grad():
            self.fused_weight = torch.cat([lin.weight for lin in linears])
            self.fused_bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
        self._fused_from = self._weights_state()

    def _project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if self.fused_weight is None or torch.is_grad_enabled():
            return super()._project(x, context)
        if self._weights_state() != self._fused_from:
            self.fuse_projections()
        if self.is_cross:
            return (self.to_q(x), *F.linear(context, self.fused_weight, self.fused_bias).chunk(2, dim=-1))
        return F.linear(x, self.fused_weight, self.fused_bias).chunk(3, dim=-1)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        chunk = self.query_chunk
        if chunk is None or q.shape[2] <= chunk:
            return super()._sdpa(q, k, v)
        # Every query chunk still attends to all keys, so this is exact up to rounding; it bounds the
        # score matrix at chunk x keys for backends that materialise it (the math kernel).
        return torch.cat([F.scaled_dot_product_attention(qc, k, v) for qc in q.split(chunk, dim=2)], dim=2)


_STATE = ("query_chunk", "fused_weight", "fused_bias", "_fused_from")


def configure_attention(model: nn.Module, *, query_chunk: int | None = None, fuse_projections: bool = False) -> None:
    """Set the opt-in attention switches on every Attention in `model`; with both off, every one is
    a plain Attention again.

    query_chunk: attend this many query tokens at a time (None: all at once), bounding attention
    memory at high resolution; fuse_projections: one matmul for the q/k/v (or k/v) projections.
    """
    if query_chunk is not None and query_chunk < 1:
        raise ValueError(f"attention query chunk must be >= 1 tokens, got {query_chunk}")
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        for name in _STATE:
            module.__dict__.pop(name, None)
        if query_chunk is None and not fuse_projections:
            module.__class__ = Attention
            continue
        module.__class__ = FastAttention
        module.query_chunk = query_chunk
        if fuse_projections:
            module.fuse_projections()
