"""The typed settings of one generation: validated once, written to and read from a PNG's infotext.

The pipeline, the CLI, `ldm eval` and training's validation samples all build a
`GenerationSettings`. `validate()` is the one place user-facing settings are checked, each failure
a one-line ValueError. `to_infotext()` / `from_infotext()` use A1111's field names wherever A1111
has one, so its PNG Info still parses our PNGs and ours parses its.

Two numbers are counted differently here and in A1111, and converted at the infotext boundary:
- clip_skip follows diffusers (1 = the penultimate layer); A1111's `Clip skip` is one more (2).
- sampler names are ours (`dpmpp_2m`); A1111 shows `DPM++ 2M`, with `Schedule type: Karras`.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ldm.inpaint_masks import A1111_FILL_NAMES, FILL_MODES
from ldm.io.png_info import format_infotext, parse_infotext
from ldm.io.weights import file_sha256
from ldm.sampling.plan import SAMPLER_NAMES
from ldm.text.prompt_syntax import EMPHASIS_MODES

A1111_SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_ancestral": "Euler a",
                       "heun": "Heun", "dpmpp_2m": "DPM++ 2M"}
_SAMPLERS_BY_A1111_NAME = {v: k for k, v in A1111_SAMPLER_NAMES.items()}
A1111_EMPHASIS_NAMES = {"original": "Original", "no-norm": "No norm", "none": "None"}
_EMPHASIS_BY_A1111_NAME = {v: k for k, v in A1111_EMPHASIS_NAMES.items()}
_LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]+)>")
# in a prompt A1111 also takes <lora:name> (weight 1) and <lora:name:te:unet> (two weights)
_PROMPT_LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")
_NOT_IN_LORA_NAMES = ":,<>\n"  # they would break the <lora:name:w> tag or the Lora hashes list
# SDXL's size conditioning: settings field -> infotext key (ours: A1111 writes none of them)
_XL_PAIRS = {"original_size": "Original size", "crops_coords_top_left": "Crop top left", "target_size": "Target size",
             "negative_original_size": "Negative original size",
             "negative_crops_coords_top_left": "Negative crop top left", "negative_target_size": "Negative target size"}
HIRES_UPSCALERS = ("latent", "lanczos")
_HIRES_A1111 = {"latent": "Latent", "lanczos": "Lanczos"}
_REFINER = re.compile(r"(.*?) \[([0-9a-fA-F]*)\]")  # A1111: "Refiner: name [hash]"


def lora_hash(path: Path) -> str:
    """A1111's LoRA hash (`Lora hashes`): the first 12 hex digits of the file's sha256."""
    return file_sha256(path)[:12]


@dataclass(frozen=True)
class LoraRef:
    """A LoRA applied at `weight`. `name` is the file's stem, as A1111's `<lora:name:w>` names it."""
    name: str
    weight: float = 1.0
    path: Path | None = None
    hash: str | None = None

    @classmethod
    def from_file(cls, path: Path | str, weight: float = 1.0) -> LoraRef:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such LoRA file")
        return cls(path.stem, float(weight), path, lora_hash(path)).check()

    def check(self) -> LoraRef:
        if not self.name or any(c in self.name for c in _NOT_IN_LORA_NAMES):
            raise ValueError(f"LoRA name {self.name!r} cannot be written as A1111's <lora:name:weight> "
                             f"(no {' '.join(repr(c) for c in _NOT_IN_LORA_NAMES)}): rename the file")
        if not math.isfinite(self.weight):
            raise ValueError(f"LoRA {self.name}: weight must be a finite number, got {self.weight}")
        return self


@dataclass(frozen=True)
class EmbeddingRef:
    """A textual-inversion embedding a prompt used: its trigger word (the file's stem) and file hash."""
    name: str
    hash: str | None = None


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without A1111's `<lora:name:weight>` tags, and the (name, weight) of each, in order.
    The tags are cut out as A1111 does before encoding; a prompt without any comes back unchanged."""
    tags = list(_PROMPT_LORA_TAG.finditer(prompt))
    if not tags:
        return prompt, []
    found = []
    for tag in tags:
        weights = tag.group(2).split(":")[1:] or ["1"]
        if len(weights) > 1:
            raise ValueError(f"the prompt's LoRA tag {tag.group(0)}: separate text-encoder and U-Net weights are "
                             "not supported; give one weight")
        try:
            found.append((tag.group(1).strip(), float(weights[0])))
        except ValueError:
            raise ValueError(f"the prompt's LoRA tag {tag.group(0)} has no numeric weight") from None
    return _PROMPT_LORA_TAG.sub("", prompt).strip(), found


def _lora_weight(tag: re.Match) -> float:
    try:
        return float(tag.group(2))
    except ValueError:
        raise ValueError(f"the PNG's LoRA tag {tag.group(0)} has no numeric weight") from None


def _take_lora_tags(prompt: str, hashes: dict[str, str | None]) -> tuple[str, tuple[LoraRef, ...]]:
    """The prompt without the <lora:name:w> tags of the LoRAs named in `Lora hashes`, and those LoRAs.

    Ours sit at the end, each after one space: they come off exactly. A1111's may stand anywhere and
    are cut out as A1111 does before encoding. Only named tags count: other text stays prompt text."""
    tail: list[LoraRef] = []
    while (found := list(_LORA_TAG.finditer(prompt))) and found[-1].end() == len(prompt) \
            and found[-1].group(1) in hashes and found[-1].group(1) not in {r.name for r in tail}:
        tag = found[-1]
        tail.insert(0, LoraRef(tag.group(1), _lora_weight(tag), None, hashes[tag.group(1)]))
        prompt = prompt[:tag.start()].removesuffix(" ")
    inner = [LoraRef(t.group(1), _lora_weight(t), None, hashes[t.group(1)]) for t in _LORA_TAG.finditer(prompt)
             if t.group(1) in hashes]
    prompt = _LORA_TAG.sub(lambda t: "" if t.group(1) in hashes else t.group(0), prompt)
    loras = tuple(inner + tail)
    missing = set(hashes) - {r.name for r in loras}
    if missing:
        raise ValueError(f"the PNG's Lora hashes name {', '.join(sorted(missing))} but its prompt has no such "
                         "<lora:name:weight> tag")
    return prompt, loras


def _hash_list(text: str) -> dict[str, str | None]:
    """`name: hash, name: hash` (A1111's Lora hashes and TI hashes) as {name: hash or None}."""
    hashes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, digest = item.partition(":")
        hashes[name.strip()] = digest.strip() or None
    return hashes


def _number(x: float) -> str:
    """The shortest text that reads back as the same float ("7.5", "5", "0.123456789")."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.partition("x")
    if not sep:
        raise ValueError(text)
    return int(width), int(height)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationSettings:
    prompt: str | list[str]
    negative_prompt: str | list[str] = ""
    width: int | None = None  # None: the model's own size (img2img: the input image's, rounded down)
    height: int | None = None
    steps: int = 25
    sampler: str = "dpmpp_2m"
    karras: bool | None = None  # None: what the model's scheduler config says
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float = 0.0  # ddim only
    seed: int | None = None  # None: a fresh random seed, recorded in the result
    strength: float | None = None  # img2img only: how much of the schedule to run
    num_images: int = 1  # per prompt
    loras: tuple[LoraRef, ...] = ()
    clip_skip: int | None = None  # diffusers' count: 1 = penultimate layer; None: as loaded
    emphasis: str = "original"  # A1111's prompt-syntax weighting: original, no-norm, or none (text as written)
    embeddings: tuple[EmbeddingRef, ...] = ()  # filled in by the pipeline: the ones the prompts used
    step_cache: int | None = None  # DeepCache interval (changes the output); None: the pipeline's
    model_name: str | None = None
    model_hash: str | None = None
    batch_pos: int | None = None  # which image of a batch a PNG holds; generation ignores it
    # SDXL's micro-conditioning, as diffusers' keywords: (height, width) and (top, left) pairs. None: the
    # output size; the negative ones default to the positive ones (negative crops: to crops_coords_top_left)
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0  # the SDXL refiner's conditioning (diffusers' defaults)
    negative_aesthetic_score: float = 2.5
    # base + refiner as an ensemble of expert denoisers: the base runs the schedule down to this
    # fraction (diffusers' denoising_end, A1111's "Refiner switch at"), the refiner the rest
    refiner_switch: float | None = None
    refiner_name: str | None = None
    refiner_hash: str | None = None
    # inpainting (set by the pipeline when a mask is given), with A1111's controls and defaults
    inpaint: bool = False
    mask_blur: int = 4
    inpaint_fill: str = "original"  # A1111's "Masked content": original, fill, latent-noise, latent-nothing
    only_masked: bool = False  # inpaint a crop around the mask at full resolution, pasted back
    masked_padding: int = 32
    invert_mask: bool = False
    # hires fix: generate at the size, upscale by hires_scale, then img2img at hires_denoise
    hires_scale: float | None = None
    hires_steps: int | None = None  # None: as many as `steps`
    hires_denoise: float = 0.7
    hires_upscaler: str = "latent"  # or "lanczos" (decode, resize the pixels, encode again)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negative_prompts(self) -> list[str]:
        n = len(self.prompts)
        neg = self.negative_prompt
        return [neg] * n if isinstance(neg, str) else list(neg)

    def validate(self, vae_factor: int | None = None) -> GenerationSettings:
        """Check every setting; with the model's VAE factor also the size. Returns self."""
        prompts = self.prompts
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        negatives = self.negative_prompts
        if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
            raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value is not None and vae_factor and value % vae_factor:
                raise ValueError(f"height and width must be positive multiples of {vae_factor} (the VAE factor), "
                                 f"got {self.height}x{self.width}")
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler '{self.sampler}' (choose from {', '.join(sorted(SAMPLER_NAMES))})")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance scale must be a finite number, got {self.guidance_scale}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {self.guidance_rescale}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.eta != 0.0 and self.sampler != "ddim":
            raise ValueError(f"eta only applies to the ddim sampler, not {self.sampler}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.strength is not None and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if not _is_int(self.num_images) or self.num_images < 1:
            raise ValueError(f"number of images must be >= 1, got {self.num_images!r}")
        if self.clip_skip is not None and (not _is_int(self.clip_skip) or self.clip_skip < 0):
            raise ValueError(f"clip skip must be an integer >= 0 (1 = penultimate layer), got {self.clip_skip!r}")
        if self.emphasis not in EMPHASIS_MODES:
            raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {self.emphasis!r}")
        if self.step_cache is not None and (not _is_int(self.step_cache) or self.step_cache < 1):
            raise ValueError(f"step cache interval must be an integer >= 1, got {self.step_cache!r}")
        if len({lora.name for lora in self.loras}) != len(self.loras):
            raise ValueError("two LoRAs have the same name; the PNG could not tell them apart: rename one file")
        for lora in self.loras:
            lora.check()
        if self.batch_pos is not None and not (_is_int(self.batch_pos) and 0 <= self.batch_pos < self.num_images):
            raise ValueError(f"batch position must be in [0, {self.num_images}), got {self.batch_pos!r}")
        for name in _XL_PAIRS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (tuple, list)) and len(value) == 2
                                          and all(_is_int(v) and v >= 0 for v in value)):
                raise ValueError(f"{name} must be a pair of integers >= 0, got {value!r}")
        if (self.negative_original_size is None) != (self.negative_target_size is None):
            raise ValueError("give negative_original_size and negative_target_size together (diffusers ignores one alone)")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.refiner_switch is not None and not 0.0 < self.refiner_switch < 1.0:
            raise ValueError(f"refiner switch must be in (0, 1), got {self.refiner_switch}")
        if not _is_int(self.mask_blur) or self.mask_blur < 0:
            raise ValueError(f"mask blur must be an integer >= 0 pixels, got {self.mask_blur!r}")
        if self.inpaint_fill not in FILL_MODES:
            raise ValueError(f"unknown masked-content fill {self.inpaint_fill!r} (choose from {', '.join(FILL_MODES)})")
        if not _is_int(self.masked_padding) or self.masked_padding < 0:
            raise ValueError(f"masked-area padding must be an integer >= 0 pixels, got {self.masked_padding!r}")
        if self.hires_scale is not None:
            if not (math.isfinite(self.hires_scale) and 1.0 <= self.hires_scale <= 8.0):
                raise ValueError(f"hires scale must be in [1, 8], got {self.hires_scale}")
            if self.strength is not None or self.inpaint:
                raise ValueError("hires fix applies to text-to-image only")
        if self.hires_steps is not None and (not _is_int(self.hires_steps) or self.hires_steps < 1):
            raise ValueError(f"hires steps must be an integer >= 1, got {self.hires_steps!r}")
        if not 0.0 < self.hires_denoise <= 1.0:
            raise ValueError(f"hires denoising strength must be in (0, 1], got {self.hires_denoise}")
        if self.hires_upscaler not in HIRES_UPSCALERS:
            raise ValueError(f"unknown hires upscaler {self.hires_upscaler!r} (choose from {', '.join(HIRES_UPSCALERS)})")
        return self

    # -- A1111 infotext ------------------------------------------------------------------------
    def to_infotext(self) -> str:
        """The `parameters` text of one image (the first prompt of a list)."""
        fields: dict[str, str] = {"Steps": str(self.steps),
                                  "Sampler": A1111_SAMPLER_NAMES[self.sampler]}
        if self.karras:
            fields["Schedule type"] = "Karras"
        fields["CFG scale"] = _number(self.guidance_scale)
        if self.seed is not None:
            fields["Seed"] = str(self.seed)
        if self.width is not None and self.height is not None:
            fields["Size"] = f"{self.width}x{self.height}"
        if self.model_hash:
            fields["Model hash"] = self.model_hash
        if self.model_name:
            fields["Model"] = self.model_name
        if self.strength is not None:
            fields["Denoising strength"] = _number(self.strength)
        if self.clip_skip is not None:  # 0 too: on a model loaded with a clip skip it is not the default
            fields["Clip skip"] = str(self.clip_skip + 1)
        if self.eta:
            fields["Eta DDIM"] = _number(self.eta)
        if self.guidance_rescale:
            fields["CFG Rescale phi"] = _number(self.guidance_rescale)
        if self.step_cache is not None:
            fields["Step cache"] = str(self.step_cache)
        if self.emphasis != "original":
            fields["Emphasis"] = A1111_EMPHASIS_NAMES[self.emphasis]
        if self.embeddings:
            fields["TI hashes"] = ", ".join(f"{e.name}: {e.hash or ''}" for e in self.embeddings)
        if self.num_images > 1:
            fields["Batch size"] = str(self.num_images)
            fields["Batch pos"] = str(self.batch_pos or 0)
        for name, key in _XL_PAIRS.items():
            value = getattr(self, name)
            if value is not None and not (name == "crops_coords_top_left" and tuple(value) == (0, 0)):
                fields[key] = f"{value[1]}x{value[0]}"  # x first, as A1111's Size: WxH, left x top
        for name, key, default in (("aesthetic_score", "Aesthetic score", 6.0),
                                   ("negative_aesthetic_score", "Negative aesthetic score", 2.5)):
            if getattr(self, name) != default:
                fields[key] = _number(getattr(self, name))
        if self.refiner_switch is not None:
            fields["Refiner"] = f"{self.refiner_name or ''} [{self.refiner_hash or ''}]"
            fields["Refiner switch at"] = _number(self.refiner_switch)
        if self.inpaint:  # A1111's img2img-inpaint fields
            fields["Mask blur"] = str(self.mask_blur)
            if self.inpaint_fill != "original":
                fields["Masked content"] = A1111_FILL_NAMES[self.inpaint_fill]
            if self.only_masked:
                fields["Inpaint area"] = "Only masked"
                fields["Masked area padding"] = str(self.masked_padding)
            if self.invert_mask:
                fields["Mask mode"] = "Inpaint not masked"
        if self.hires_scale is not None:  # A1111's hires-fix fields; its Denoising strength is the second pass's
            fields["Denoising strength"] = _number(self.hires_denoise)
            fields["Hires upscale"] = _number(self.hires_scale)
            if self.hires_steps is not None:
                fields["Hires steps"] = str(self.hires_steps)
            fields["Hires upscaler"] = _HIRES_A1111[self.hires_upscaler]
        prompt = self.prompts[0]
        if self.loras:
            # as A1111 writes them: tags in the prompt (removed before encoding), hashes in a field
            prompt += "".join(f" <lora:{lora.name}:{_number(lora.weight)}>" for lora in self.loras)
            fields["Lora hashes"] = ", ".join(f"{lora.name}: {lora.hash or ''}" for lora in self.loras)
        return format_infotext(prompt, self.negative_prompts[0], fields)

    @classmethod
    def from_infotext(cls, text: str) -> GenerationSettings:
        """Settings from a `parameters` text; a field that does not parse is a one-line ValueError."""
        prompt, negative, fields = parse_infotext(text)
        if "Steps" not in fields:
            raise ValueError("the PNG's parameters have no Steps field: not generation parameters")

        def get(key: str, convert, default=None):
            if key not in fields:
                return default
            try:
                return convert(fields[key])
            except ValueError:
                raise ValueError(f"the PNG's '{key}' field does not parse: {fields[key]!r}") from None

        sampler_name = fields.get("Sampler", "DPM++ 2M")
        karras = fields.get("Schedule type") == "Karras"
        if sampler_name.endswith(" Karras"):  # A1111 before 1.9 named the schedule in the sampler
            sampler_name, karras = sampler_name[:-len(" Karras")], True
        if sampler_name not in _SAMPLERS_BY_A1111_NAME:
            raise ValueError(f"the PNG's sampler '{sampler_name}' is not one ldm has "
                             f"({', '.join(sorted(_SAMPLERS_BY_A1111_NAME))})")
        width = height = None
        if "Size" in fields:
            width, height = get("Size", _size)
        prompt, loras = _take_lora_tags(prompt, _hash_list(fields.get("Lora hashes", "")))
        embeddings = tuple(EmbeddingRef(name, digest) for name, digest in _hash_list(fields.get("TI hashes", "")).items())
        emphasis = fields.get("Emphasis", "Original")
        if emphasis not in _EMPHASIS_BY_A1111_NAME:
            raise ValueError(f"the PNG's emphasis '{emphasis}' is not one ldm has ({', '.join(_EMPHASIS_BY_A1111_NAME)})")
        clip_skip = get("Clip skip", int)
        batch = get("Batch size", int, 1)
        xl = {name: get(key, lambda text: _size(text)[::-1]) for name, key in _XL_PAIRS.items() if key in fields}
        refiner = _REFINER.fullmatch(fields.get("Refiner", "")) if "Refiner" in fields else None
        hires = get("Hires upscale", float)
        strength = get("Denoising strength", float)
        fill = {v: k for k, v in A1111_FILL_NAMES.items()}.get(fields.get("Masked content", "original"))
        if fill is None:
            raise ValueError(f"the PNG's 'Masked content' field does not parse: {fields['Masked content']!r}")
        upscaler = {v: k for k, v in _HIRES_A1111.items()}.get(fields.get("Hires upscaler", "Latent"))
        if upscaler is None:
            raise ValueError(f"the PNG's hires upscaler {fields['Hires upscaler']!r} is not one ldm has "
                             f"({', '.join(_HIRES_A1111.values())})")
        if "Refiner" in fields and refiner is None:
            raise ValueError(f"the PNG's 'Refiner' field does not parse: {fields['Refiner']!r}")
        return cls(
            prompt=prompt, negative_prompt=negative, width=width, height=height, steps=get("Steps", int),
            sampler=_SAMPLERS_BY_A1111_NAME[sampler_name], karras=karras,
            guidance_scale=get("CFG scale", float, 7.0), guidance_rescale=get("CFG Rescale phi", float, 0.0),
            eta=get("Eta DDIM", float, 0.0), seed=get("Seed", int), strength=None if hires else strength,
            num_images=batch, loras=tuple(loras), clip_skip=None if clip_skip is None else clip_skip - 1,
            emphasis=_EMPHASIS_BY_A1111_NAME[emphasis], embeddings=embeddings,
            step_cache=get("Step cache", int), model_name=fields.get("Model"), model_hash=fields.get("Model hash"),
            batch_pos=get("Batch pos", int) if batch > 1 else None, **xl,
            aesthetic_score=get("Aesthetic score", float, 6.0),
            negative_aesthetic_score=get("Negative aesthetic score", float, 2.5),
            refiner_switch=get("Refiner switch at", float), refiner_name=refiner.group(1) or None if refiner else None,
            refiner_hash=refiner.group(2) or None if refiner else None,
            inpaint="Mask blur" in fields, mask_blur=get("Mask blur", int, 4), inpaint_fill=fill,
            only_masked=fields.get("Inpaint area") == "Only masked", masked_padding=get("Masked area padding", int, 32),
            invert_mask=fields.get("Mask mode") == "Inpaint not masked", hires_scale=hires,
            hires_steps=get("Hires steps", int) or None, hires_denoise=strength if hires and strength else 0.7,
            hires_upscaler=upscaler)

    # -- JSON (ldm png-info) -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["loras"] = [{**asdict(lora), "path": str(lora.path) if lora.path else None} for lora in self.loras]
        d["embeddings"] = [asdict(e) for e in self.embeddings]
        return d

    def override(self, **changes) -> GenerationSettings:
        """A copy with `changes` applied where they are not None."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def for_image(self, index: int) -> GenerationSettings:
        """The settings of image `index` of this generation's output (prompt-major, as the images are)."""
        i = index // self.num_images
        return replace(self, prompt=self.prompts[i], negative_prompt=self.negative_prompts[i],
                       batch_pos=index % self.num_images if self.num_images > 1 else None)

