"""Give every palette colour's latent a shared "object here" direction, so img2img keeps objects in place.

img2img at strength 0.7 leaves the input at about a third of its scale under noise. The denoiser keeps
a recoloured object where it was only if the faint old colour is evidence for the new colour at that
place, that is, if the two colours' latent offsets from the background point the same way
(`scripts/research/img2img_colour_geometry.py` measures this). In the trained VAE some pairs point apart
(purple/white: cosine -0.76), and then a faithful denoiser draws the new colour somewhere else.

All eight offsets do lie in one half-space: some unit direction w has a positive cosine with every
one of them. `align_vae_colours` finds the w that maximises the smallest such cosine and rescales the
latent space along it: z' = A z - c, with A = I + (k - 1) w w^T and c the mean of A z over the data.
So the map stretches what images vary in, not the constant background, and the new latents have zero
mean. Stretching by k pulls every offset towards w: the faint blob of any colour now says "some object
is here" more loudly than "it is this colour".

The map is folded into the VAE's own 1x1 convolutions (the mean rows of `quant_conv`; its inverse
into `post_quant_conv`), so the result is a standard diffusers AutoencoderKL: decode(encode(x)) is
unchanged, and the scaling factor is measured again (1/std of the new latents, as stage 1 does). The
posterior's log-variance rows are left as they are: at this VAE's KL weight its std (0.04 after
scaling) is far below the latents' spread (about 1).

The model's U-Net is carried into the new space too, for a warm start: `conv_in` reads through
A^-1 and `conv_out` writes through A (with the change of scaling factor). That is exact for what the
model does with the signal; the noise is now isotropic in the new space, which fine-tuning must learn.
The default model's recipe runs this on stage 5 with k = 4 before stage 7 (`ldm recipe default-model`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldm.io.model_files import save_diffusers_folder
from ldm.pipeline import Pipeline
from ldm.shapes.dataset import BACKGROUND, COLOURS, FRAME
from ldm.train.config import DataConfig
from ldm.train.data import CaptionDataset, scan_records
from ldm.train.stage_vae import posterior_std


@torch.no_grad()
def colour_offsets(pipe: Pipeline, resolution: int = FRAME) -> dict[str, torch.Tensor]:
    """Each palette colour's scaled latent (a flat image, centre latent pixel) minus the background's."""
    vae = pipe.parts.vae

    def latent(rgb: tuple[int, int, int]) -> torch.Tensor:
        x = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, resolution, resolution)
        z = vae.scale_latents(vae.encode((x / 127.5 - 1).to(pipe.device, pipe.dtype)).mean)
        return z[0, :, z.shape[2] // 2, z.shape[3] // 2].float().cpu()

    background = latent(BACKGROUND)
    return {c: latent(rgb) - background for c, rgb in COLOURS.items()}


def cosines(offsets: dict[str, torch.Tensor]) -> dict[tuple[str, str], float]:
    return {(a, b): float(torch.nn.functional.cosine_similarity(offsets[a], offsets[b], dim=0))
            for a in offsets for b in offsets}


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
        raise ValueError("the VAE has no quant_conv/post_quant_conv to fold the map into")
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


def image_batches(data: Path | str, n: int, batch_size: int = 128) -> list[torch.Tensor]:
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


def align_vae_colours(model: Path | str, data: Path | str, out: Path | str, stretch: float = 4.0,
                      samples: int = 512) -> str:
    """Write to `out` the model folder `model` with its VAE re-based (stretch k = `stretch` along the
    shared colour direction, centred on the first `samples` images of `data`) and its U-Net carried
    over. Returns a one-line summary; bad input is a one-line ValueError."""
    if stretch < 1:
        raise ValueError(f"stretch must be >= 1, got {stretch}")
    pipe = Pipeline.from_pretrained(model)
    batches = image_batches(data, samples)
    parts = pipe.parts
    w, margin = shared_direction(colour_offsets(pipe))
    if margin <= 0:
        raise ValueError(f"the palette's latent offsets share no half-space (best margin {margin:.3f})")
    a = stretch_matrix(w, stretch)
    old_scale = parts.vae.config.scaling_factor
    # centred on the data's mean as well: stretching the constant background along w would otherwise
    # inflate the measured std, and the scaling factor would shrink everything the image varies in
    fold_into_vae(parts.vae, a, a @ latent_mean(parts.vae, batches))
    parts.vae.config.scaling_factor = 1.0 / posterior_std(parts.vae, batches, torch.Generator().manual_seed(0))
    fold_into_unet(parts.unet, parts.vae.config.scaling_factor / old_scale * a)
    worst = min((v, a_, b) for (a_, b), v in cosines(colour_offsets(pipe)).items() if a_ < b)
    save_diffusers_folder(parts, out)
    return (f"shared direction w = {[round(x, 3) for x in w.tolist()]}, smallest cosine with it {margin:.3f}; "
            f"stretch {stretch}: scaling factor {old_scale:.5g} -> {parts.vae.config.scaling_factor:.5g}, "
            f"smallest pairwise cosine now {worst[0]:.2f} ({worst[1]}/{worst[2]})")
