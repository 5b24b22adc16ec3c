"""Pipeline: text -> image and image -> image, reproducing diffusers' StableDiffusion(Img2Img)Pipeline.

`generate(settings)` is the typed entry (ldm/settings.py); `__call__` and `img2img` take diffusers'
keywords and build the settings from them. The order of random draws matches diffusers' with a CPU
generator (initial noise; for img2img the VAE posterior sample first), so the same seed gives
diffusers' image on any device.
"""
from __future__ import annotations

import functools
import operator
import secrets
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.fast.attention import configure_attention
from ldm.fast.conv_paths import configure_convolutions
from ldm.sampling.denoiser import make_denoiser
from ldm.sampling.guidance import classifier_free_guidance
from ldm.assets import prompt_embeddings, take_lora_tags
from ldm.io.lora import loras_merged
from ldm.io.model_files import ModelParts, load_model
from ldm.sampling.plan import SamplingPlan, add_noise, plan_sampling
from ldm.sampling.samplers import sample
from ldm.settings import GenerationSettings, lora_hash
from ldm.fast.step_cache import StepCache
from ldm.fast.vae_tiling import VaeTiling, decode_latents, encode_images


class GenerationError(RuntimeError):
    """The model produced something unusable (NaN/Inf), reported with where it happened."""


@dataclass
class GenerationResult:
    images: list[Image.Image] | np.ndarray | torch.Tensor
    seed: int
    steps_run: int  # model-evaluation steps actually taken (img2img runs a strength-dependent part)
    settings: GenerationSettings  # as run: seed, size, schedule and model identity filled in

    def image_settings(self, index: int) -> GenerationSettings:
        """What made image `index`: its prompt, and its place in the batch."""
        return self.settings.for_image(index)


def load_image(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{image}: no such image file") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{image}: not a readable image ({e})") from None


class Pipeline:
    def __init__(self, parts: ModelParts, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.parts = parts.to(device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.progress = True
        # opt-in performance switches, all off by default (outputs then match diffusers'): see below
        self.vae_tiling: VaeTiling | None = None
        self.vae_slicing = False
        self.step_cache_interval: int | None = None
        # where <lora:name:w> tags and textual-inversion words are looked up (None: $LDM_LORA_DIR,
        # $LDM_EMBEDDINGS_DIR, else nowhere)
        self.lora_dir: Path | None = None
        self.embeddings_dir: Path | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        **load_options) -> "Pipeline":
        """`path=None` loads the embedded default model."""
        if path is None:
            from ldm.shapes.default_model import default_model_path
            path = default_model_path()
        return cls(load_model(path, **load_options), device, dtype)

    @property
    def vae_scale_factor(self) -> int:
        return self.parts.vae.config.downscale

    # -- opt-in performance switches -----------------------------------------------------------
    def enable_vae_tiling(self, tile: int = 512, overlap: int = 128) -> None:
        """Encode and decode in overlapping tiles of `tile` pixels, so peak memory no longer grows
        with the image. An approximation (see ldm/fast/vae_tiling.py); an image within one tile is exact.
        The default overlap of 128 px (16 latents) covers most of the SD decoder's receptive field."""
        tiling = VaeTiling(tile, overlap)
        tiling.check(self.vae_scale_factor)
        self.vae_tiling = tiling

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = None

    def enable_vae_slicing(self) -> None:
        """Run the VAE on one image of a batch at a time (same result, batch-size-independent memory)."""
        self.vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self.vae_slicing = False

    def enable_step_cache(self, interval: int = 3) -> None:
        """DeepCache-style reuse of deep U-Net features: a full U-Net every `interval` model calls,
        the shallow path in between. Changes the output; scripts/sampler_error.py measures by how much."""
        StepCache(interval)  # validates
        self.step_cache_interval = interval

    def disable_step_cache(self) -> None:
        self.step_cache_interval = None

    def optimize(self, *, channels_last: bool = False, fuse_qkv: bool = False, compile: bool = False,
                 attention_chunk: int | None = None, winograd: bool | str = False,
                 im2col: bool = False) -> None:
        """Set the output-preserving speed/memory options of the U-Net and VAE (each within 1e-5 of the
        default; tests/test_perf_options.py); options left at their defaults are switched off again,
        except compile, which cannot be undone. Checkpoint keys are untouched.

        channels_last: NHWC convolutions. fuse_qkv: one matmul for the attention projections, from a
        concatenated copy of their weights (rebuilt when they change). attention_chunk: attend that
        many query tokens at a time, bounding attention memory. compile: torch.compile the U-Net
        in place (`nn.Module.compile`), so state_dict keys keep their names. winograd: 3x3 convolutions
        as Winograd F(2x2, 3x3) for fp32 on the CPU (ldm/fast/winograd.py), 2.25x fewer multiplies;
        "cached" (or True) holds the transformed kernels, "transient" rebuilds them per call on the
        layers where that pays and holds nothing. im2col: deep layers on small maps (stride 1 or 2)
        as one GEMM, no extra memory (ldm/fast/conv_paths.py says which layers take which path)."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for model in (self.parts.unet, self.parts.vae):
            model.to(memory_format=fmt)
            configure_attention(model, query_chunk=attention_chunk, fuse_projections=fuse_qkv)
            configure_convolutions(model, winograd=winograd, im2col=im2col)
        if compile:
            self.parts.unet.compile()

    # -- shared pieces -------------------------------------------------------------------------
    def _text_states(self, prompts: list[str], negatives: list[str] | None, per_prompt: int,
                     guidance_scale: float, emphasis: str = "none",
                     embeddings: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        enc = self.parts.text_encoder
        # A1111's syntax for the encoders that read it (CLIP); the others get the text as written
        syntax = {"emphasis": emphasis, "embeddings": embeddings} if enc.prompt_syntax else {}
        cfg = guidance_scale > 1.0
        chunks = max(enc.num_chunks(prompts, **syntax), enc.num_chunks(negatives, **syntax)) if cfg else None
        cond = enc.encode(prompts, pad_to_chunks=chunks, **syntax).states
        uncond = enc.encode(negatives, pad_to_chunks=chunks, **syntax).states if cfg else None
        expand = lambda s: s.repeat_interleave(per_prompt, dim=0).to(self.device, self.dtype)  # noqa: E731
        return expand(cond), (expand(uncond) if uncond is not None else None)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
              cache: StepCache | None = None) -> torch.Tensor:
        if cache is None:
            return self.parts.unet(x.to(self.dtype), t.to(self.device), context)
        return cache(self.parts.unet, x.to(self.dtype), t.to(self.device), context)

    def _run_sampler(self, x: torch.Tensor, plan: SamplingPlan, cond, uncond, s: GenerationSettings,
                     generator: torch.Generator) -> torch.Tensor:
        unet = self._unet
        if s.step_cache is not None:  # a fresh cache per run: features of another run are stale
            unet = functools.partial(self._unet, cache=StepCache(s.step_cache))
        model_fn = classifier_free_guidance(unet, cond, uncond, s.guidance_scale, s.guidance_rescale)
        denoiser = make_denoiser(model_fn, self.parts.schedule, plan)
        bar = tqdm(total=plan.steps, desc="sampling", unit="step", disable=not self.progress, leave=False)

        def on_step(info: dict) -> None:
            if not torch.isfinite(info["denoised"]).all():
                raise GenerationError(f"the U-Net produced NaN/Inf at step {info['i'] + 1} of {plan.steps}")
            bar.update(1)

        try:
            with torch.inference_mode():
                return sample(s.sampler, denoiser, x, plan, eta=s.eta, generator=generator, callback=on_step)
        finally:
            bar.close()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]. A non-finite half-precision decode is retried in fp32, which is
        the usual cure for SD VAEs overflowing in fp16."""
        vae = self.parts.vae
        with torch.inference_mode():
            z = vae.unscale_latents(latents)
            images = decode_latents(vae, z.to(self.dtype), self.vae_tiling, self.vae_slicing)
            if not torch.isfinite(images).all() and self.dtype != torch.float32:
                vae.float()
                try:
                    images = decode_latents(vae, z.float(), self.vae_tiling, self.vae_slicing)
                finally:
                    vae.to(self.dtype)
            if not torch.isfinite(images).all():
                raise GenerationError("the VAE decoder produced NaN/Inf even in fp32")
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _finish(self, latents: torch.Tensor, output_type: str) -> list[Image.Image] | np.ndarray | torch.Tensor:
        if output_type == "latent":
            return latents
        images = self.decode(latents).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return images
        if output_type == "pil":
            return [Image.fromarray((im * 255).round().astype("uint8")) for im in images]
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got '{output_type}'")

    @staticmethod
    def _generator(seed: int | None, generator: torch.Generator | None) -> tuple[torch.Generator, int]:
        if generator is not None:
            return generator, generator.initial_seed()
        seed = secrets.randbits(32) if seed is None else int(seed)
        return torch.Generator("cpu").manual_seed(seed), seed

    @contextmanager
    def _clip_skip(self, clip_skip: int | None):
        """The text encoder at `clip_skip` for one generation (None: as loaded); yields the value in effect."""
        enc = self.parts.text_encoder
        loaded = enc.clip_skip
        if clip_skip is None or clip_skip == loaded:
            yield loaded
            return
        enc.set_clip_skip(clip_skip)
        try:
            yield clip_skip
        finally:
            enc.set_clip_skip(loaded)

    def _resolve(self, settings: GenerationSettings, image: Image.Image | None) -> GenerationSettings:
        """Settings with the model's defaults filled in and checked against the model."""
        f = self.vae_scale_factor
        if image is None:
            if settings.strength is not None:
                raise ValueError("strength applies to img2img only: give an input image")
            default = self.parts.unet.config.sample_size * f
            width, height = settings.width or default, settings.height or default
        else:
            if settings.strength is None:
                raise ValueError("img2img needs a strength in (0, 1]")
            # like diffusers' VaeImageProcessor: round down to the VAE factor unless a size is given
            width, height = settings.width or image.width // f * f, settings.height or image.height // f * f
        settings = take_lora_tags(settings, self.lora_dir)
        for lora in settings.loras:
            if lora.path is None:
                raise ValueError(f"LoRA '{lora.name}': no file given for it")
        # the hash goes into the PNG's Lora hashes, so that the file can be checked when read back
        loras = tuple(lora if lora.hash else replace(lora, hash=lora_hash(lora.path)) for lora in settings.loras)
        step_cache = settings.step_cache if settings.step_cache is not None else self.step_cache_interval
        return replace(settings, width=width, height=height, step_cache=step_cache, loras=loras,
                       model_name=self.parts.name, model_hash=self.parts.hash).validate(f)

    def lora_targets(self) -> dict[str, torch.nn.Module]:
        """What a LoRA file may change: the U-Net and the text encoder's transformer."""
        return {"unet": self.parts.unet, "text_encoder": self.parts.text_encoder.model}

    # -- public API ----------------------------------------------------------------------------
    def generate(self, settings: GenerationSettings, *, image: Image.Image | str | Path | None = None,
                 latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 output_type: str = "pil") -> GenerationResult:
        """Text -> image, or with `image` (and `settings.strength`) image -> image.

        `latents` (txt2img) replaces the initial noise; `generator` replaces the seed. The result's
        settings are the ones that ran, so `result.settings.to_infotext()` reproduces the image. (With a
        list of prompts, each image's noise is a row of one draw for the whole list: `image_settings(i)`
        tells how it was made, but only the same list regenerates it.)"""
        settings.validate()
        image = load_image(image) if image is not None else None
        s = self._resolve(settings, image)
        s, embeddings = prompt_embeddings(s, self.embeddings_dir, self.parts.text_encoder)
        gen, seed = self._generator(s.seed, generator)
        with ExitStack() as stack:
            clip_skip = stack.enter_context(self._clip_skip(s.clip_skip))
            if s.loras:
                stack.enter_context(loras_merged(self.lora_targets(), [(lora.path, lora.weight) for lora in s.loras]))
            cond, uncond = self._text_states(s.prompts, s.negative_prompts, s.num_images, s.guidance_scale,
                                             s.emphasis, embeddings)
            plan = plan_sampling(self.parts.schedule, s.sampler, s.steps, karras=s.karras, strength=s.strength)
            batch = len(s.prompts) * s.num_images
            if image is None:
                x = self._initial_noise(s, batch, latents, gen) * plan.init_noise_sigma
            else:
                x = self._noised_image(image, s, batch, plan, gen)
            out = self._run_sampler(x, plan, cond, uncond, s, gen)
        s = replace(s, seed=seed, karras=plan.karras, clip_skip=clip_skip)
        return GenerationResult(self._finish(out, output_type), seed, plan.steps, s)

    def _initial_noise(self, s: GenerationSettings, batch: int, latents: torch.Tensor | None,
                       gen: torch.Generator) -> torch.Tensor:
        f = self.vae_scale_factor
        shape = (batch, self.parts.unet.config.in_channels, s.height // f, s.width // f)
        if latents is None:
            latents = torch.randn(shape, generator=gen, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(self.device, torch.float32)

    def _noised_image(self, image: Image.Image, s: GenerationSettings, batch: int, plan: SamplingPlan,
                      gen: torch.Generator) -> torch.Tensor:
        if image.size != (s.width, s.height):
            image = image.resize((s.width, s.height), Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
        with torch.inference_mode():
            posterior = encode_images(self.parts.vae, pixels.to(self.device, self.dtype), self.vae_tiling,
                                      self.vae_slicing)
            init = self.parts.vae.scale_latents(posterior.sample(gen).float())
        init = init.repeat(batch, 1, 1, 1)
        noise = torch.randn(init.shape, generator=gen, dtype=torch.float32).to(self.device)
        return add_noise(init, noise, plan)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, sampler: str = "dpmpp_2m",
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 latents: torch.Tensor | None = None, num_images_per_prompt: int = 1, output_type: str = "pil",
                 karras: bool | None = None, eta: float = 0.0, guidance_rescale: float = 0.0,
                 generator: torch.Generator | None = None) -> GenerationResult:
        """Text -> image with diffusers' keywords; see `generate` for the typed entry."""
        settings = _from_keywords(prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, height, width,
                                  seed, num_images_per_prompt, karras, eta, guidance_rescale)
        return self.generate(settings, latents=latents, generator=generator, output_type=output_type)

    def img2img(self, image: Image.Image | str | Path, prompt: str | list[str], strength: float = 0.8,
                negative_prompt: str | list[str] | None = None, num_inference_steps: int = 25,
                guidance_scale: float = 7.5, sampler: str = "dpmpp_2m", height: int | None = None,
                width: int | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                output_type: str = "pil", karras: bool | None = None, eta: float = 0.0,
                guidance_rescale: float = 0.0, generator: torch.Generator | None = None) -> GenerationResult:
        """Noise the encoded image to the level `strength` picks, then denoise toward `prompt`.
        Unlike diffusers, a tiny strength still runs at least one step."""
        settings = _from_keywords(prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, height, width,
                                  seed, num_images_per_prompt, karras, eta, guidance_rescale, strength)
        return self.generate(settings, image=image, generator=generator, output_type=output_type)


def _from_keywords(prompt: str | list[str], negative_prompt: str | list[str] | None, steps: int, guidance_scale: float,
                   sampler: str, height: int | None, width: int | None, seed: int | None, num_images: int,
                   karras: bool | None, eta: float, guidance_rescale: float,
                   strength: float | None = None) -> GenerationSettings:
    """diffusers-style keywords -> settings, read as they always were: a None negative prompt is the
    empty one, a size of 0 or None the default, and numpy/torch integers (or a numeric seed string) count."""
    def integer(value):
        return value if value is None or isinstance(value, bool) else operator.index(value)

    try:
        steps, num_images, height, width = (integer(v) for v in (steps, num_images, height, width))
        seed = None if seed is None else int(seed) if isinstance(seed, str) else integer(seed)
    except (TypeError, ValueError):
        raise ValueError(f"steps, sizes, seed and image counts must be integers, got steps={steps!r}, "
                         f"height={height!r}, width={width!r}, seed={seed!r}, images={num_images!r}") from None
    return GenerationSettings(
        prompt=prompt, negative_prompt="" if negative_prompt is None else negative_prompt, width=width or None,
        height=height or None, steps=steps, sampler=sampler, karras=karras, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, eta=eta, seed=seed, strength=strength, num_images=num_images)
