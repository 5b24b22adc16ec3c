"""warm_start: continuing a trained U-Net into one with more attention levels starts from exactly
the trained model's function, and anything but added attention blocks is refused."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.io.model_files import load_model
from ldm.train.components import warm_start_unet
from ldm.models.unet import UNet
from ldm.io.weights import CheckpointError
from test_train_common import run_training, unet_stage


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("phase1")
    run_training(unet_stage(), out)  # attention only at level 0
    return out


def test_added_attention_starts_as_identity(trained):
    source = load_model(trained).unet.eval()
    grown = UNet(dataclasses.replace(source.config, attention_levels=(True, True))).eval()
    added = warm_start_unet(grown, trained)
    assert added and all(name.startswith(("down_blocks.1.", "up_blocks.0.")) for name in added)
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx), source(x, t, ctx), rtol=0, atol=1e-6)
    # the new blocks are trainable from there: only their output projection was zeroed
    block = grown.get_submodule(added[0])
    assert block.proj_out.weight.abs().sum() == 0 and block.proj_in.weight.abs().sum() > 0


def test_other_architecture_changes_are_refused(trained):
    cfg = load_model(trained).unet.config
    with pytest.raises(CheckpointError, match="does not fit this U-Net"):
        warm_start_unet(UNet(dataclasses.replace(cfg, block_out_channels=(16, 24), norm_num_groups=8)), trained)
    with pytest.raises(CheckpointError, match="not in the source"):
        warm_start_unet(UNet(dataclasses.replace(cfg, layers_per_block=2)), trained)


def test_training_with_warm_start_runs(trained, tmp_path):
    run_training(unet_stage(warm_start=str(trained), unet={"attention_levels": [True, True]},
                            train={"max_steps": 2}), tmp_path)
    grown = load_model(tmp_path).unet
    assert tuple(grown.config.attention_levels) == (True, True)
