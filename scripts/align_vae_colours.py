"""Give every palette colour's latent a shared "object here" direction, so img2img keeps objects in place.

img2img at strength 0.7 leaves the input at about a third of its scale under noise. The denoiser keeps
a recoloured object where it was only if the faint old colour is evidence for the new colour at that
place, that is, if the two colours' latent offsets from the background point the same way
(`scripts/img2img_colour_geometry.py` measures this). In the trained VAE some pairs point apart
(purple/white: cosine -0.76), and then a faithful denoiser draws the new colour somewhere else.

All eight offsets do lie in one half-space: some unit direction w has a positive cosine with every
one of them. This script finds the w that maximises the smallest such cosine and rescales the latent
space along it: z' = A z - c, with A = I + (k - 1) w w^T and c the mean of A z over the data. So the
map stretches what images vary in, not the constant background, and the new latents have zero mean.
Stretching by k pulls every offset towards w: the faint blob of any colour now says "some object is
here" more loudly than "it is this colour".

The map is folded into the VAE's own 1x1 convolutions (the mean rows of `quant_conv`; its inverse
into `post_quant_conv`), so the result is a standard diffusers AutoencoderKL: decode(encode(x)) is
unchanged, and the scaling factor is measured again (1/std of the new latents, as stage 1 does). The
posterior's log-variance rows are left as they are: at this VAE's KL weight its std (0.04 after
scaling) is far below the latents' spread (about 1).

The model's U-Net is carried into the new space too, for a warm start: `conv_in` reads through
A^-1 and `conv_out` writes through A (with the change of scaling factor). That is exact for what the
model does with the signal; the noise is now isotropic in the new space, which fine-tuning must learn.

    .venv/bin/python scripts/align_vae_colours.py --model runs/unet_debiased --stretch 4 \\
        --data data/shapes --out runs/aligned_init
    # then: ldm train ... --set vae=runs/aligned_init/vae --set warm_start=runs/aligned_init
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from img2img_colour_geometry import colour_offsets, cosines
from ldm.io.model_files import save_diffusers_folder
from ldm.pipeline import Pipeline
from ldm.train.config import DataConfig
from ldm.train.data import CaptionDataset, scan_records
from ldm.train.stage_vae import posterior_std


def shared_direction(offsets: dict[str, torch.Tensor], iters: int = 4000) -> tuple[torch.Tensor, float]:
    """The unit w maximising min_c cos(w, offset_c) (a hard-margin separator through the origin)."""
    d = torch.stack(list(offsets.values())).double()
    d = d / d.norm(dim=1, keepdim=True)
    w = d.mean(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for i in range(iters):
        temperature = 0.1 * (1 - i / iters) + 1e-3  # soft-min annealed towards the hard minimum
        margin = d @ (w / w.norm())
        loss = temperature * torch.logsumexp(-margin / temperature, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = (w / w.norm()).detach()
    return w.float(), float((d @ w).min())


def stretch_matrix(w: torch.Tensor, k: float) -> torch.Tensor:
    return torch.eye(len(w)) + (k - 1) * torch.outer(w, w)


@torch.no_grad()
def fold_into_vae(vae, a: torch.Tensor, centre: torch.Tensor) -> None:
    """z' = A z - c: the mean rows of quant_conv get A and -c, post_quant_conv undoes both."""
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise SystemExit("error: the VAE has no quant_conv/post_quant_conv to fold the map into")
    lc = a.shape[0]
    q, p, a_inv = vae.quant_conv, vae.post_quant_conv, torch.linalg.inv(a)
    q.weight[:lc] = torch.einsum("ij,jkab->ikab", a, q.weight[:lc])
    q.bias[:lc] = a @ q.bias[:lc] - centre
    p.bias += p.weight[:, :, 0, 0] @ (a_inv @ centre)
    p.weight.copy_(torch.einsum("ijab,jk->ikab", p.weight, a_inv))


@torch.no_grad()
def fold_into_unet(unet, m: torch.Tensor) -> None:
    """The U-Net saw x = M^-1 x' and predicted in the old space: read through M^-1, write through M."""
    unet.conv_in.weight.copy_(torch.einsum("oiab,ij->ojab", unet.conv_in.weight, torch.linalg.inv(m)))
    unet.conv_out.weight.copy_(torch.einsum("ij,jkab->ikab", m, unet.conv_out.weight))
    unet.conv_out.bias.copy_(m @ unet.conv_out.bias)


def image_batches(data: Path, n: int, batch_size: int = 128) -> list[torch.Tensor]:
    """The first `n` images of the dataset, read by the same loader training uses (bad files skipped)."""
    cfg = DataConfig(path=str(data), verify_images=False)
    records, _ = scan_records(cfg, need_captions=False)
    dataset = CaptionDataset(records, cfg, seed=0)
    n = min(n, len(dataset))
    return [torch.stack([dataset.pixels(i, False)[0] for i in range(start, min(n, start + batch_size))])
            for start in range(0, n, batch_size)]


@torch.no_grad()
def latent_mean(vae, batches: list[torch.Tensor]) -> torch.Tensor:
    """Per-channel mean of the (unscaled) posterior means over the images."""
    return torch.cat([vae.encode(x).mean for x in batches]).mean((0, 2, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a trained model folder (its VAE and U-Net)")
    ap.add_argument("--stretch", type=float, default=4.0, help="k: how much w is stretched (default 4)")
    ap.add_argument("--data", type=Path, required=True, help="the dataset, to measure the new scaling factor")
    ap.add_argument("--samples", type=int, default=512, help="images for the scaling factor (default 512)")
    ap.add_argument("--out", type=Path, required=True, help="where to write the model folder")
    args = ap.parse_args()
    if args.stretch < 1:
        raise SystemExit(f"error: --stretch must be >= 1, got {args.stretch}")
    try:
        pipe = Pipeline.from_pretrained(args.model)
        batches = image_batches(args.data, args.samples)
    except ValueError as e:  # DataError is one too
        raise SystemExit(f"error: {e}") from None
    parts = pipe.parts
    offsets = colour_offsets(pipe)
    w, margin = shared_direction(offsets)
    if margin <= 0:
        raise SystemExit(f"error: the palette's latent offsets share no half-space (best margin {margin:.3f})")
    a = stretch_matrix(w, args.stretch)
    old_scale = parts.vae.config.scaling_factor
    # centred on the data's mean as well: stretching the constant background along w would otherwise
    # inflate the measured std, and the scaling factor would shrink everything the image varies in
    fold_into_vae(parts.vae, a, a @ latent_mean(parts.vae, batches))
    parts.vae.config.scaling_factor = 1.0 / posterior_std(parts.vae, batches, torch.Generator().manual_seed(0))
    fold_into_unet(parts.unet, parts.vae.config.scaling_factor / old_scale * a)
    after = cosines(colour_offsets(pipe))
    worst = min((v, a_, b) for (a_, b), v in after.items() if a_ < b)
    print(f"shared direction w = {[round(x, 3) for x in w.tolist()]}, smallest cosine with it {margin:.3f}")
    print(f"stretch {args.stretch}: scaling factor {old_scale:.5g} -> {parts.vae.config.scaling_factor:.5g}; "
          f"smallest pairwise cosine now {worst[0]:.2f} ({worst[1]}/{worst[2]})")
    save_diffusers_folder(parts, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
