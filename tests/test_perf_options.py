"""Opt-in speed and memory options: fused QKV, channels_last, query-chunked attention, Winograd
convolutions, torch.compile and DeepCache-style step caching.

The first four must not change the output. The bound is 1e-5 max abs difference on the U-Net or
VAE output (fp32), the same bound as our equivalence with diffusers; only the order of operations
differs. Step caching does change the output. Its quality cost is measured by
scripts/sampler_error.py. Here we check that the cached path computes what it claims to, and that
the script's measurement set-up holds (same start for every sampler, convergence).
"""
import csv
import dataclasses
import math
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldm.fast.attention import configure_attention
from ldm.models.attention import Attention
from ldm.models.autoencoder import AutoencoderKL
from ldm.io.diffusers_config import unet_config_from_diffusers, vae_config_from_diffusers
from ldm.pipeline import Pipeline
from ldm.sampling.plan import plan_sampling
from ldm.fast.step_cache import StepCache
from ldm.models.unet import UNet, UNetConfig
from ldm.io.weights import load_state_dict_checked
from ldm.fast.conv_paths import configure_convolutions
from tiny import tiny_unet, tiny_vae, write_tiny_sd_folder

TOL = 1e-5


def ours(reference, build, convert):
    model = build(convert(dict(reference.config)))
    load_state_dict_checked(model, reference.state_dict(), "test")
    return model.eval()


def unet_inputs(batch=2, size=(16, 24), seed=1):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(batch, 4, *size, generator=g), torch.randn(batch, 7, 32, generator=g)
    return x, torch.tensor([999.0, 10.0][:batch]), ctx


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """The tiny models' layers are below the measured pay-off bounds; lift them."""
    import ldm.fast.conv_paths as c

    monkeypatch.setattr(c, "MIN_CHANNELS", 1)
    monkeypatch.setattr(c, "WINOGRAD_MAX_PIXELS", 10**9)
    monkeypatch.setattr(c, "IM2COL_OVER_WINOGRAD_PIXELS", 100)  # both paths run somewhere in the tiny models


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_fused_qkv_channels_last_and_chunking_keep_the_unet_output(variant, winograd_everywhere):
    ref = tiny_unet(variant)
    unet = ours(ref, UNet, unet_config_from_diffusers)
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        want = unet(x, t, ctx)
        keys = unet.state_dict().keys()
        configure_attention(unet, fuse_projections=True)
        assert unet.state_dict().keys() == keys  # checkpoint keys untouched: the fused weight is not saved
        assert (unet(x, t, ctx) - want).abs().max().item() <= TOL
        load_state_dict_checked(unet, ref.state_dict(), "reload")  # loading still sees the plain keys
        unet.to(memory_format=torch.channels_last)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert (unet(x, t, ctx) - want).abs().max().item() <= TOL
        configure_attention(unet, query_chunk=100)  # 384 tokens at the first level: 4 chunks
        assert (unet(x, t, ctx) - want).abs().max().item() <= TOL
        assert configure_convolutions(unet, winograd=True) > 0
        assert (unet(x, t, ctx) - want).abs().max().item() <= TOL
        configure_convolutions(unet, winograd=True, im2col=True)
        assert (unet(x, t, ctx) - want).abs().max().item() <= TOL
        configure_convolutions(unet, winograd="transient", im2col=True)  # the memory-free set
        assert (unet(x, t, ctx) - want).abs().max().item() <= TOL


def test_vae_options_keep_the_decode_and_the_encode(winograd_everywhere):
    vae = ours(tiny_vae(), AutoencoderKL, vae_config_from_diffusers)
    g = torch.Generator().manual_seed(0)
    z, image = torch.randn(2, 4, 12, 20, generator=g), torch.rand(2, 3, 24, 40, generator=g) * 2 - 1
    with torch.no_grad():
        want, want_latents = vae.decode(z), vae.encode(image).mean
        configure_attention(vae, query_chunk=64, fuse_projections=True)  # the biased single-head variant
        vae.to(memory_format=torch.channels_last)
        assert (vae.decode(z) - want).abs().max().item() <= TOL
        for winograd in ("cached", "transient"):
            # the encoder's stride-2 downsamplers (padded right/bottom only) take im2col on small maps
            configure_convolutions(vae, winograd=winograd, im2col=True)
            assert (vae.decode(z) - want).abs().max().item() <= TOL
            assert (vae.encode(image).mean - want_latents).abs().max().item() <= TOL


def test_query_chunks_split_the_attention(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(16, heads=2, head_dim=8, context_dim=12).eval()
    x, ctx = torch.randn(2, 23, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        want = attn(x, ctx)
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda q, k, v: calls.append(q.shape[2]) or sdpa(q, k, v))
        configure_attention(attn, query_chunk=10)
        got = attn(x, ctx)
    assert calls == [10, 10, 3]
    assert (got - want).abs().max().item() <= TOL


def test_fused_projections_follow_weight_changes_and_keep_gradients():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, head_dim=8, bias=True, norm_groups=4).eval()  # the VAE's biased variant
    other = {k: torch.randn_like(v) for k, v in attn.state_dict().items()}
    x = torch.randn(1, 16, 3, 5)
    configure_attention(attn, fuse_projections=True)
    attn.load_state_dict(other)  # after fusing: the fused copy must be rebuilt, not reused
    with torch.no_grad():
        fused = attn(x)
        configure_attention(attn)  # back to the plain module
        assert (fused - attn(x)).abs().max().item() <= TOL
    configure_attention(attn, fuse_projections=True)
    attn.train()
    attn(x).square().sum().backward()  # with gradients on, the projections themselves run
    for lin in (attn.to_q, attn.to_k, attn.to_v):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_bad_options_are_clear_errors():
    attn = Attention(16, heads=2, head_dim=8)
    with pytest.raises(ValueError, match="query chunk must be >= 1"):
        configure_attention(attn, query_chunk=0)
    attn.to_q = nn.Sequential(nn.Linear(16, 16, bias=False))  # stands in for an adapter-wrapped projection
    with pytest.raises(ValueError, match="merge them first"):
        configure_attention(attn, fuse_projections=True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="interval must be an integer >= 1"):
            StepCache(bad)


def test_step_cache_interval_one_is_the_plain_unet():
    unet = ours(tiny_unet("sd1"), UNet, unet_config_from_diffusers)
    x, t, ctx = unet_inputs()
    cache = StepCache(interval=1)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(cache(unet, x, t, ctx), unet(x, t, ctx))
    assert cache.full_calls == 3


def test_step_cache_shallow_call_reuses_the_deep_features():
    unet = ours(tiny_unet("sd2"), UNet, unet_config_from_diffusers)
    x, t, ctx = unet_inputs()
    x2, t2, _ = unet_inputs(seed=5)
    cache = StepCache(interval=3)
    with torch.no_grad():
        full = cache(unet, x, t, ctx)
        # same inputs again: the cached deep features are exactly this input's, so the result is too
        assert (cache(unet, x, t, ctx) - full).abs().max().item() <= 1e-6
        shallow = cache(unet, x2, t2, ctx)  # other inputs on stale deep features: an approximation
        assert not torch.allclose(shallow, unet(x2, t2, ctx), atol=1e-3)
        assert cache.full_calls == 1
        cache(unet, x2, t2, ctx)  # call 4: refresh
        cache(unet, x2[:1], t2[:1], ctx[:1])  # a batch change cannot use the cache either
    assert cache.calls == 5 and cache.full_calls == 3


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = Pipeline.from_pretrained(write_tiny_sd_folder(tmp_path_factory.mktemp("sd")))
    pipe.progress = False
    return pipe


KW = dict(prompt=["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=4.0, seed=0)


def test_pipeline_optimize_keeps_the_output(pipe, winograd_everywhere):
    default = pipe(**KW, output_type="latent").images
    try:
        pipe.optimize()  # everything off: bit-identical
        assert torch.equal(pipe(**KW, output_type="latent").images, default)
        pipe.optimize(channels_last=True, fuse_qkv=True, attention_chunk=64, winograd=True, im2col=True)
        got = pipe(**KW, output_type="latent").images
        assert (got - default).abs().max().item() <= 1e-4  # the pipeline's latent bound against diffusers
    finally:
        pipe.optimize()
    assert torch.equal(pipe(**KW, output_type="latent").images, default)


def test_pipeline_step_cache(pipe):
    default = pipe(**KW, sampler="euler", output_type="latent").images
    try:
        pipe.enable_step_cache(1)
        assert torch.equal(pipe(**KW, sampler="euler", output_type="latent").images, default)
        pipe.enable_step_cache(2)
        cached = pipe(**KW, sampler="euler", output_type="latent").images
        again = pipe(**KW, sampler="euler", output_type="latent").images  # a fresh cache per run
        with pytest.raises(ValueError, match="interval"):
            pipe.enable_step_cache(0)
    finally:
        pipe.disable_step_cache()
    assert torch.equal(cached, again) and torch.isfinite(cached).all()
    assert not torch.equal(cached, default)
    rel = ((cached - default).pow(2).mean() / default.pow(2).mean()).item()
    assert rel < 1e-3  # relative latent MSE: measured 1.2e-4 with 2 of 4 calls cached, on a random U-Net
    assert torch.equal(pipe(**KW, sampler="euler", output_type="latent").images, default)


@pytest.mark.slow
def test_compile_option(pipe):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("inductor needs a C++ compiler on CPU")
    # The smallest U-Net with every block kind keeps the cold inductor compile at about 40 s on 1 core.
    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_out_channels=[8], layers_per_block=1, attention_levels=[True],
                           cross_attention_dim=8, num_heads=2, norm_num_groups=4, sample_size=8)).eval()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 3, 8)
    with torch.no_grad():
        want = unet(x, t, ctx)
    keys = list(unet.state_dict())
    small = Pipeline(dataclasses.replace(pipe.parts, unet=unet))
    small.optimize(compile=True)
    assert small.parts.unet is unet and list(unet.state_dict()) == keys  # compiled in place: same keys
    try:
        with torch.no_grad():
            got = unet(x, t, ctx)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        pytest.skip(f"inductor cannot compile here: {str(e).splitlines()[0]}")
    assert (got - want).abs().max().item() <= TOL
    assert np.isfinite(got.numpy()).all()


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sampler_error.py"


def test_sampler_error_script_starts_every_sampler_at_the_same_point(pipe):
    start_latents = runpy.run_path(str(SCRIPT))["start_latents"]
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    trailing = dataclasses.replace(pipe.parts.schedule, timestep_spacing="trailing")
    small = Pipeline(dataclasses.replace(pipe.parts, schedule=trailing))
    starts = []
    for sampler in ("euler", "heun", "dpmpp_2m", "ddim"):
        plan = plan_sampling(trailing, sampler, 10)
        x = start_latents(small, noise, sampler, 10, False) * plan.init_noise_sigma  # what the pipeline samples from
        starts.append(x * math.sqrt(1 + plan.sigmas[0].item() ** 2) if plan.vp_latents else x)  # in VE space
    for x in starts[1:]:
        assert (x - starts[0]).abs().max().item() <= 1e-5 * starts[0].abs().max().item()


def test_sampler_error_script_starts_zero_snr_samplers_at_the_same_noise(pipe):
    """On a zero-terminal-SNR schedule DDIM starts at sigma = infinity (VP latents = the noise itself),
    Euler and DPM-Solver at 4096: in VP space all three must start from the same noise."""
    start_latents = runpy.run_path(str(SCRIPT))["start_latents"]
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    zsnr = dataclasses.replace(pipe.parts.schedule, timestep_spacing="trailing", steps_offset=0,
                               prediction_type="v_prediction", rescale_betas_zero_snr=True)
    small = Pipeline(dataclasses.replace(pipe.parts, schedule=zsnr))
    for sampler in ("euler", "dpmpp_2m", "ddim"):
        plan = plan_sampling(zsnr, sampler, 10)
        x = start_latents(small, noise, sampler, 10, False) * plan.init_noise_sigma
        vp = x if plan.vp_latents else x / math.sqrt(1 + plan.sigmas[0].item() ** 2)
        assert torch.isfinite(vp).all() and (vp - noise).abs().max().item() <= 1e-5 * noise.abs().max().item()


def test_sampler_error_script_runs(tmp_path, monkeypatch):
    model = tmp_path / "model"
    write_tiny_sd_folder(model)
    out = tmp_path / "err"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--model", str(model), "--samplers", "euler,heun", "--steps",
                                      "2,8", "--reference-steps", "40", "--step-cache", "2", "--cache-samplers",
                                      "euler", "--out", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    with open(out.with_suffix(".csv")) as fh:
        rows = {(r["sampler"], int(r["steps"])): r for r in csv.DictReader(fh)}
    assert set(rows) == {(s, n) for s in ("euler", "heun", "euler+cache2") for n in (2, 8)}
    mse = {k: float(r["mse"]) for k, r in rows.items()}
    assert mse["euler", 8] < mse["euler", 2] and mse["heun", 8] < mse["euler", 8]  # convergence, and order
    assert rows["heun", 8]["nfe"] == "15" and rows["euler+cache2", 8]["full_unet"] == "4"
    assert "| euler+cache2 |" in out.with_suffix(".md").read_text()


def test_benchmark_options_parse_or_fail_with_one_line():
    parse = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"))["parse_ldm_options"]
    assert parse("") == {}
    assert parse("winograd,im2col,step_cache=3") == {"winograd": True, "im2col": True, "step_cache": 3}
    for bad, words in (("bogus", "unknown"), ("step_cache=x", "positive interval"), ("step_cache", "positive"),
                       ("winograd=1", "takes no value"), ("winograd,winograd_transient", "not both")):
        with pytest.raises(SystemExit, match=words):
            parse(bad)
