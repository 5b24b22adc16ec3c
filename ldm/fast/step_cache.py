"""DeepCache-style step caching (Ma et al. 2023), applied to a U-Net from outside. It changes the output."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.models.unet import UNet


@dataclass
class StepCache:
    """Opt-in DeepCache-style step caching (Ma et al. 2023). It changes the output.

    Adjacent sampling steps produce nearly the same deep U-Net features. So every `interval`-th call
    runs the whole U-Net and keeps the input of the last up block. The calls in between run only
    conv_in, the first down block and the last up block on top of that cached input. Use one
    StepCache per sampling run: `calls` counts the U-Net calls of that run.
    """
    interval: int = 3
    calls: int = 0
    deep: torch.Tensor | None = None
    full_calls: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"step cache interval must be an integer >= 1, got {self.interval!r}")

    def next_is_shallow(self, h: torch.Tensor) -> bool:
        """Whether this call may reuse the cache; `h` (conv_in's output) guards against a batch or size change."""
        refresh = self.calls % self.interval == 0
        self.calls += 1
        if refresh or self.deep is None or self.deep.shape[0] != h.shape[0] or self.deep.shape[2:] != h.shape[2:]:
            self.full_calls += 1
            return False
        return True

    def __call__(self, unet: UNet, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        """`unet(x, t, context, y)`, with every call but each `interval`-th one taken on the shallow path.

        A shallow call runs conv_in and the first down block, whose skips feed the last up block; that
        block's other input is the deep features kept from the last full call. (The first block's
        downsampler also runs; only the deep path needs it.)"""
        temb = unet.embed_time(t, x, y)
        h = unet.conv_in(x)
        last = unet.up_blocks[-1]
        if self.next_is_shallow(h):
            _, skips = unet.down(h, temb, context, unet.down_blocks[:1])
            h, _ = unet.up(self.deep, skips[:len(last.resnets)], temb, context, [last])
            return unet.head(h)
        h, skips = unet.down(h, temb, context)
        h = unet._run(unet.mid_block, h, temb, context)
        h, skips = unet.up(h, skips, temb, context, list(unet.up_blocks)[:-1])
        self.deep = h
        h, _ = unet.up(h, skips, temb, context, [last])
        return unet.head(h)
