"""Optional caches of the frozen models' outputs, computed once before training.

Latents are cached as the posterior's mean and std, not as one sample: each step still draws a fresh
z = mean + std * eps, exactly what the uncached path does, so turning the cache on changes speed,
not the objective. Images are cached centre-cropped, in both orientations when flips are on. Edit
pairs' sources are cached the same way.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ldm.models.autoencoder import AutoencoderKL
from ldm.text import TextEncoder
from ldm.train.data import CaptionDataset

logger = logging.getLogger(__name__)


class LatentCache:
    def __init__(self, vae: AutoencoderKL, dataset: CaptionDataset, batch_size: int, device: torch.device,
                 progress: bool = True) -> None:
        flips = [False, True] if dataset.cfg.random_flip else [False]
        n = len(dataset)
        self.sourced = [i for i, r in enumerate(dataset.records) if r.source is not None]
        # the row of each record's source in the source arrays; records without one are their own source
        self.source_row = {i: k for k, i in enumerate(self.sourced)}
        self.mean: list[torch.Tensor] = []
        self.std: list[torch.Tensor] = []
        self.source_mean: list[torch.Tensor] = []
        self.source_std: list[torch.Tensor] = []
        bar = tqdm(total=(n + len(self.sourced)) * len(flips), desc="caching latents", disable=not progress)
        for flip in flips:
            for indices, source, means, stds in ((range(n), False, self.mean, self.std),
                                                 (self.sourced, True, self.source_mean, self.source_std)):
                mean, std = [], []
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    load = dataset.source_pixels if source else dataset.pixels
                    pixels = torch.stack([load(i, flip)[0] for i in chunk])
                    with torch.no_grad():
                        posterior = vae.encode(pixels.to(device, next(vae.parameters()).dtype))
                    mean.append(posterior.mean.float().cpu())
                    std.append(posterior.std.float().cpu())
                    bar.update(len(pixels))
                means.append(torch.cat(mean) if mean else torch.zeros(0))  # empty: a dataset without edits
                stds.append(torch.cat(std) if std else torch.zeros(0))
        bar.close()
        logger.info("cached latents of %d images%s", n, f" and {len(self.sourced)} edit sources" if self.sourced else "")

    def lookup(self, index: torch.Tensor, flip: torch.Tensor, source: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of each row's image, or with `source=True` of its edit source (its own image if none)."""
        rows = []
        for i, f in zip(index.tolist(), flip.tolist()):
            k = self.source_row.get(i) if source else None
            rows.append((self.mean[int(f)][i], self.std[int(f)][i]) if k is None
                        else (self.source_mean[int(f)][k], self.source_std[int(f)][k]))
        return torch.stack([m for m, _ in rows]), torch.stack([s for _, s in rows])


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
