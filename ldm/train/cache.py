"""Optional caches of the frozen models' outputs, computed once before training.

Latents are cached as the posterior's mean and std, not as one sample: each step still draws a fresh
z = mean + std * eps, exactly what the uncached path does, so turning the cache on changes speed,
not the objective. Images are cached centre-cropped, in both orientations when flips are on.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..autoencoder import AutoencoderKL
from ..text import TextEncoder
from .data import CaptionDataset

logger = logging.getLogger(__name__)


class LatentCache:
    def __init__(self, vae: AutoencoderKL, dataset: CaptionDataset, batch_size: int, device: torch.device,
                 progress: bool = True) -> None:
        flips = [False, True] if dataset.cfg.random_flip else [False]
        n = len(dataset)
        self.mean: list[torch.Tensor] = []
        self.std: list[torch.Tensor] = []
        bar = tqdm(total=n * len(flips), desc="caching latents", disable=not progress)
        for flip in flips:
            means, stds = [], []
            for start in range(0, n, batch_size):
                pixels = torch.stack([dataset.pixels(i, flip)[0] for i in range(start, min(n, start + batch_size))])
                with torch.no_grad():
                    posterior = vae.encode(pixels.to(device, next(vae.parameters()).dtype))
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
                bar.update(len(pixels))
            self.mean.append(torch.cat(means))
            self.std.append(torch.cat(stds))
        bar.close()
        logger.info("cached latents of %d images", n)

    def lookup(self, index: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.stack([self.mean[int(f)][i] for i, f in zip(index.tolist(), flip.tolist())])
        std = torch.stack([self.std[int(f)][i] for i, f in zip(index.tolist(), flip.tolist())])
        return mean, std


class TextCache:
    def __init__(self, encoder: TextEncoder, captions: set[str], batch_size: int = 64, progress: bool = True) -> None:
        ordered = sorted(captions | {""})  # "" is what caption dropout trains on
        self.states: dict[str, torch.Tensor] = {}
        for start in tqdm(range(0, len(ordered), batch_size), desc="caching text", disable=not progress):
            chunk = ordered[start:start + batch_size]
            states = encoder.encode(chunk).states.float().cpu()
            self.states.update(zip(chunk, states))
        logger.info("cached text states of %d captions", len(ordered))

    def lookup(self, captions: list[str]) -> torch.Tensor:
        return torch.stack([self.states[c] for c in captions])
