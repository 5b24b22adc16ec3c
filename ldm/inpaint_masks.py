"""Inpainting masks on the image side: reading, inverting, blurring, filling the masked content, and
compositing the result back over the input, as A1111 does. White (255) means "repaint".

The model sees a hard mask (binarized at 0.5, as diffusers' mask processor does); the composite uses the
blurred one, so the seam is soft while every pixel the blurred mask leaves at 0 keeps the input's value.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

FILL_MODES = ("original", "fill", "latent-noise", "latent-nothing")
A1111_FILL_NAMES = {"original": "original", "fill": "fill", "latent-noise": "latent noise",
                    "latent-nothing": "latent nothing"}


def load_mask(mask: Image.Image | str | Path) -> Image.Image:
    """A greyscale mask from any image mode. Transparent parts of an RGBA/LA/palette mask (a mask painted
    on a canvas) count as black, what is painted as its own grey level."""
    if not isinstance(mask, Image.Image):
        try:
            with Image.open(mask) as im:
                im.load()
                mask = im.copy()
        except FileNotFoundError:
            raise ValueError(f"{mask}: no such mask file") from None
        except (OSError, SyntaxError) as e:
            raise ValueError(f"{mask}: not a readable image ({e})") from None
    if mask.mode == "P":
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA"):
        black = Image.new("RGBA", mask.size, (0, 0, 0, 255))
        mask = Image.alpha_composite(black, mask.convert("RGBA"))
    return mask.convert("L")


@dataclass
class InpaintMask:
    hard: Image.Image  # what the model repaints (0 or 255)
    soft: Image.Image  # the composite's alpha: the blurred mask


def prepare_mask(mask: Image.Image, image_size: tuple[int, int], *, blur: int, invert: bool) -> InpaintMask:
    if mask.size != image_size:
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image_size[0]}x{image_size[1]}")
    if invert:
        mask = Image.eval(mask, lambda v: 255 - v)
    soft = mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask
    hard = soft.point(lambda v: 255 if v >= 128 else 0)  # diffusers binarizes its mask at 0.5
    if hard.getbbox() is None:
        raise ValueError("the mask is empty: nothing to repaint (white marks what to repaint; see --invert-mask)")
    return InpaintMask(hard=hard, soft=soft)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" (modules/masking.py): the known pixels, premultiplied by their coverage, blurred at
    ever smaller radii and laid over each other, so the hole takes the colours of its surroundings."""
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def composite(generated: Image.Image, original: Image.Image, soft: Image.Image) -> Image.Image:
    """The generated pixels where the (blurred) mask is white, the original's elsewhere."""
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.LANCZOS)
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), soft)


def crop_box(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """A1111's "only masked" region (diffusers' get_crop_region): the mask's bounding box grown by `pad`,
    then widened or heightened about its centre to the generation size's aspect ratio, kept inside the image."""
    left, top, right, bottom = mask.getbbox()
    w, h = mask.size
    x1, y1, x2, y2 = max(left - pad, 0), max(top - pad, 0), min(right + pad, w), min(bottom + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, diff: int, limit: int) -> tuple[int, int]:
    a, b = a - diff // 2, b + diff - diff // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def composite_arrays(generated: np.ndarray, original: Image.Image, soft: Image.Image,
                     box: tuple[int, int, int, int] | None) -> np.ndarray:
    """Images [N, h, w, 3] in [0, 1] composited over `original` through `soft`: where the blurred mask is 0
    the input's pixels stay exactly. With an only-masked `box` each image is resized to it and pasted first.
    Without one the composite is at the generation size (the input resized to it, if it had to be)."""
    out = []
    for image in generated:
        if box is not None:
            x1, y1, x2, y2 = box
            piece = Image.fromarray((image * 255).round().astype(np.uint8)).resize((x2 - x1, y2 - y1), Image.LANCZOS)
            canvas = original.copy()
            canvas.paste(piece, (x1, y1))
            image = np.asarray(canvas, dtype=np.float32) / 255
            base, alpha = original, soft
        else:
            size = (image.shape[1], image.shape[0])
            base = original if original.size == size else original.resize(size, Image.LANCZOS)
            alpha = soft if soft.size == size else soft.resize(size, Image.LANCZOS)
        a = np.asarray(alpha, dtype=np.float32)[..., None] / 255
        out.append(np.asarray(base, dtype=np.float32) / 255 * (1 - a) + image * a)
    return np.stack(out)


def outpaint_canvas(image: Image.Image, left: int, right: int, up: int, down: int, factor: int,
                    overlap: int) -> tuple[Image.Image, Image.Image]:
    """The image on a canvas grown by the given borders (the right and bottom ones rounded up so the size
    is a multiple of `factor`), and the mask of what to paint: the new border plus `overlap` pixels into the
    original, so that the blurred seam falls across known pixels."""
    for name, value in (("left", left), ("right", right), ("up", up), ("down", down)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"outpaint {name} must be an integer >= 0 pixels, got {value!r}")
    if not left + right + up + down:
        raise ValueError("outpaint needs at least one of --left/--right/--up/--down")
    width, height = image.width + left + right, image.height + up + down
    right += -width % factor
    down += -height % factor
    width, height = image.width + left + right, image.height + up + down
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image, (left, up))
    mask = Image.new("L", (width, height), 255)
    keep = (left + (overlap if left else 0), up + (overlap if up else 0),
            left + image.width - (overlap if right else 0), up + image.height - (overlap if down else 0))
    if keep[2] > keep[0] and keep[3] > keep[1]:
        mask.paste(0, keep)
    return canvas, mask
