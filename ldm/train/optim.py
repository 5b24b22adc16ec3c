"""AdamW and the learning-rate schedule: linear warm-up, then constant, linear or cosine decay."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.train.config import OptimConfig


def lr_factor(step: int, cfg: OptimConfig, horizon: int) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(1, horizon - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 1.0 - progress if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, lr: float | None = None,
                   betas: tuple[float, float] | None = None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the model has no parameters that require gradients")
    return torch.optim.AdamW(params, lr=lr or cfg.learning_rate, betas=betas or tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, eps=cfg.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> LambdaLR:
    horizon = cfg.decay_steps or max_steps

    # A plain function on purpose: LambdaLR checkpoints the attributes of callable *objects* and would
    # restore them over the current config on resume; a function's schedule always comes from the config.
    def factor(step: int) -> float:
        return lr_factor(step, cfg, horizon)

    return LambdaLR(optimizer, factor)
