"""Generation parameters in PNG text chunks, in the "parameters" format A1111 writes and reads, so
existing tools (A1111's PNG Info, ComfyUI, civitai) show how an image was made.

The format: the prompt, then an optional `Negative prompt: ...` line, then one line of
`Key: value` fields separated by ", ". A value holding a comma, colon or newline is JSON-quoted, as
A1111's `quote()` does. This module knows the format only; ldm/settings.py knows the fields.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

NEGATIVE = "Negative prompt: "
# A1111's own field pattern (modules/infotext_utils.py): a key, then a quoted or comma-free value
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n\"") else value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def format_infotext(prompt: str, negative_prompt: str, fields: dict[str, str]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE + negative_prompt)
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) of a `parameters` text, A1111's or ours."""
    # Windows line ends and a trailing newline are not part of the text (A1111 strips it whole, but
    # leading spaces can be part of a prompt)
    *lines, last = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    if len(_FIELD.findall(last)) < 3:  # A1111's test for "this last line is not the fields line"
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):]
        (negative if in_negative else prompt).append(line)
    fields = {key.strip(): _unquote(value.strip()) for key, value in _FIELD.findall(last)}
    return "\n".join(prompt), "\n".join(negative), fields


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def read_parameters(path: Path) -> str | None:
    """The `parameters` text of a PNG, or None; a missing or unreadable file is a one-line ValueError."""
    try:
        with Image.open(path) as im:
            return im.text.get("parameters") if hasattr(im, "text") else None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
