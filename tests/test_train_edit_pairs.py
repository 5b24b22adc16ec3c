"""Edit pairs through the U-Net stage: cached and uncached latents give the same loss, an edit row
noises its source, and an edit row whose caption was dropped trains as its source alone.

Tolerance: 1e-5 between the cached and uncached loss (the VAE encodes different batch shapes).
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from test_train_common import run_training, unet_stage

from ldm.shapes.dataset import write_shapes_dataset
from ldm.train import stage_unet
from ldm.train.config import load_config
from ldm.train.data import CaptionDataset, collate, scan_records
from ldm.train.order import StepDraws


def _stage(tmp_path, data, cache: bool):
    cfg = load_config(None, [], base=unet_stage(data, cache_latents=cache, diffusion={"edit_min_timestep": 300}))
    records, _ = scan_records(cfg.data)
    dataset = CaptionDataset(records, cfg.data, cfg.train.seed, load_pixels=not cache)
    torch.manual_seed(0)  # the same U-Net initialisation for both stages
    return stage_unet.UNetStage(cfg, Accelerator(cpu=True), tmp_path / f"out-{cache}", dataset), dataset


def test_edit_pairs_cached_and_uncached_agree_and_dropped_captions_train_the_source(tmp_path, monkeypatch):
    data = write_shapes_dataset(tmp_path / "data", 3, seed=0, resolution=16, progress=False, edit_pairs=3)
    seen = []

    def spy(latents, *args, **kwargs):
        seen.append((latents, args[5] if len(args) > 5 else kwargs.get("source"), args[6] if len(args) > 6 else None))
        return real(latents, *args, **kwargs)

    real = stage_unet.noised_inputs
    monkeypatch.setattr(stage_unet, "noised_inputs", spy)
    losses = []
    for cache in (False, True):
        stage, dataset = _stage(tmp_path, data, cache)
        items = [dataset[(0, i)] for i in range(6)]
        items[5] = {**items[5], "caption": ""}  # caption dropout on an edit row
        batch = collate(items)
        with torch.no_grad():
            losses.append(stage.loss(batch, StepDraws(0, 0, 6, 1, 0), 0)[0].item())
    assert abs(losses[0] - losses[1]) <= 1e-5
    latents, source, edit = seen[-1]
    assert edit.tolist() == [False, False, False, True, True, False]
    assert torch.equal(latents[:3], source[:3])  # plain rows are their own source
    assert (latents[3:5] - source[3:5]).abs().amax(dim=(1, 2, 3)).min() > 0.1  # an edit changes the image
    assert torch.equal(latents[5], source[5])  # the dropped caption: the source, denoised as it is


def test_training_on_edit_pairs_runs(tmp_path):
    data = write_shapes_dataset(tmp_path / "data", 4, seed=0, resolution=16, progress=False, edit_pairs=4)
    result = run_training(unet_stage(data, cache_latents=True, diffusion={"edit_min_timestep": 300}), tmp_path / "o")
    assert result.progress.step == 4 and result.progress.skipped_steps == 0  # every loss was finite
    assert (tmp_path / "o" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
