"""Tiny random Stable Diffusion folders, built offline inside the tests.

diffusers' own tests download "hf-internal-testing/tiny-*" repos; we cannot, so the tokenizer is
written from a character-level vocab and every model is randomly initialised from a seed.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

TINY_TEXT_DIM = 32


def write_tiny_clip_tokenizer(out: Path, model_max_length: int = 77) -> Path:
    """A character-level CLIP BPE tokenizer: every printable character is a token, no merges."""
    from transformers import CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.printable if not c.isspace()]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=model_max_length)
    tok.save_pretrained(out)
    return out


def tiny_clip_text_model(vocab_size: int, seed: int = 0, hidden_size: int = TINY_TEXT_DIM):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden_size, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab_size,
        max_position_embeddings=77,
    )
    return CLIPTextModel(cfg).eval()


def tiny_unet(variant: str = "sd1", seed: int = 0, cross_attention_dim: int = TINY_TEXT_DIM, in_channels: int = 4):
    """SD1-style (conv projections, one head count) or SD2-style (linear projections, per-level heads);
    in_channels=9: an inpainting U-Net (latents + mask + masked-image latents)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    sd2 = variant == "sd2"
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        norm_num_groups=32,
    ).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32, scaling_factor=0.18215,
    ).eval()


def write_tiny_sd_folder(out: Path, variant: str = "sd1", prediction_type: str = "epsilon",
                         timestep_spacing: str = "leading", seed: int = 0, in_channels: int = 4) -> Path:
    """A complete diffusers-format folder, saved by diffusers itself."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(Path(tmp)))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
    )
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(variant, seed, in_channels=in_channels), vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_model(len(tokenizer), seed + 2), tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def write_tiny_lora(model_dir, path, rank: int = 2, seed: int = 0):
    """A LoRA file for the U-Net of `model_dir`, with non-zero B so that it changes the image."""
    import torch

    from ldm.io.model_files import load_model
    from ldm.train.config import LoraConfig
    from ldm.train.lora import add_lora, save_lora

    unet = load_model(model_dir).unet
    cfg = LoraConfig(enabled=True, rank=rank)
    add_lora(unet, cfg)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); give it a real effect
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return save_lora(unet, path, cfg)


# SDXL: CLIP-L-like (64 wide) + bigG-like (128 wide, projected to 96) text encoders, 64-dim heads as the
# real ones have (single files from elsewhere carry no head count). The widths differ, as in SDXL,
# which is how diffusers' from_single_file tells the two encoders apart.
TINY_XL_TEXT_DIMS = (64, 128)
TINY_XL_POOLED = 96
TINY_XL_TIME_EMBED = 8


def tiny_xl_text_models(vocab_size: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width: int, act: str, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=width,
                              intermediate_size=width * 2, layer_norm_eps=1e-5, num_attention_heads=width // 64,
                              num_hidden_layers=3, vocab_size=vocab_size, max_position_embeddings=77,
                              hidden_act=act, projection_dim=projection)

    torch.manual_seed(seed)
    first = CLIPTextModel(config(TINY_XL_TEXT_DIMS[0], "quick_gelu", TINY_XL_TEXT_DIMS[0])).eval()
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(config(TINY_XL_TEXT_DIMS[1], "gelu", TINY_XL_POOLED)).eval()
    return first, second


def tiny_xl_unet(refiner: bool = False, seed: int = 0):
    """SDXL's U-Net shape in miniature: a first level without attention, deeper transformers below,
    the text_time added embedding (6 size ids; 5 for the refiner, whose last is an aesthetic score)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    context = TINY_XL_TEXT_DIMS[1] if refiner else sum(TINY_XL_TEXT_DIMS)
    ids = 5 if refiner else 6
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=context, addition_embed_type="text_time", addition_time_embed_dim=TINY_XL_TIME_EMBED,
        projection_class_embeddings_input_dim=TINY_XL_POOLED + ids * TINY_XL_TIME_EMBED, norm_num_groups=32,
    ).eval()


def write_tiny_sdxl_folder(out: Path, refiner: bool = False, seed: int = 0) -> Path:
    """An SDXL base (or refiner) diffusers folder, saved by diffusers' own SDXL pipeline classes."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(path)
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, pad_token="!")  # as SDXL's tokenizer_2
    # SDXL's own scheduler config: Euler, scaled_linear 0.00085-0.012, leading spacing, offset 1
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    first, second = tiny_xl_text_models(len(tokenizer), seed + 2)
    vae = tiny_vae(seed + 1)
    vae.register_to_config(scaling_factor=0.13025)
    unet = tiny_xl_unet(refiner, seed)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=second, tokenizer=None, tokenizer_2=tokenizer_2, unet=unet,
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=first, text_encoder_2=second, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out)
    return out


def diffusers_with_scheduler(cls_name: str, folder, scheduler: str, **load):
    """diffusers' pipeline `cls_name` from `folder`, its scheduler swapped for `scheduler`, quiet."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, **load)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
