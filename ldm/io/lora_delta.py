"""The weight change each kind of LoRA layer stands for: LoRA/LoCon, LoHa and LoKr (LyCORIS).

Each function gets one layer's tensors (kohya/LyCORIS names, without the module prefix) and returns
the unscaled delta ΔW and the rank the file's alpha divides by (None: the scale is 1, as A1111's
`networks` module reads such files). The merged weight is W + weight * alpha / rank * ΔW.

    LoRA, LoCon   ΔW = up @ down, conv kernels carried by `down`;
                  with `lora_mid` (Tucker): ΔW[i,j,k,l] = Σ mid[n,m,k,l] up[i,n] down[m,j]
    LoHa          ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b);
                  with hada_t1/t2 (Tucker): each factor is t ×₀ a ×₁ b, a [r, out], b [r, in]
    LoKr          ΔW = w1 ⊗ w2 (Kronecker), each either given or a product w_a @ w_b (w2 also Tucker)
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

KIND_KEYS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
TENSOR_NAMES = {name for names in KIND_KEYS.values() for name in names}


def layer_kind(tensors: Mapping[str, torch.Tensor]) -> str:
    kinds = [kind for kind, names in KIND_KEYS.items() if any(n in tensors for n in names)]
    if len(kinds) != 1:
        raise ValueError(f"mixes tensors of {' and '.join(kinds)}" if kinds else "holds no LoRA tensors")
    return kinds[0]


def _need(tensors: Mapping[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"has no {', '.join(missing)}")
    return [tensors[n].float() for n in names]


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """core [r, r, k, k] with a [r, out], b [r, in] -> [out, in, k, k] (LyCORIS' make_weight_cp)."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, a, b)


def lora_delta(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    down, up = _need(t, "lora_down.weight", "lora_up.weight")
    rank = down.shape[0]
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(rank, -1)
    if "lora_mid.weight" in t:
        mid = t["lora_mid.weight"].float()  # [r, r, k, k]
        return tucker(mid, up2.T, down2), rank
    delta = up2 @ down2
    if down.ndim == 4:  # LoCon: the kernel is in down [r, in, k, k]
        delta = delta.reshape(up.shape[0], down.shape[1], *down.shape[2:])
    return delta, rank


def loha_delta(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    w1a, w1b, w2a, w2b = _need(t, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if "hada_t1" in t or "hada_t2" in t:
        t1, t2 = _need(t, "hada_t1", "hada_t2")
        return tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b), w1b.shape[0]
    return (w1a @ w1b) * (w2a @ w2b), w1b.shape[0]


def lokr_delta(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int | None]:
    if "lokr_w1" in t:
        w1 = t["lokr_w1"].float()
    else:
        a, b = _need(t, "lokr_w1_a", "lokr_w1_b")
        w1 = a @ b
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    elif "lokr_t2" in t:
        t2, a, b = _need(t, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        w2 = tucker(t2, a, b)
    else:
        a, b = _need(t, "lokr_w2_a", "lokr_w2_b")
        w2 = a @ b
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
    return torch.kron(w1, w2.contiguous()), rank


DELTAS = {"lora": lora_delta, "loha": loha_delta, "lokr": lokr_delta}


def layer_delta(tensors: Mapping[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """alpha / rank * ΔW in float32, in the layout of the file (the caller reshapes it to the weight)."""
    delta, rank = DELTAS[layer_kind(tensors)](tensors)
    scale = alpha / rank if alpha is not None and rank else 1.0
    return delta * scale
