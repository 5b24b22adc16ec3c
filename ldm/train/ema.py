"""Exponential moving average of the trained weights, kept in fp32 whatever the training precision."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadows the parameters that require grad (so with LoRA only the adapters are averaged).

    Registered with accelerate (`state_dict`/`load_state_dict`), so it is saved and restored with
    every checkpoint and a resumed run averages exactly as an uninterrupted one.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        # diffusers' EMAModel ramp: the first update copies, then (1 + n) / (10 + n) up to `decay`
        n = self.num_updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the model's trainable parameters")
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
