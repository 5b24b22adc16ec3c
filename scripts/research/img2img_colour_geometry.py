"""Why img2img recolouring moves the object: the VAE's latent directions of the palette colours.

img2img at strength 0.7 starts from the input's latents at about a third of their scale, under noise.
To keep the object where it is, the denoiser must read the faint blob as "the new colour, here". It
can do that only when the blob's latent offset from the background points the same way as the new
colour's. When the two offsets point apart (cosine <= 0), the faint blob is evidence *against* the
new colour at that place. A faithful denoiser then explains the blob as noise and draws the new
colour somewhere else.

This prints the cosine between every two palette colours' latent offsets from the grey background.
(`ldm.shapes.align_vae` re-bases the VAE so that they share a direction.) With `--eval-images DIR` (written by `ldm eval shapes --save-images DIR`), it also splits the
img2img cases by that cosine and counts the passes on each side.

    .venv/bin/python scripts/research/img2img_colour_geometry.py [--model DIR] [--eval-images DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ldm.pipeline import Pipeline
from ldm.shapes.align_vae import colour_offsets, cosines
from ldm.shapes.dataset import COLOURS
from ldm.shapes.prompt_sets import eval_cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    ap.add_argument("--eval-images", type=Path, default=None, help="a folder from `ldm eval shapes --save-images`")
    ap.add_argument("--n", type=int, default=50, help="the --n that eval ran with (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="the --seed that eval ran with (default 0)")
    ap.add_argument("--split", type=float, default=0.3, help="cosine that splits the img2img cases (default 0.3)")
    args = ap.parse_args()
    try:
        pipe = Pipeline.from_pretrained(args.model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    cos = cosines(colour_offsets(pipe))
    names = list(COLOURS)
    print("cosine between palette colours' latent offsets from the background")
    print(" " * 7 + "".join(f"{n:>8s}" for n in names))
    for a in names:
        print(f"{a:>7s}" + "".join(f"{cos[a, b]:8.2f}" for b in names))
    if args.eval_images is None:
        return
    split = {"low": [0, 0], "high": [0, 0]}
    for i, case in enumerate(eval_cases(args.n, args.seed)["img2img"]):
        found = sorted(args.eval_images.glob(f"img2img_{i:03d}_*.png"))
        if not found:
            raise SystemExit(f"error: no img2img_{i:03d}_*.png in {args.eval_images} (wrong --n/--seed?)")
        side = "high" if cos[case.init.objects[0].colour, case.expected.objects[0].colour] >= args.split else "low"
        split[side][0] += found[0].stem.endswith("_ok")
        split[side][1] += 1
    for side, (ok, total) in split.items():
        sign = ">=" if side == "high" else "<"
        print(f"img2img cases with cosine {sign} {args.split}: {ok}/{total} pass")


if __name__ == "__main__":
    main()
