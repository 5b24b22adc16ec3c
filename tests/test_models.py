"""Our U-Net and autoencoder against diffusers' on tiny random configs, with the same weights.

Tolerance: 1e-5 max abs difference (fp32; both sides run the same math, only op order may differ).
"""
import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.io.diffusers_config import unet_config_from_diffusers, vae_config_from_diffusers
from ldm.models.unet import UNet
from ldm.io.weights import CheckpointError, load_state_dict_checked
from tiny import tiny_unet, tiny_vae

TOL = 1e-5


def ours_from(reference, build, convert):
    model = build(convert(dict(reference.config)))
    load_state_dict_checked(model, reference.state_dict(), "test")
    return model.eval()


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("size", [(16, 16), (24, 40)])
def test_unet_matches_diffusers(variant, size):
    ref = tiny_unet(variant)
    ours = ours_from(ref, UNet, unet_config_from_diffusers)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    for t in (torch.tensor([999, 10]), torch.tensor(421.5)):
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=ctx).sample
            got = ours(x, t, ctx)
        assert (got - want).abs().max().item() <= TOL


def test_unet_odd_latent_size_matches_diffusers():
    ref = tiny_unet("sd1")
    ours = ours_from(ref, UNet, unet_config_from_diffusers)
    x = torch.randn(1, 4, 13, 9)
    ctx = torch.randn(1, 5, 32)
    with torch.no_grad():
        assert (ours(x, 5, ctx) - ref(x, 5, encoder_hidden_states=ctx).sample).abs().max() <= TOL


def test_vae_matches_diffusers():
    ref = tiny_vae()
    ours = ours_from(ref, AutoencoderKL, vae_config_from_diffusers)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        post_ref = ref.encode(x).latent_dist
        post = ours.encode(x)
        assert (post.mean - post_ref.mean).abs().max() <= TOL
        assert (post.std - post_ref.std).abs().max() <= TOL
        z_ref = post_ref.sample(generator=torch.Generator().manual_seed(3))
        z = post.sample(torch.Generator().manual_seed(3))
        assert (z - z_ref).abs().max() <= TOL
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() <= TOL


def test_shape_mismatch_names_key_and_shapes():
    ref = tiny_unet("sd1")
    ours = UNet(unet_config_from_diffusers(dict(ref.config)))
    state = dict(ref.state_dict())
    state["conv_in.weight"] = torch.zeros(32, 5, 3, 3)
    with pytest.raises(CheckpointError, match=r"conv_in\.weight.*\(32, 4, 3, 3\).*\(32, 5, 3, 3\)"):
        load_state_dict_checked(ours, state, "unet")
    del state["conv_in.weight"]
    with pytest.raises(CheckpointError, match="missing key 'conv_in.weight'"):
        load_state_dict_checked(ours, state, "unet")


def test_unsupported_config_is_refused_by_name():
    cfg = dict(tiny_unet("sd1").config)
    cfg["addition_embed_type"] = "text_time"
    with pytest.raises(ValueError, match="addition_embed_type"):
        unet_config_from_diffusers(cfg)


def test_gradient_checkpointing_gives_same_gradients():
    ref = tiny_unet("sd1")
    ours = ours_from(ref, UNet, unet_config_from_diffusers).train()
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 3, 32)
    ours(x, 3, ctx).square().mean().backward()
    plain = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours.gradient_checkpointing = True
    ours(x, 3, ctx).square().mean().backward()
    for a, p in zip(plain, ours.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
