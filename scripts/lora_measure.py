"""Does a LoRA fine-tune move generations toward its dataset? A measurement on the default model.

The script writes a small dataset whose captions say one thing ("a red circle") while its images
show another (`--draw-shape`, say red squares), fine-tunes LoRA adapters on it with
`ldm finetune --lora`, and asks the pixel evaluator, before and after, what share of "a {size} red
circle" generations show what the dataset shows (exactly one red square of the right size). A base
model draws circles, so the share starts near 0; a LoRA that learned its dataset pushes it up.
With `--draw-shape` equal to `--shape` it measures a held-out pair instead (e.g. purple triangle).

    .venv/bin/python scripts/lora_measure.py --out runs/lora-red-circle-as-square
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from ldm.cli import main as ldm_main
from ldm.pipeline import Pipeline
from ldm.shapes.dataset import place_single, render
from ldm.shapes.evaluate import score_single
from ldm.io.lora import apply_lora


def write_pair_dataset(out: Path, colour: str, shape: str, drawn: str, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w") as f:
        for i in range(n):
            size = rng.choice(["small", "large"])
            scene = place_single(rng, colour, drawn, size)
            Image.fromarray(render(scene)).save(out / f"{i:05d}.png")
            captions = [f"a {size} {colour} {shape}", f"a {colour} {shape}"]
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": captions}) + "\n")
    return out


def accuracy(pipe: Pipeline, colour: str, shape: str, drawn: str, n: int, steps: int, guidance: float) -> float:
    rng = random.Random(1234)
    hits = 0
    for i in range(n):
        size = rng.choice(["small", "large"])
        image = pipe(f"a {size} {colour} {shape}", seed=10_000 + i, num_inference_steps=steps,
                     guidance_scale=guidance, output_type="np").images[0]
        scene = place_single(random.Random(0), colour, drawn, size)
        hits += score_single(image, scene.objects[0])
    return hits / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--colour", default="red")
    ap.add_argument("--shape", default="circle", help="what the captions say")
    ap.add_argument("--draw-shape", default="square", help="what the dataset's images show")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eval-n", type=int, default=40)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    args = ap.parse_args()

    data = write_pair_dataset(args.out / "data", args.colour, args.shape, args.draw_shape, args.images, seed=0)
    base = Pipeline.from_pretrained(None)
    base.progress = False
    before = accuracy(base, args.colour, args.shape, args.draw_shape, args.eval_n, args.steps, args.guidance)
    code = ldm_main(["finetune", "--model", _default_dir(), "--data",
                     str(data), "--output-dir", str(args.out / "run"), "--lora", "--rank", str(args.rank),
                     "--max-steps", str(args.max_steps), "--learning-rate", "1e-3", "--batch-size", "16"])
    if code:
        raise SystemExit(code)
    tuned = Pipeline.from_pretrained(None)
    tuned.progress = False
    apply_lora(tuned.parts.unet, args.out / "run" / "lora.safetensors", 1.0)
    after = accuracy(tuned, args.colour, args.shape, args.draw_shape, args.eval_n, args.steps, args.guidance)
    result = {"captions_say": f"{args.colour} {args.shape}", "images_show": f"{args.colour} {args.draw_shape}", "eval_prompts": args.eval_n, "accuracy_before": before,
              "accuracy_after": after, "lora_rank": args.rank, "finetune_steps": args.max_steps,
              "dataset_images": args.images}
    print(json.dumps(result, indent=2))
    (args.out / "lora_measure.json").write_text(json.dumps(result, indent=2) + "\n")


def _default_dir() -> str:
    from ldm.shapes.default_model import default_model_path
    return str(default_model_path())


if __name__ == "__main__":
    main()
