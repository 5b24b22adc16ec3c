"""Training throughput: our `ldm train` step vs a plain loop over diffusers' UNet2DConditionModel.

Both sides train the same-sized U-Net (from a stage-2 config) on the same objective (eps MSE, AdamW,
gradient clipping) with the same batch, on precomputed latents and text states:
  ours       the real training command (accelerate, data loader, per-step NaN/stop checks, logging)
             with cache_latents + cache_text, so that only the U-Net step remains to be compared;
  diffusers  a bare PyTorch loop: add_noise, forward, loss, backward, clip, step, zero_grad.
Each side runs in its own process, so peak memory (CUDA: max allocated; CPU: max RSS) is its own.

    python scripts/train_throughput.py --config configs/default_unet.yaml --steps 20 --batch-size 32
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_ours(args: argparse.Namespace) -> dict:
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.io.diffusers_config import vae_config_to_diffusers
    from ldm.shapes.dataset import write_shapes_dataset
    from ldm.train.config import load_config
    from ldm.train.runner import train
    from ldm.io.weights import write_json, write_safetensors

    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae_cfg = load_config(args.vae_config).vae
        vae = AutoencoderKL(vae_cfg)  # random weights: only its latent shape matters here
        write_safetensors(tmp / "vae" / "diffusion_pytorch_model.safetensors", vae.state_dict())
        write_json(tmp / "vae" / "config.json", vae_config_to_diffusers(vae_cfg))
        data = write_shapes_dataset(tmp / "data", 2 * args.batch_size, resolution=cfg.data.resolution, progress=False)
        total = args.warmup + args.steps
        cfg = load_config(args.config, [
            f"vae={tmp / 'vae'}", f"data.path={data}", f"train.batch_size={args.batch_size}",
            f"train.max_steps={total}", f"train.checkpoint_every={total}", "train.log_every=1", "train.progress=false",
            "train.validation_every=0", "validation.prompts=[]", f"train.mixed_precision={args.mixed_precision}",
            "cache_latents=true", "cache_text=true", "ema.enabled=false", "diffusion.min_snr_gamma=null",
            f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}"])
        train(cfg, tmp / "out")
        rows = [json.loads(line) for line in (tmp / "out" / "train_log.jsonl").read_text().splitlines()]
    timed = rows[args.warmup:]
    seconds = sum(args.batch_size / r["samples_per_s"] for r in timed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"samples_per_s": len(timed) * args.batch_size / seconds, "peak_mb": peak_memory_mb(device)}


def run_diffusers(args: argparse.Namespace) -> dict:
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ldm.io.diffusers_config import unet_config_to_diffusers
    from ldm.text import load_minilm
    from ldm.train.config import load_config

    cfg = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ucfg = unet_config_to_diffusers(cfg.unet)
    ucfg.pop("_class_name")
    unet = UNet2DConditionModel(**ucfg).to(device).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    factor = 2 ** (len(load_config(args.vae_config).vae.block_out_channels) - 1)
    side = cfg.data.resolution // factor
    tokens = cfg.text_encoder.max_length or load_minilm().max_length
    latents = torch.randn(args.batch_size, cfg.unet.in_channels, side, side, device=device)
    states = torch.randn(args.batch_size, tokens, cfg.unet.cross_attention_dim, device=device)
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (args.batch_size,), device=device)
        x = sched.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = unet(x, t, states).sample
        loss = F.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        loss.item()  # what any loop that logs its loss does every step

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"samples_per_s": args.steps * args.batch_size / (time.perf_counter() - start),
            "peak_mb": peak_memory_mb(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "default_unet.yaml")
    p.add_argument("--vae-config", type=Path, default=REPO / "configs" / "default_vae.yaml",
                   help="stage-1 config giving the latent shape")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--impl", choices=["both", "ours", "diffusers"], default="both")
    args = p.parse_args()
    if args.impl != "both":
        result = run_ours(args) if args.impl == "ours" else run_diffusers(args)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for impl in ("ours", "diffusers"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[impl] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; batch {args.batch_size}; {args.steps} timed steps; "
          f"mixed precision {args.mixed_precision}")
    print("| implementation | samples/s | peak memory (MiB) |")
    print("|---|---|---|")
    for impl, r in results.items():
        print(f"| {impl} | {r['samples_per_s']:.1f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
