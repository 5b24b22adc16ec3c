"""Generation parameters in PNG text chunks, in the "parameters" format A1111 writes and reads,
so existing tools (A1111's PNG Info, ComfyUI, civitai) show how an image was made."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, PngImagePlugin

# our sampler names -> the names A1111 shows
A1111_SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_ancestral": "Euler a",
                       "heun": "Heun", "dpmpp_2m": "DPM++ 2M"}


def infotext(prompt: str, negative_prompt: str, *, steps: int, sampler: str, karras: bool, guidance_scale: float,
             seed: int, width: int, height: int, model_hash: str, model_name: str, extra: dict | None = None) -> str:
    fields = {"Steps": steps, "Sampler": A1111_SAMPLER_NAMES.get(sampler, sampler)}
    if karras:
        fields["Schedule type"] = "Karras"
    fields.update({"CFG scale": f"{guidance_scale:g}", "Seed": seed, "Size": f"{width}x{height}",
                   "Model hash": model_hash, "Model": model_name})
    fields.update(extra or {})
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def read_parameters(path: Path) -> str | None:
    with Image.open(path) as im:
        return im.text.get("parameters") if hasattr(im, "text") else None
