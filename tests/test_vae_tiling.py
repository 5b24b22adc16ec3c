"""VAE tiling and slicing (ldm/fast/vae_tiling.py) and the Pipeline switches for them.

Tiling is an approximation. A tile's GroupNorm statistics and mid-block attention see only that
tile, and convolutions near a tile edge see padding. On the tiny random VAE (decoder receptive
field of about 12 latent cells) the measured errors against the untiled decode, for 48x48 latents
in tiles of 32 latents (64 px) overlapping by 16 (32 px), are: mean abs 0.019 and max abs 0.155,
where the output has std 0.35. We bound them at 0.025 and 0.2. Wherever tiling is exact, the
tests check equality.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.models.autoencoder import AutoencoderKL
from ldm.io.diffusers_config import vae_config_from_diffusers
from ldm.pipeline import Pipeline
from ldm.fast.vae_tiling import VaeTiling, blend_tiles, decode_latents, encode_images, tile_starts
from ldm.io.weights import load_state_dict_checked
from tiny import tiny_vae, write_tiny_sd_folder

TILED_MEAN_TOL, TILED_MAX_TOL = 0.025, 0.2  # measured 0.019 / 0.155, see above
SLICE_TOL = 1e-5  # batch-size-dependent conv kernels round differently (measured 2e-6)


@pytest.fixture(scope="module")
def vae():
    ref = tiny_vae()
    ours = AutoencoderKL(vae_config_from_diffusers(dict(ref.config)))
    load_state_dict_checked(ours, ref.state_dict(), "vae")
    return ours.eval()


def counting(vae, method):
    calls = []
    original = getattr(vae, method)

    def counted(x):
        calls.append(tuple(x.shape))
        return original(x)
    return counted, calls


@pytest.mark.parametrize("length,tile,overlap", [(48, 32, 16), (100, 32, 8), (33, 32, 4), (64, 16, 0), (20, 32, 8)])
def test_tile_starts_cover_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    for a, b in zip(starts, starts[1:]):
        assert a < b and a + size - b >= overlap


@pytest.mark.parametrize("shape,tile,overlap", [((2, 3, 20, 36), 8, 2), ((1, 1, 17, 9), 6, 3), ((1, 2, 12, 12), 4, 0)])
def test_blending_is_exact_for_a_pointwise_function(shape, tile, overlap):
    # where every tile computes exactly what the whole image would, blending the tiles must not change it
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    fn = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest") * 3 - 1  # noqa: E731
    got = blend_tiles(fn, x, tile, overlap, scale=2)
    assert got.shape == fn(x).shape
    assert (got - fn(x)).abs().max().item() <= 1e-6


def test_tiled_decode_is_close_to_untiled(vae, monkeypatch):
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode(z)
        counted, calls = counting(vae, "decode")
        monkeypatch.setattr(vae, "decode", counted)
        tiled = decode_latents(vae, z, VaeTiling(tile=64, overlap=32))
    assert calls == [(1, 4, 32, 32)] * 4  # 2 x 2 tiles of 32 latents
    err = (tiled - full).abs()
    assert tiled.shape == full.shape
    assert 0 < err.mean().item() <= TILED_MEAN_TOL
    assert err.max().item() <= TILED_MAX_TOL


def test_bigger_tiles_are_closer(vae):
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = vae.decode(z)
        errors = [(decode_latents(vae, z, VaeTiling(tile, 16)) - full).abs().mean().item() for tile in (32, 48, 64)]
    assert errors[0] > errors[1] > errors[2]


def test_one_tile_is_exact_and_slicing_matches(vae):
    z = torch.randn(3, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = vae.decode(z)
        assert torch.equal(decode_latents(vae, z, VaeTiling(tile=48, overlap=8)), full)  # 32x48 px fits
        sliced = decode_latents(vae, z, slicing=True)
        assert (sliced - full).abs().max().item() <= SLICE_TOL
        for i in range(3):  # one image at a time is exactly what slicing runs
            assert torch.equal(sliced[i:i + 1], vae.decode(z[i:i + 1]))
        both = decode_latents(vae, z, VaeTiling(tile=32, overlap=8), slicing=True)
        assert torch.equal(both[1:2], decode_latents(vae, z[1:2], VaeTiling(tile=32, overlap=8)))


def test_tiled_encode(vae):
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        full = vae.encode(x)
        one_tile = encode_images(vae, x, VaeTiling(tile=96, overlap=16))
        assert torch.equal(one_tile.mean, full.mean) and torch.equal(one_tile.std, full.std)
        tiled = encode_images(vae, x, VaeTiling(tile=64, overlap=32))
    assert tiled.mean.shape == full.mean.shape
    err = (tiled.mean - full.mean).abs()
    # measured mean 0.0096 and max 0.079, against posterior means of mean magnitude 0.24
    assert 0 < err.mean().item() <= 0.015 and err.max().item() <= 0.12


@pytest.mark.parametrize("tile,overlap,match", [(63, 8, "multiple of 2"), (64, 64, r"\[0, tile\)"),
                                                (64, -2, r"\[0, tile\)"), (0, 0, "positive")])
def test_bad_tiling_is_a_clear_error(vae, tile, overlap, match):
    with pytest.raises(ValueError, match=match):
        decode_latents(vae, torch.zeros(1, 4, 8, 8), VaeTiling(tile, overlap))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = Pipeline.from_pretrained(write_tiny_sd_folder(tmp_path_factory.mktemp("sd")))
    pipe.progress = False
    return pipe


def test_pipeline_switches(pipe):
    kw = dict(prompt=["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=3.0, height=64,
              width=64, seed=0, output_type="np")
    default = pipe(**kw).images
    try:
        pipe.enable_vae_tiling(tile=64, overlap=16)  # one tile: nothing changes
        assert np.array_equal(pipe(**kw).images, default)
        pipe.enable_vae_tiling(tile=32, overlap=16)
        tiled = pipe(**kw).images
        assert tiled.shape == default.shape and not np.array_equal(tiled, default)
        assert np.abs(tiled - default).mean() <= 0.015  # pixels in [0, 1]: measured 0.0089 (max 0.065)
        pipe.disable_vae_tiling()
        pipe.enable_vae_slicing()
        assert np.abs(pipe(**kw).images - default).max() <= SLICE_TOL
        pipe.disable_vae_slicing()
        assert np.array_equal(pipe(**kw).images, default)
        with pytest.raises(ValueError, match="multiple of 2"):
            pipe.enable_vae_tiling(tile=33)
    finally:
        pipe.disable_vae_tiling()
        pipe.disable_vae_slicing()


def test_pipeline_img2img_with_tiling(pipe):
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    kw = dict(prompt="a red circle", strength=0.5, num_inference_steps=2, guidance_scale=3.0, seed=1,
              output_type="latent")
    default = pipe.img2img(Image.fromarray(image), **kw).images
    try:
        pipe.enable_vae_tiling(tile=32, overlap=16)
        tiled = pipe.img2img(Image.fromarray(image), **kw).images
    finally:
        pipe.disable_vae_tiling()
    assert tiled.shape == default.shape and torch.isfinite(tiled).all()
    assert 0 < (tiled - default).abs().mean().item() <= 0.01  # measured 0.0065, latents of mean magnitude 0.84
