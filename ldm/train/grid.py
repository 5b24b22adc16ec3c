"""Sample grids written during training: images in a grid, each with its caption underneath."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_LINE = 11  # px per caption line with PIL's built-in bitmap font
_CHAR = 6  # approximate px per character of that font


def image_grid(images: list[Image.Image], captions: list[str] | None = None, columns: int | None = None,
               caption_lines: int = 4) -> Image.Image:
    if not images:
        raise ValueError("image_grid needs at least one image")
    # tiny training resolutions are blown up (nearest, so pixels stay honest) to a viewable size
    images = [im.resize((im.width * (128 // im.width), im.height * (128 // im.width)), Image.NEAREST)
              if im.width < 64 else im for im in images]
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w = max(max(im.width for im in images), 128)  # wide enough for a readable caption under tiny images
    h = max(im.height for im in images)
    text_h = _LINE * caption_lines + 4 if captions else 0
    grid = Image.new("RGB", (columns * w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, im in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (h + text_h)
        grid.paste(im.convert("RGB"), (x + (w - im.width) // 2, y))
        if captions:
            lines = textwrap.wrap(captions[i] or "(empty caption)", width=max(8, w // _CHAR))[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x + 2, y + h + 2 + j * _LINE), line, fill="black", font=font)
    return grid


def save_grid(images: list[Image.Image], path: Path, captions: list[str] | None = None,
              columns: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, captions, columns).save(path)
    return path
