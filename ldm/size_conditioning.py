"""SDXL's micro-conditioning: the size, crop and aesthetic-score numbers ("time ids") the U-Net's
added embedding reads beside the pooled text, filled in with diffusers' defaults."""
from __future__ import annotations

from ldm.settings import GenerationSettings


def time_ids(s: GenerationSettings, aesthetic: bool) -> tuple[list[float], list[float]]:
    """(prompt ids, negative-prompt ids) for resolved settings (width and height known).

    The base reads original size + crop corner + target size, (height, width) and (top, left) pairs; the
    refiner (`aesthetic`) reads original size + crop corner + aesthetic score. Unset sizes are the output
    size and unset negative ones the positive ones, as in diffusers' SDXL pipelines.
    """
    size = (s.height, s.width)
    original, target = tuple(s.original_size or size), tuple(s.target_size or size)
    crops = tuple(s.crops_coords_top_left)
    neg_original = tuple(s.negative_original_size or original)
    neg_target = tuple(s.negative_target_size or target)
    neg_crops = tuple(s.negative_crops_coords_top_left or crops)
    if aesthetic:
        return ([*original, *crops, s.aesthetic_score], [*neg_original, *neg_crops, s.negative_aesthetic_score])
    return [*original, *crops, *target], [*neg_original, *neg_crops, *neg_target]
