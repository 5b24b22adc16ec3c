"""Pipeline: text -> image and image -> image, reproducing diffusers' StableDiffusion(Img2Img)Pipeline.

`generate(settings)` is the typed entry (ldm/settings.py); `__call__` and `img2img` take diffusers'
keywords and build the settings from them. The order of random draws matches diffusers' with a CPU
generator (initial noise; for img2img the VAE posterior sample first), so the same seed gives
diffusers' image on any device.
"""
from __future__ import annotations

import operator
import secrets
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ldm.fast.attention import configure_attention
from ldm.fast.conv_paths import configure_convolutions
from ldm.sampling.denoiser import make_denoiser
from ldm.sampling.guidance import Conditioning, classifier_free_guidance
from ldm.assets import prompt_embeddings, take_lora_tags
from ldm.io.lora import loras_merged
from ldm.io.model_files import ModelParts, load_model
from ldm.sampling.plan import SamplingPlan, add_noise, plan_from, plan_sampling, plan_until
from ldm.sampling.samplers import sample
from ldm.settings import GenerationSettings, lora_hash
from ldm.inpaint_latents import AfterStep, inpaint_start, pixels_of
from ldm.inpaint_masks import (InpaintMask, composite_arrays, crop_box, fill_masked, load_mask, outpaint_canvas,
                               prepare_mask)
from ldm.size_conditioning import time_ids
from ldm.text import ClipPairTextEncoder, TextEmbedding
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


REFINER_SWITCH = 0.8  # A1111's default "Refiner switch at"


class Pipeline:
    def __init__(self, parts: ModelParts, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 refiner: ModelParts | None = None) -> None:
        self.parts = parts.to(device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.refiner: ModelParts | None = None
        if refiner is not None:
            self.set_refiner(refiner)
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
                        refiner: str | Path | None = None, **load_options) -> "Pipeline":
        """`path=None` loads the embedded default model; `refiner` an SDXL refiner to hand off to."""
        if path is None:
            from ldm.shapes.default_model import default_model_path
            path = default_model_path()
        refiner_parts = None
        if refiner is not None:
            refiner_parts = load_model(refiner, **{k: v for k, v in load_options.items() if k != "clip_skip"})
        return cls(load_model(path, **load_options), device, dtype, refiner=refiner_parts)

    def set_refiner(self, refiner: ModelParts | None) -> None:
        """Hand the last part of every schedule to this SDXL refiner (None: no refiner)."""
        if refiner is not None:
            if not self.parts.is_sdxl or not refiner.is_sdxl:
                raise ValueError("a refiner works with SDXL models only")
            if refiner.vae.config.latent_channels != self.parts.vae.config.latent_channels:
                raise ValueError("the refiner's latents do not match the base model's")
            refiner.to(self.device, self.dtype)
        self.refiner = refiner

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
    def _conditioning(self, parts: ModelParts, s: GenerationSettings, embeddings: dict[str, torch.Tensor] | None = None
                      ) -> tuple[Conditioning, Conditioning | None]:
        """The prompt's and the negative prompt's conditioning, one row per image (prompt-major)."""
        enc = parts.text_encoder
        # A1111's syntax for the encoders that read it (CLIP); the others get the text as written
        syntax = {"emphasis": s.emphasis, "embeddings": embeddings} if enc.prompt_syntax else {}
        guided = s.guidance_scale > 1.0
        prompts, negatives = s.prompts, s.negative_prompts
        # SDXL base: an empty negative prompt is no prompt at all, and conditions on zeros (diffusers'
        # force_zeros_for_empty_prompt with negative_prompt=None)
        zeros = guided and parts.force_zeros_for_empty_prompt and not any(negatives)
        chunks = (max(enc.num_chunks(prompts, **syntax), enc.num_chunks(negatives, **syntax))
                  if guided and not zeros else None)
        pos = enc.encode(prompts, pad_to_chunks=chunks, **syntax)
        neg = None
        if guided:
            neg = (TextEmbedding(torch.zeros_like(pos.states), None if pos.pooled is None else torch.zeros_like(pos.pooled))
                   if zeros else enc.encode(negatives, pad_to_chunks=chunks, **syntax))
        ids = time_ids(s, parts.requires_aesthetics_score) if parts.is_sdxl else None

        def build(emb: TextEmbedding, row: list[float] | None) -> Conditioning:
            y = None
            if row is not None:
                pooled = emb.pooled.to(self.device, torch.float32)
                y = parts.unet.vector_conditioning(pooled, torch.tensor([row] * len(pooled), device=self.device))
            expand = lambda t: t.repeat_interleave(s.num_images, dim=0).to(self.device, self.dtype)  # noqa: E731
            return Conditioning(expand(emb.states), None if y is None else expand(y))

        return build(pos, ids and ids[0]), (build(neg, ids and ids[1]) if neg is not None else None)

    def _run_sampler(self, parts: ModelParts, x: torch.Tensor, plan: SamplingPlan, cond: Conditioning,
                     uncond: Conditioning | None, s: GenerationSettings, generator: torch.Generator,
                     after_step: AfterStep | None = None) -> torch.Tensor:
        def unet(x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
            if c.concat is not None:  # an inpainting U-Net's extra input channels
                x = torch.cat([x, c.concat.to(x.dtype)], dim=1)
            args = (x.to(self.dtype), t.to(self.device), c.context, c.y)
            return parts.unet(*args) if cache is None else cache(parts.unet, *args)

        cache = StepCache(s.step_cache) if s.step_cache is not None else None  # fresh per run: stale otherwise
        model_fn = classifier_free_guidance(unet, cond, uncond, s.guidance_scale, s.guidance_rescale)
        denoiser = make_denoiser(model_fn, parts.schedule, plan)
        bar = tqdm(total=plan.steps, desc="sampling", unit="step", disable=not self.progress, leave=False)

        def on_step(info: dict) -> None:
            if not torch.isfinite(info["denoised"]).all():
                raise GenerationError(f"the U-Net produced NaN/Inf at step {info['i'] + 1} of {plan.steps}")
            if after_step is not None:
                after_step(info["i"], info["x"])
            bar.update(1)

        try:
            with torch.inference_mode():
                return sample(s.sampler, denoiser, x, plan, eta=s.eta, generator=generator, callback=on_step)
        finally:
            bar.close()

    def decode(self, latents: torch.Tensor, vae=None) -> torch.Tensor:
        """Latents -> images in [0, 1]. A VAE whose config says force_upcast (SDXL's) decodes in fp32 when
        the pipeline runs in fp16, as diffusers does; any other non-finite half-precision decode is
        retried in fp32, the usual cure for SD VAEs overflowing in fp16."""
        vae = self.parts.vae if vae is None else vae
        with torch.inference_mode():
            z = vae.unscale_latents(latents)
            upcast = self.dtype == torch.float16 and vae.config.force_upcast
            images = None if upcast else decode_latents(vae, z.to(self.dtype), self.vae_tiling, self.vae_slicing)
            if images is None or not torch.isfinite(images).all() and self.dtype != torch.float32:
                vae.float()
                try:
                    images = decode_latents(vae, z.float(), self.vae_tiling, self.vae_slicing)
                finally:
                    vae.to(self.dtype)
            if not torch.isfinite(images).all():
                raise GenerationError("the VAE decoder produced NaN/Inf even in fp32")
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _finish(self, latents: torch.Tensor, output_type: str, vae=None) -> list[Image.Image] | np.ndarray | torch.Tensor:
        if output_type == "latent":
            return latents
        images = self.decode(latents, vae).permute(0, 2, 3, 1).cpu().numpy()
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
        if self.parts.unet.config.in_channels != self.parts.vae.config.latent_channels and not settings.inpaint:
            raise ValueError(f"this is an inpainting model ({self.parts.unet.config.in_channels}-channel U-Net input): "
                             "it cannot generate from text or an image alone")
        if self.parts.requires_aesthetics_score:
            raise ValueError("this is an SDXL refiner: use it as --refiner beside an SDXL base model")
        switch, refiner_name, refiner_hash = settings.refiner_switch, None, None
        if self.refiner is not None:
            switch = REFINER_SWITCH if switch is None else switch
            refiner_name, refiner_hash = self.refiner.name, self.refiner.hash
        elif switch is not None:
            raise ValueError(f"the settings hand off to a refiner ({settings.refiner_name or 'unnamed'}) at "
                             f"{switch}, but none is loaded: pass --refiner")
        return replace(settings, width=width, height=height, step_cache=step_cache, loras=loras,
                       model_name=self.parts.name, model_hash=self.parts.hash, refiner_switch=switch,
                       refiner_name=refiner_name, refiner_hash=refiner_hash).validate(f)

    def lora_targets(self) -> dict[str, torch.nn.Module]:
        """What a LoRA file may change: the U-Net and the text encoder's transformer(s)."""
        enc = self.parts.text_encoder
        if isinstance(enc, ClipPairTextEncoder):  # SDXL: kohya's lora_te1_ / lora_te2_
            targets = {"unet": self.parts.unet, "text_encoder_2": enc.second.model}
            if enc.first is not None:
                targets["text_encoder"] = enc.first.model
            return targets
        return {"unet": self.parts.unet, "text_encoder": enc.model}

    # -- public API ----------------------------------------------------------------------------
    def generate(self, settings: GenerationSettings, *, image: Image.Image | str | Path | None = None,
                 mask: Image.Image | str | Path | None = None, latents: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil") -> GenerationResult:
        """Text -> image; with `image` (and `settings.strength`) image -> image; with `image` and `mask`
        inpainting (white = repaint; the result is composited over the input through the blurred mask).

        `latents` (txt2img) replaces the initial noise; `generator` replaces the seed. The result's
        settings are the ones that ran, so `result.settings.to_infotext()` reproduces the image. (With a
        list of prompts, each image's noise is a row of one draw for the whole list: `image_settings(i)`
        tells how it was made, but only the same list regenerates it.)"""
        settings.validate()
        image = load_image(image) if image is not None else None
        masks = None
        if mask is not None:
            if image is None:
                raise ValueError("inpainting needs the input image beside its mask")
            settings = replace(settings, inpaint=True, strength=1.0 if settings.strength is None else settings.strength)
            masks = prepare_mask(load_mask(mask), image.size, blur=settings.mask_blur, invert=settings.invert_mask)
        s = self._resolve(settings, image)
        s, embeddings = prompt_embeddings(s, self.embeddings_dir, self.parts.text_encoder)
        gen, seed = self._generator(s.seed, generator)
        original, box = image, None
        if masks is not None:
            if s.only_masked:  # a crop around the mask, at the generation size, pasted back at the end
                box = crop_box(masks.hard, s.width, s.height, s.masked_padding)
                image = image.crop(box).resize((s.width, s.height), Image.LANCZOS)
                work = masks.hard.crop(box).resize((s.width, s.height), Image.LANCZOS)
            else:
                image, work = _at_size(image, s), _at_size(masks.hard, s)
            work = work.point(lambda v: 255 if v >= 128 else 0)
            if s.inpaint_fill == "fill":
                image = fill_masked(image, work)
            masks_work = InpaintMask(hard=work, soft=masks.soft)
        with ExitStack() as stack:
            clip_skip = stack.enter_context(self._clip_skip(s.clip_skip))
            if s.loras:
                stack.enter_context(loras_merged(self.lora_targets(), [(lora.path, lora.weight) for lora in s.loras]))
            out, plan, steps_run, vae = self._denoise(s, image, masks_work.hard if masks else None, latents, gen,
                                                      embeddings)
            if s.hires_scale is not None:
                out, more = self._hires_pass(s, out, gen, embeddings)
                steps_run += more
        s = replace(s, seed=seed, karras=plan.karras, clip_skip=clip_skip)
        if masks is None or output_type == "latent":
            return GenerationResult(self._finish(out, output_type, vae), seed, steps_run, s)
        generated = self._finish(out, "np", vae)
        images = composite_arrays(generated, original, masks.soft, box)
        if output_type == "pil":
            images = [Image.fromarray((im * 255).round().astype("uint8")) for im in images]
        return GenerationResult(images, seed, steps_run, s)

    def _denoise(self, s: GenerationSettings, image: Image.Image | None, mask: Image.Image | None,
                 latents: torch.Tensor | None, gen: torch.Generator, embeddings: dict[str, torch.Tensor] | None):
        """The sampling run(s): base, and the refiner when one is loaded. Returns (latents, plan, steps, vae)."""
        cond, uncond = self._conditioning(self.parts, s, embeddings)
        plan = plan_sampling(self.parts.schedule, s.sampler, s.steps, karras=s.karras, strength=s.strength)
        refiner_plan = None
        if self.refiner is not None:
            if mask is not None:
                raise ValueError("inpainting with a refiner hand-off is not supported: drop --refiner")
            # the refiner's own scheduler over the whole schedule, from the switch on (diffusers' denoising_start)
            refiner_plan = plan_from(plan_sampling(self.refiner.schedule, s.sampler, s.steps, karras=s.karras),
                                     s.refiner_switch, self.refiner.schedule.num_train_timesteps)
            plan = plan_until(plan, s.refiner_switch, self.parts.schedule.num_train_timesteps)
        batch = len(s.prompts) * s.num_images
        after_step = None
        if mask is not None:
            start = inpaint_start(self.parts.vae, lambda px: self._encode(px, gen), image, mask, s.inpaint_fill,
                                  unet_channels=self.parts.unet.config.in_channels, batch=batch, plan=plan,
                                  strength=s.strength, generator=gen, device=self.device)
            x, after_step = start.x, start.after_step
            if start.concat is not None:
                cond = replace(cond, concat=start.concat)
                uncond = None if uncond is None else replace(uncond, concat=start.concat)
        elif image is None:
            x = self._initial_noise(s, batch, latents, gen) * plan.init_noise_sigma
        else:
            x = self._noised_image(image, s, batch, plan, gen)
        out = self._run_sampler(self.parts, x, plan, cond, uncond, s, gen, after_step)
        steps, vae = plan.steps, self.parts.vae
        if refiner_plan is not None:
            cond, uncond = self._conditioning(self.refiner, s)
            out = self._run_sampler(self.refiner, out, refiner_plan, cond, uncond, s, gen)
            steps, vae = steps + refiner_plan.steps, self.refiner.vae
        return out, plan, steps, vae

    def _hires_pass(self, s: GenerationSettings, latents: torch.Tensor, gen: torch.Generator,
                    embeddings: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, int]:
        """A1111's hires fix: upscale the first pass (its latents, or its pixels with Lanczos), then img2img
        at the larger size, as StableDiffusionImg2ImgPipeline does on that upscaled input."""
        f = self.vae_scale_factor
        width, height = int(s.width * s.hires_scale) // f * f, int(s.height * s.hires_scale) // f * f
        big = replace(s, width=width, height=height)
        plan = plan_sampling(self.parts.schedule, s.sampler, s.hires_steps or s.steps, karras=s.karras,
                             strength=s.hires_denoise)
        with torch.inference_mode():
            if s.hires_upscaler == "latent":  # A1111's "Latent": bilinear on the latents, no antialiasing
                init = F.interpolate(latents, size=(height // f, width // f), mode="bilinear", antialias=False)
            else:
                pixels = [Image.fromarray((im * 255).round().astype("uint8")).resize((width, height), Image.LANCZOS)
                          for im in self.decode(latents).permute(0, 2, 3, 1).cpu().numpy()]
                init = torch.cat([self._encode(pixels_of(p), gen) for p in pixels])
        noise = torch.randn(init.shape, generator=gen, dtype=torch.float32).to(self.device)
        cond, uncond = self._conditioning(self.parts, big, embeddings)
        out = self._run_sampler(self.parts, add_noise(init, noise, plan), plan, cond, uncond, big, gen)
        return out, plan.steps

    def _encode(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents: a sample of the posterior, drawn from `gen` as diffusers does."""
        with torch.inference_mode():
            posterior = encode_images(self.parts.vae, pixels.to(self.device, self.dtype), self.vae_tiling,
                                      self.vae_slicing)
            return self.parts.vae.scale_latents(posterior.sample(gen).float())

    def _initial_noise(self, s: GenerationSettings, batch: int, latents: torch.Tensor | None,
                       gen: torch.Generator) -> torch.Tensor:
        f = self.vae_scale_factor
        shape = (batch, self.parts.vae.config.latent_channels, s.height // f, s.width // f)
        if latents is None:
            latents = torch.randn(shape, generator=gen, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(self.device, torch.float32)

    def _noised_image(self, image: Image.Image, s: GenerationSettings, batch: int, plan: SamplingPlan,
                      gen: torch.Generator) -> torch.Tensor:
        init = self._encode(pixels_of(_at_size(image, s)), gen).repeat(batch, 1, 1, 1)
        noise = torch.randn(init.shape, generator=gen, dtype=torch.float32).to(self.device)
        return add_noise(init, noise, plan)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, sampler: str = "dpmpp_2m",
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 latents: torch.Tensor | None = None, num_images_per_prompt: int = 1, output_type: str = "pil",
                 karras: bool | None = None, eta: float = 0.0, guidance_rescale: float = 0.0,
                 generator: torch.Generator | None = None, **sdxl) -> GenerationResult:
        """Text -> image with diffusers' keywords; see `generate` for the typed entry. SDXL's keywords
        (`original_size`, `crops_coords_top_left`, `target_size`, their `negative_` variants,
        `aesthetic_score`, `negative_aesthetic_score`, `refiner_switch`) are settings fields of those names."""
        settings = _from_keywords(prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, height, width,
                                  seed, num_images_per_prompt, karras, eta, guidance_rescale, **sdxl)
        return self.generate(settings, latents=latents, generator=generator, output_type=output_type)

    def img2img(self, image: Image.Image | str | Path, prompt: str | list[str], strength: float = 0.8,
                negative_prompt: str | list[str] | None = None, num_inference_steps: int = 25,
                guidance_scale: float = 7.5, sampler: str = "dpmpp_2m", height: int | None = None,
                width: int | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                output_type: str = "pil", karras: bool | None = None, eta: float = 0.0,
                guidance_rescale: float = 0.0, generator: torch.Generator | None = None, **sdxl) -> GenerationResult:
        """Noise the encoded image to the level `strength` picks, then denoise toward `prompt`.
        Unlike diffusers, a tiny strength still runs at least one step. SDXL keywords as for `__call__`."""
        settings = _from_keywords(prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, height, width,
                                  seed, num_images_per_prompt, karras, eta, guidance_rescale, strength, **sdxl)
        return self.generate(settings, image=image, generator=generator, output_type=output_type)


    def inpaint(self, image: Image.Image | str | Path, mask: Image.Image | str | Path, prompt: str | list[str],
                strength: float = 1.0, negative_prompt: str | list[str] | None = None, num_inference_steps: int = 25,
                guidance_scale: float = 7.5, sampler: str = "dpmpp_2m", height: int | None = None,
                width: int | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                output_type: str = "pil", karras: bool | None = None, eta: float = 0.0,
                guidance_rescale: float = 0.0, generator: torch.Generator | None = None, **options) -> GenerationResult:
        """Repaint where `mask` is white (diffusers' StableDiffusionInpaintPipeline, and A1111's controls:
        mask_blur=4, inpaint_fill, only_masked, masked_padding, invert_mask). Outside the blurred mask the
        result keeps the input's pixels. strength=1 starts from pure noise."""
        settings = _from_keywords(prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, height, width,
                                  seed, num_images_per_prompt, karras, eta, guidance_rescale, strength, **options)
        return self.generate(settings, image=image, mask=mask, generator=generator, output_type=output_type)

    def outpaint(self, image: Image.Image | str | Path, prompt: str | list[str], *, left: int = 0, right: int = 0,
                 up: int = 0, down: int = 0, inpaint_fill: str = "fill", mask_blur: int = 8,
                 **keywords) -> GenerationResult:
        """Grow the canvas by the given pixels (to a multiple of the VAE factor), fill the new border as
        `inpaint_fill` says, and inpaint it, the mask reaching `mask_blur` pixels into the original for a soft seam."""
        canvas, mask = outpaint_canvas(load_image(image), left, right, up, down, self.vae_scale_factor, mask_blur)
        return self.inpaint(canvas, mask, prompt, inpaint_fill=inpaint_fill, mask_blur=mask_blur, **keywords)

def _at_size(image: Image.Image, s: GenerationSettings) -> Image.Image:
    """The image resized to the generation size (Lanczos, as diffusers' image processor)."""
    return image if image.size == (s.width, s.height) else image.resize((s.width, s.height), Image.LANCZOS)


def _from_keywords(prompt: str | list[str], negative_prompt: str | list[str] | None, steps: int, guidance_scale: float,
                   sampler: str, height: int | None, width: int | None, seed: int | None, num_images: int,
                   karras: bool | None, eta: float, guidance_rescale: float,
                   strength: float | None = None, **sdxl) -> GenerationSettings:
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
        guidance_rescale=guidance_rescale, eta=eta, seed=seed, strength=strength, num_images=num_images,
        **_settings_keywords(sdxl))


_PAIR_KEYWORDS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                  "negative_crops_coords_top_left", "negative_target_size")
# settings fields that the keyword entries pass through by name: SDXL's, inpainting's and the hires fix's
_SETTINGS_KEYWORDS = (*_PAIR_KEYWORDS, "aesthetic_score", "negative_aesthetic_score", "refiner_switch", "mask_blur",
                      "inpaint_fill", "only_masked", "masked_padding", "invert_mask", "hires_scale", "hires_steps",
                      "hires_denoise", "hires_upscaler")


def _settings_keywords(given: dict) -> dict:
    unknown = sorted(set(given) - set(_SETTINGS_KEYWORDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return {k: tuple(v) if k in _PAIR_KEYWORDS else v for k, v in given.items() if v is not None}
