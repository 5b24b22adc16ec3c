"""SDXL-sized random weights: peak memory and time per step of ldm and of diffusers'
StableDiffusionXLPipeline, each measured in its own process so one's memory never counts for the other.

    .venv/bin/python scripts/sdxl_benchmark.py write /tmp/sdxl_random          # once: ~7 GB of fp16 weights
    .venv/bin/python scripts/sdxl_benchmark.py compare /tmp/sdxl_random --resolution 1024 --json out.json

`write` saves a diffusers SDXL base folder with SDXL's exact architecture (2.6B-parameter U-Net, CLIP-L
and OpenCLIP-bigG-shaped text encoders, the SDXL VAE) and random weights, stored in fp16 as most SDXL
downloads are. `compare` runs, for each implementation in a fresh process: load, a 1-step and a 2-step
fp32 generation (guided, Euler) at the resolution; time per step is the difference of the two, and the
peak is the process's maximum resident set size (ru_maxrss), load included.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def write_folder(out: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from tiny import write_tiny_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        use_linear_projection=True, transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ).half()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.13025, force_upcast=True).half()
    tok_dir = write_tiny_clip_tokenizer(out / "_tokenizer")  # character-level: every prompt pads to 77 anyway
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, max_position_embeddings=77,
               vocab_size=49408)
    first = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, hidden_act="quick_gelu", **ids)).half()
    second = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                        **ids)).half()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=first, text_encoder_2=second, tokenizer=tokenizer,
                                     tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, pad_token="!"), unet=unet,
                                     scheduler=scheduler)
    pipe.save_pretrained(out, max_shard_size="20GB")
    print(out)


def measure(impl: str, folder: Path, resolution: int) -> dict:
    """One implementation in this process: load, 1-step and 2-step generations."""
    start = time.perf_counter()
    if impl == "ldm":
        from ldm.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(folder)
        pipe.progress = False

        def run(steps: int):
            pipe("a photo of a castle", num_inference_steps=steps, guidance_scale=5.0, sampler="euler", seed=0,
                 height=resolution, width=resolution, output_type="np")
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)

        def run(steps: int):
            pipe("a photo of a castle", num_inference_steps=steps, guidance_scale=5.0, height=resolution,
                 width=resolution, generator=torch.Generator().manual_seed(0), output_type="np")
    load_s = time.perf_counter() - start
    times = {}
    for steps in (1, 2):
        t0 = time.perf_counter()
        with torch.inference_mode():
            run(steps)
        times[steps] = time.perf_counter() - t0
    return {"impl": impl, "resolution": resolution, "load_s": load_s, "one_step_image_s": times[1],
            "seconds_per_step": times[2] - times[1],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "threads": torch.get_num_threads()}


def compare(folder: Path, resolution: int, json_out: Path | None) -> None:
    rows = []
    for impl in ("ldm", "diffusers"):
        done = subprocess.run([sys.executable, __file__, "measure", str(folder), impl, "--resolution", str(resolution)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{impl} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    ours, theirs = rows
    summary = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "rows": rows,
               "step_ratio_diffusers_over_ldm": theirs["seconds_per_step"] / ours["seconds_per_step"],
               "peak_ratio_ldm_over_diffusers": ours["peak_rss_gb"] / theirs["peak_rss_gb"]}
    print(json.dumps(summary, indent=2))
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("write").add_argument("out", type=Path)
    m = sub.add_parser("measure")
    m.add_argument("folder", type=Path)
    m.add_argument("impl", choices=["ldm", "diffusers"])
    m.add_argument("--resolution", type=int, default=1024)
    c = sub.add_parser("compare")
    c.add_argument("folder", type=Path)
    c.add_argument("--resolution", type=int, default=1024)
    c.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.command == "write":
        write_folder(args.out)
    elif args.command == "measure":
        print(json.dumps(measure(args.impl, args.folder, args.resolution)))
    else:
        compare(args.folder, args.resolution, args.json)


if __name__ == "__main__":
    main()
