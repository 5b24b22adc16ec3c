"""Side-by-side speed of ldm and diffusers on the same SD1.5-architecture weights.

Both pipelines share one set of random (or --model) weights. Runs alternate A B A B after a warm-up,
and the report gives medians and ldm/diffusers ratios for: U-Net time per guided step (batch 2: CFG),
end-to-end time per image, and the peak extra memory of a generation (RSS sampled every 5 ms on CPU,
torch.cuda.max_memory_allocated on GPU).

    .venv/bin/python scripts/benchmark.py --device cpu --resolution 256 --steps 20 --repeats 3
    .venv/bin/python scripts/benchmark.py --ldm-options winograd,channels_last   # ldm's opt-in options

diffusers always runs with its defaults. `--ldm-options` takes a comma list of winograd, im2col,
channels_last, fuse_qkv, compile and step_cache=N (the one that changes the output);
winograd_transient is Winograd that rebuilds its kernels per call. Memory that an option keeps for
the whole session (cached Winograd kernels, fused QKV weights) is reported on its own line,
since "peak extra memory" is measured per generation, after the warm-up has built it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import string
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import psutil
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sd15_pipeline(model: str | None, dtype: torch.dtype):
    """diffusers' StableDiffusionPipeline with SD1.5's architecture (random weights unless --model)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if model:
        return StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # the defaults are SD1.5's
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    tmp = Path(tempfile.mkdtemp())
    # a character-level CLIP vocabulary: token count per prompt differs from CLIP-L's BPE, but every
    # prompt is padded to 77 tokens, so the text encoder does exactly CLIP-L's amount of work
    chars = [c for c in string.printable if not c.isspace()]
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text.eval(), tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def ldm_pipeline_from(ref, device: str, dtype: torch.dtype):
    """Our Pipeline over the very same tensors (copied into our modules) and text encoder."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.io.diffusers_config import unet_config_from_diffusers, vae_config_from_diffusers
    from ldm.io.model_files import ModelParts
    from ldm.pipeline import Pipeline
    from ldm.sampling.schedule import NoiseSchedule
    from ldm.text.clip import ClipTextEncoder
    from ldm.models.unet import UNet
    from ldm.io.weights import load_state_dict_checked

    unet = UNet(unet_config_from_diffusers(dict(ref.unet.config)))
    load_state_dict_checked(unet, ref.unet.state_dict(), "unet")
    vae = AutoencoderKL(vae_config_from_diffusers(dict(ref.vae.config)))
    load_state_dict_checked(vae, ref.vae.state_dict(), "vae")
    parts = ModelParts(unet.eval(), vae.eval(), ClipTextEncoder(ref.text_encoder, ref.tokenizer),
                       NoiseSchedule.from_diffusers_config(dict(ref.scheduler.config)), "bench", "0" * 10)
    pipe = Pipeline(parts, device, dtype)
    pipe.progress = False
    return pipe


OPTIONS = ("winograd", "winograd_transient", "im2col", "channels_last", "fuse_qkv", "compile", "step_cache")


def parse_ldm_options(options: str) -> dict[str, int | bool]:
    """`winograd,step_cache=3` -> {"winograd": True, "step_cache": 3}; bad input exits with one line."""
    parsed: dict[str, int | bool] = {}
    for item in filter(None, options.split(",")):
        name, _, value = item.partition("=")
        if name not in OPTIONS:
            raise SystemExit(f"error: unknown --ldm-options entry '{name}' (choose from {', '.join(OPTIONS)})")
        if name == "step_cache":
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"error: --ldm-options step_cache needs a positive interval, e.g. step_cache=3, got '{item}'")
            parsed[name] = int(value)
        elif value:
            raise SystemExit(f"error: --ldm-options {name} takes no value, got '{item}'")
        else:
            parsed[name] = True
    if "winograd" in parsed and "winograd_transient" in parsed:
        raise SystemExit("error: --ldm-options takes winograd or winograd_transient, not both")
    return parsed


def apply_ldm_options(pipe, options: dict[str, int | bool]) -> None:
    pipe.optimize(channels_last="channels_last" in options, fuse_qkv="fuse_qkv" in options,
                  compile="compile" in options, im2col="im2col" in options,
                  winograd="cached" if "winograd" in options else "transient" if "winograd_transient" in options else False)
    if "step_cache" in options:
        pipe.enable_step_cache(int(options["step_cache"]))


def kept_memory_mb(pipe) -> float:
    """Memory the options keep across generations on top of the weights: cached Winograd kernels
    (built on first use) and the concatenated weights of fused QKV projections."""
    from ldm.fast.attention import FastAttention
    from ldm.fast.conv_paths import PathConv2d

    kept = []
    for module in (m for model in (pipe.parts.unet, pipe.parts.vae) for m in model.modules()):
        if isinstance(module, PathConv2d):
            kept.append(module._kernel)
        elif isinstance(module, FastAttention):
            kept += [module.fused_weight, module.fused_bias]
    return sum(t.numel() * t.element_size() for t in kept if t is not None) / 2**20


class PeakMemory:
    """Peak extra memory while the block runs: RSS sampled in a thread on CPU, allocator stats on GPU."""

    def __init__(self, device: str) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        proc = psutil.Process()
        self.base, self.stop = proc.memory_info().rss, threading.Event()

        def sample() -> None:
            while not self.stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss - self.base)
                time.sleep(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_unet_steps(fn, device: str, steps: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--repeats", type=int, default=3, help="A/B rounds after the warm-up")
    ap.add_argument("--unet-steps", type=int, default=3, help="guided U-Net calls per timing")
    ap.add_argument("--model", help="real SD1.5 weights (diffusers folder) instead of random ones")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--ldm-options", default="", help="comma list: winograd,winograd_transient,im2col,channels_last,fuse_qkv,compile,step_cache=N")
    args = ap.parse_args()
    options = parse_ldm_options(args.ldm_options)  # before minutes of building the models
    dtype, device = DTYPES[args.dtype], args.device

    ref = sd15_pipeline(args.model, dtype).to(device)
    ref.set_progress_bar_config(disable=True)
    ours = ldm_pipeline_from(ref, device, dtype)
    apply_ldm_options(ours, options)
    latent = args.resolution // 8
    x = torch.randn(2 * args.batch, 4, latent, latent, device=device, dtype=dtype)
    if "channels_last" in options:
        x_ours = x.contiguous(memory_format=torch.channels_last)  # what the pipeline feeds it
    else:
        x_ours = x
    ctx = torch.randn(2 * args.batch, 77, 768, device=device, dtype=dtype)
    t = torch.tensor([500.0] * (2 * args.batch), device=device)
    prompts = ["a photograph of an astronaut riding a horse"] * args.batch
    gen_kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.resolution, width=args.resolution)

    @torch.inference_mode()
    def unet_a():
        ours.parts.unet(x_ours, t, ctx)

    @torch.inference_mode()
    def unet_b():
        ref.unet(x, t, encoder_hidden_states=ctx)

    def e2e_a():
        ours(prompts, sampler="ddim", seed=0, output_type="np", **gen_kw)

    def e2e_b():
        ref(prompts, generator=torch.Generator().manual_seed(0), output_type="np", **gen_kw)

    results: dict[str, dict[str, list[float]]] = {"ldm": {}, "diffusers": {}}
    # warm-up: allocator, oneDNN/cuDNN plans, and anything an option builds on first use (Winograd's
    # kernels), so that "peak extra memory" is that of a generation, not of a first generation
    for unet_fn in (unet_a, unet_b):
        unet_fn()
    ours(prompts, sampler="ddim", seed=0, output_type="np", **(gen_kw | {"num_inference_steps": 1}))
    ref(prompts, generator=torch.Generator().manual_seed(0), output_type="np", **(gen_kw | {"num_inference_steps": 1}))
    for _ in range(args.repeats):
        for name, unet_fn, e2e_fn in (("ldm", unet_a, e2e_a), ("diffusers", unet_b, e2e_b)):
            r = results[name]
            r.setdefault("unet_step_s", []).append(time_unet_steps(unet_fn, device, args.unet_steps))
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                e2e_fn()
                sync(device)
                r.setdefault("image_s", []).append((time.perf_counter() - start) / args.batch)
            r.setdefault("peak_mem_mb", []).append(mem.peak / 2**20)

    kept_mb = kept_memory_mb(ours)
    med = {impl: {k: statistics.median(v) for k, v in r.items()} for impl, r in results.items()}
    report = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()} {psutil.cpu_count()} cpus",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "settings": vars(args) | {"json": str(args.json) if args.json else None}, "median": med,
        "speedup": {k: med["diffusers"][k] / med["ldm"][k] for k in ("unet_step_s", "image_s")},
        "memory_ratio": med["ldm"]["peak_mem_mb"] / max(med["diffusers"]["peak_mem_mb"], 1e-9),
        "it_per_s": {impl: 1 / m["unet_step_s"] for impl, m in med.items()},
        "ldm_options": args.ldm_options, "ldm_kept_mb": kept_mb,
    }
    print(json.dumps(report, indent=2))
    print(f"\n| metric | ldm | diffusers | ldm speed-up |\n|---|---|---|---|")
    print(f"| U-Net guided step (s) | {med['ldm']['unet_step_s']:.3f} | {med['diffusers']['unet_step_s']:.3f} | "
          f"{report['speedup']['unet_step_s']:.2f}x |")
    print(f"| image, {args.steps} steps (s) | {med['ldm']['image_s']:.2f} | {med['diffusers']['image_s']:.2f} | "
          f"{report['speedup']['image_s']:.2f}x |")
    print(f"| peak extra memory (MB) | {med['ldm']['peak_mem_mb']:.0f} | {med['diffusers']['peak_mem_mb']:.0f} | "
          f"{report['memory_ratio']:.2f} (ldm/diffusers) |")
    if kept_mb:
        print(f"| kept by ldm's options for the session (MB) | {kept_mb:.0f} | | |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
