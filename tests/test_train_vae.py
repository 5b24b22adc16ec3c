"""Stage 1: the KL autoencoder with its patch discriminator; the VAE folder it writes; the losses."""
from __future__ import annotations

import json

import pytest
import torch

from test_train_common import assert_identical, checkpoint_state, run_training, unet_stage, vae_stage


pytestmark = pytest.mark.usefixtures("one_thread")


def test_vae_stage_writes_a_loadable_folder_with_measured_scaling_factor(tmp_path):
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.io.diffusers_config import vae_config_from_diffusers
    from ldm.train.config import DataConfig
    from ldm.train.data import CaptionDataset, scan_records
    from ldm.io.weights import load_state_dict_checked, read_safetensors

    out = tmp_path / "vae"
    cfg = vae_stage(loss={"disc_start": 2, "disc_channels": 8, "disc_layers": 2}, ema={"enabled": True, "decay": 0.9})
    run_training(cfg, out)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # the discriminator joins the generator's loss only from disc_start (step index 2 = the 3rd step)
    assert ["disc_weight" in r for r in log] == [False, False, True, True]
    assert all("d_loss" in r and "rec_loss" in r and "kl" in r for r in log)
    assert (out / "samples" / "step-00000004.png").is_file()

    vae_cfg = vae_config_from_diffusers(json.loads((out / "config.json").read_text()))
    vae = AutoencoderKL(vae_cfg)
    load_state_dict_checked(vae, read_safetensors(out / "diffusion_pytorch_model.safetensors")[0], "vae")
    assert vae_cfg.block_out_channels == [8, 16] and vae_cfg.latent_channels == 4
    # scaling_factor = 1 / std of posterior samples of the data, recomputed independently here
    records, _ = scan_records(DataConfig(path=cfg["data"]["path"], resolution=16))
    ds = CaptionDataset(records, DataConfig(path=cfg["data"]["path"], resolution=16), seed=0)
    x = torch.stack([ds.pixels(i, False)[0] for i in range(8)])
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 2]).sample(g) for g in [torch.Generator().manual_seed(0)]
                       for i in range(0, 8, 2)])
    assert vae_cfg.scaling_factor == pytest.approx(1.0 / z.double().std(unbiased=False).item(), rel=1e-5)
    assert vae.scale_latents(z).std().item() == pytest.approx(1.0, rel=1e-3)


def test_vae_resume_is_exact_with_discriminator(tmp_path):
    cfg = vae_stage(loss={"disc_start": 1, "disc_channels": 8, "disc_layers": 2},
                    train={"gradient_accumulation_steps": 2}, data={"random_flip": True})
    run_training(cfg, tmp_path / "a", overrides=["train.max_steps=4"])
    run_training(cfg, tmp_path / "b", overrides=["train.max_steps=2"])
    run_training(cfg, tmp_path / "b", resume="latest", overrides=["train.max_steps=4"])
    state = checkpoint_state(tmp_path / "a" / "checkpoints" / "step-00000004")
    assert "model_1.safetensors:net.0.weight" in state and "optimizer_1.bin" in state  # the discriminator
    assert_identical(state, checkpoint_state(tmp_path / "b" / "checkpoints" / "step-00000004"))


def test_stage_2_trains_on_the_stage_1_vae(tmp_path):
    from ldm.io.model_files import load_model

    run_training(vae_stage(train={"max_steps": 1}), tmp_path / "vae")
    run_training(unet_stage(vae=str(tmp_path / "vae"), unet={"cross_attention_dim": 32}, train={"max_steps": 1}),
                 tmp_path / "model")
    parts = load_model(tmp_path / "model")
    assert parts.vae.config.block_out_channels == [8, 16]
    written = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert parts.vae.config.scaling_factor == written["scaling_factor"]


def test_generator_term_leaves_discriminator_grads_alone():
    from ldm.train.vae_loss import PatchDiscriminator, logits_without_param_grads

    disc = PatchDiscriminator(3, 8, 2)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    (-logits_without_param_grads(disc, x).mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    # and the logits are the discriminator's own
    assert torch.equal(logits_without_param_grads(disc, x), disc(x))


def test_vae_losses():
    from ldm.train.config import VAELossConfig
    from ldm.train.vae_loss import adaptive_weight, hinge_d_loss, reconstruction_loss

    x, r = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    # per-sample sums (48 pixels x 0.5), averaged over the batch
    assert reconstruction_loss(x, r, VAELossConfig(l1_weight=1.0)).item() == pytest.approx(24.0)
    assert reconstruction_loss(x, r, VAELossConfig(l1_weight=0.0, l2_weight=2.0)).item() == pytest.approx(24.0)
    assert hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])).item() == pytest.approx(0.5 * (0.5 + 0.75))
    w = torch.ones(3, requires_grad=True)
    assert adaptive_weight((w * 4).sum(), (w * 2).sum(), w).item() == pytest.approx(2.0, rel=1e-4)
