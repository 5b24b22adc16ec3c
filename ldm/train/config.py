"""Training configs: one typed dataclass per section, two top-level shapes (stage "vae" and "unet").

A YAML file holds the same sections as the dataclasses below (or some of them, over a `base:` file);
`load_config` picks the stage by the `stage:` key through an explicit table, applies `--set` overrides and validates every value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ldm.models.autoencoder import AutoencoderConfig
from ldm.sampling.schedule import NoiseSchedule
from ldm.settings import GenerationSettings
from ldm.models.unet import UNetConfig
from ldm.train.config_io import apply_overrides, deep_merge, from_dict, read_config


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class DataConfig:
    path: str = ""  # a folder (images + .txt, metadata.jsonl or metadata.csv) or a .jsonl/.csv file
    resolution: int | None = 64  # None (fine-tuning only): the model's own training resolution
    center_crop: bool = True  # False: random crop
    random_flip: bool = False
    caption_dropout: float = 0.0  # p of training on the empty caption, which is what CFG's uncond uses
    image_column: str = "file_name"
    caption_column: str = "text"
    source_column: str = "source_file_name"  # metadata rows naming a source image are edit pairs
    verify_images: bool = True  # open every image before training, so bad files are dropped up front
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.resolution is not None:
            _positive("data.resolution", self.resolution)
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        _positive("data.num_workers", self.num_workers, allow_zero=True)


@dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    warmup_steps: int = 0
    decay: str = "constant"  # constant | linear | cosine, after the warm-up
    decay_steps: int | None = None  # the schedule's horizon; None: train.max_steps
    min_lr_ratio: float = 0.0  # where linear/cosine decay ends, as a fraction of learning_rate

    def __post_init__(self) -> None:
        _positive("optim.learning_rate", self.learning_rate)
        _choice("optim.decay", self.decay, ("constant", "linear", "cosine"))
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must hold two numbers, got {self.betas}")


@dataclass
class LoopConfig:
    max_steps: int = 1000  # total optimizer steps; a resumed run continues up to this count
    batch_size: int = 8  # per process; the global batch is batch_size x processes x accumulation
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    validation_every: int = 0  # 0: only at the end
    nan_policy: str = "error"  # error | skip: a non-finite loss stops the run, or drops that step
    log_with: str = "none"  # none | tensorboard (an accelerate tracker)
    progress: bool = True

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints",
                    "log_every"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.validation_every", self.validation_every, allow_zero=True)
        _choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _choice("train.nan_policy", self.nan_policy, ("error", "skip"))
        _choice("train.log_with", self.log_with, ("none", "tensorboard"))


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = True  # decay ramps as (1 + n) / (10 + n) (diffusers' EMAModel) so early averages track training

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {self.decay}")


TRAINABLE_TEXT_ENCODERS = ("clip", "t5", "bert", "minilm")


@dataclass
class TextEncoderConfig:
    kind: str = "minilm"  # clip | t5 | bert | minilm (see ldm.text.load_text_encoder)
    path: str | None = None  # a diffusers folder with text_encoder/ + tokenizer/, or a model folder
    max_length: int | None = None  # minilm/bert/t5 token limit
    num_layers: int | None = None  # minilm/bert: condition on this layer's states (keep the first N layers)

    def __post_init__(self) -> None:
        # OpenCLIP checkpoints load for generation (with a model name) but not from a training config;
        # `ldm convert` turns such a model into a diffusers folder, whose encoder trains as kind clip.
        if self.kind not in TRAINABLE_TEXT_ENCODERS:
            raise ValueError(f"text_encoder.kind must be one of {', '.join(TRAINABLE_TEXT_ENCODERS)}, got {self.kind!r}")


LORA_FORMATS = ("diffusers", "kohya")


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    format: str = "diffusers"  # the saved file's key layout: diffusers (peft keys) or kohya (A1111, ComfyUI)

    def __post_init__(self) -> None:
        _positive("lora.rank", self.rank)
        if self.format not in LORA_FORMATS:
            raise ValueError(f"lora.format must be one of {', '.join(LORA_FORMATS)}, got {self.format!r}")


@dataclass
class DiffusionConfig:
    min_snr_gamma: float | None = None  # Hang et al. 2023; 5.0 is the paper's value
    noise_offset: float = 0.0  # per-channel constant added to the noise: lets the model shift mean brightness
    debiased_estimation: bool = False  # weight by 1/sqrt(SNR) (kohya's --debiased_estimation_loss)
    # Edit pairs train at t >= this only. img2img at strength s starts from the source at t ~ 1000 s;
    # below that the model denoises its own output, and a nearly clean source would ask it to repaint
    # a clearly visible image (a target that grows as sqrt(SNR)).
    edit_min_timestep: int = 0

    def __post_init__(self) -> None:
        if self.min_snr_gamma is not None:
            _positive("diffusion.min_snr_gamma", self.min_snr_gamma)
        _positive("diffusion.noise_offset", self.noise_offset, allow_zero=True)
        _positive("diffusion.edit_min_timestep", self.edit_min_timestep, allow_zero=True)


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)  # empty: no sample grids
    steps: int = 20
    guidance_scale: float = 4.0
    sampler: str = "dpmpp_2m"
    seed: int = 0

    def settings(self, resolution: int) -> GenerationSettings:
        """The generation the sample grids show, checked like any other."""
        return GenerationSettings(prompt=list(self.prompts), steps=self.steps, guidance_scale=self.guidance_scale,
                                  sampler=self.sampler, seed=self.seed, width=resolution, height=resolution).validate()


@dataclass
class UNetStageConfig:
    stage: str = "unet"
    init_from: str | None = None  # a whole model (anything load_model reads): fine-tune it
    vae: str | None = None  # a VAE folder (config.json + weights) or a model folder with vae/
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)  # ignored with init_from
    # a trained model folder whose U-Net starts this one (continue training into a larger U-Net);
    # attention blocks that `unet` adds start as the identity, so step 0 reproduces that model
    warm_start: str | None = None
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)  # ignored with init_from
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    cache_latents: bool = False  # encode every image once (centre crop, both flips) before training
    cache_text: bool = False  # encode every caption once

    def __post_init__(self) -> None:
        if self.init_from is None and self.vae is None:
            raise ValueError("a unet-stage config needs 'vae' (a trained VAE folder) or 'init_from' (a whole model)")
        if self.warm_start is not None and self.init_from is not None:
            raise ValueError("warm_start and init_from exclude each other: init_from already starts from a model")
        if self.lora.enabled and self.init_from is None:
            raise ValueError("lora.enabled needs init_from: LoRA adapts an existing model")
        if self.cache_latents and not self.data.center_crop:
            raise ValueError("cache_latents needs data.center_crop: true (random crops cannot be cached)")


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6  # LDM's value, for per-sample *summed* reconstruction and KL terms
    disc_start: int | None = None  # step at which the patch discriminator switches on; None: no GAN
    disc_weight: float = 0.5  # times LDM's adaptive weight (gradient-norm ratio at the decoder output)
    disc_learning_rate: float | None = None  # None: optim.learning_rate
    disc_layers: int = 3
    disc_channels: int = 64

    def __post_init__(self) -> None:
        if self.l1_weight <= 0 and self.l2_weight <= 0:
            raise ValueError("loss: at least one of l1_weight and l2_weight must be > 0")
        _positive("loss.kl_weight", self.kl_weight, allow_zero=True)


@dataclass
class VAEStageConfig:
    stage: str = "vae"
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    validation_images: int = 8  # reconstructions shown in each validation grid
    scale_samples: int = 256  # images encoded at the end to measure the latent std (scaling_factor = 1/std)

    def __post_init__(self) -> None:
        if self.data.resolution is None:
            raise ValueError("data.resolution must be set for VAE training")
        if self.data.resolution % self.vae.downscale:
            raise ValueError(f"data.resolution {self.data.resolution} is not a multiple of the VAE factor "
                             f"{self.vae.downscale}")


StageConfig = Union[UNetStageConfig, VAEStageConfig]
STAGES: dict[str, type] = {"unet": UNetStageConfig, "vae": VAEStageConfig}


def config_from_dict(data: dict[str, Any]) -> StageConfig:
    stage = data.get("stage", "unet")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)})")
    return from_dict(STAGES[stage], data)


def load_config(path: Path | str | None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> StageConfig:
    """YAML file (its `base:` chain resolved; deep-merged over the `base` mapping if given) + `--set
    key=value` overrides -> a validated stage config."""
    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_config(path))
    return config_from_dict(apply_overrides(data, list(overrides)))
