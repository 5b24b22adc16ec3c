"""OpenCLIP text towers (SD2's ViT-H, SDXL's bigG), converted once into a transformers CLIP model.

OpenCLIP's text transformer is the CLIP text transformer under other names (fused q/k/v, `c_fc`,
`ln_final`...), which is also how diffusers ships SD2. So instead of a second forward pass we map the
weights onto `CLIPTextModel(WithProjection)` and reuse ClipTextEncoder: chunking, clip_skip
("penultimate" in SD2's configs is clip_skip=1) and `save` to a folder diffusers loads all come for free.
open_clip itself is only needed to build the model from its name and to read its BPE vocabulary, so
it is an optional extra, imported when an OpenCLIP encoder is actually loaded.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.text.clip import ClipTextEncoder

OPENCLIP_MISSING = "OpenCLIP text encoders need the optional extra: pip install 'ldm[openclip]'"

_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
# open_clip block parameter -> CLIPEncoderLayer parameter (the fused attention in_proj is split apart).
_BLOCK_NAMES = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
# open_clip tower parameter -> transformers CLIP key below `text_model.`
_TOWER_NAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
}


class OpenClipTextEncoder(ClipTextEncoder):
    kind = "openclip"


def openclip_to_clip_state_dict(text_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP text tower's weights (no `visual.*`) to transformers' CLIP text keys.

    Every key must be known: layer-scale or a Linear projection would change the maths, so an
    unrecognised key is an error naming it rather than a silently dropped weight.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in text_state.items():
        if key in _TOWER_NAMES:
            out["text_model." + _TOWER_NAMES[key]] = value
        elif key == "text_projection":
            # open_clip computes x @ P with P [width, dim]; nn.Linear stores the transpose.
            out["text_projection.weight"] = value.T.contiguous()
        elif key == "attn_mask":
            continue  # the causal mask buffer: CLIPTextModel builds its own
        elif (m := _BLOCK_KEY.fullmatch(key)) is not None:
            layer, name = m.groups()
            prefix = f"text_model.encoder.layers.{layer}."
            param, kind = name.rsplit(".", 1)
            if param == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
                suffix = "weight" if kind == "in_proj_weight" else "bias"
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{proj}.{suffix}"] = part.contiguous()
            elif param in _BLOCK_NAMES and kind in ("weight", "bias"):
                out[f"{prefix}{_BLOCK_NAMES[param]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"OpenCLIP text weights this converter does not know: {', '.join(sorted(unknown))}")
    return out


def clip_to_openclip_state_dict(clip_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of openclip_to_clip_state_dict: transformers CLIP text keys (with or without the
    `text_model.` level) back to an OpenCLIP text tower's, q/k/v fused into in_proj, the projection
    transposed. This is how SDXL single files store the bigG encoder (`conditioner.embedders.1.model.*`)."""
    block_names = {v: k for k, v in _BLOCK_NAMES.items()}
    tower_names = {v: k for k, v in _TOWER_NAMES.items()}
    state = {k.removeprefix("text_model."): v for k, v in clip_state.items()}
    state.pop("embeddings.position_ids", None)
    out = {tower_names[k]: state.pop(k) for k in list(state) if k in tower_names}
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layer_keys = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
    for key in [k for k in state if k.endswith("q_proj.weight") or k.endswith("q_proj.bias")]:
        m = layer_keys.fullmatch(key)
        if m is None:
            break
        layer, leaf = m.group(1), m.group(3)
        qkv = [state.pop(f"encoder.layers.{layer}.self_attn.{p}.{leaf}") for p in ("q_proj", "k_proj", "v_proj")]
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat(qkv, dim=0)
    for key in list(state):
        m = layer_keys.fullmatch(key)
        if m is not None and m.group(2) in block_names:
            out[f"transformer.resblocks.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"] = state.pop(key)
    if state:
        raise ValueError(f"CLIP text weights with no OpenCLIP name: {', '.join(sorted(state))}")
    return out


def clip_tokenizer_from_bpe(encoder: dict[str, int], bpe_ranks: dict[tuple[str, str], int], *, bos_token: str,
                            eos_token: str, pad_token: str, model_max_length: int) -> CLIPTokenizer:
    """A transformers CLIPTokenizer with the same byte-level BPE vocabulary and merges as open_clip's."""
    merges = [pair for pair, _ in sorted(bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=dict(encoder), merges=merges, unk_token=eos_token, bos_token=bos_token,
                         eos_token=eos_token, pad_token=pad_token, model_max_length=model_max_length)


def clip_text_model_from_openclip(text_state: dict[str, torch.Tensor], *, num_heads: int, hidden_act: str,
                                  layer_norm_eps: float, bos_token_id: int, eos_token_id: int,
                                  pad_token_id: int) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Build the transformers model the OpenCLIP weights fit, loading every weight with shape checks."""
    state = openclip_to_clip_state_dict(text_state)
    vocab_size, width = state["text_model.embeddings.token_embedding.weight"].shape
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    projection = state.get("text_projection.weight")
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width,
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers), num_attention_heads=num_heads,
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
        projection_dim=width if projection is None else projection.shape[0],
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    if "text_model.final_layer_norm.weight" not in model.state_dict():
        # transformers 5's CLIPTextModel has no `text_model.` level; WithProjection still has it.
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)  # names any missing/unexpected key and any shape mismatch
    return model.eval()


def load_openclip(checkpoint: Path, *, model_name: str, clip_skip: int | None = None,
                  dtype: torch.dtype | None = None) -> OpenClipTextEncoder:
    """Load an OpenCLIP checkpoint file (e.g. open_clip_pytorch_model.bin) by its model name, offline."""
    try:
        import open_clip
        from open_clip.transformer import QuickGELU
    except ImportError as e:
        raise ImportError(OPENCLIP_MISSING) from e
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"OpenCLIP checkpoint not found: {checkpoint}")
    model = open_clip.create_model(model_name, pretrained=str(checkpoint))
    tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text, CLIP inlines it
    if not hasattr(tower, "token_embedding") or getattr(tower, "text_pool_type", "argmax") != "argmax":
        raise ValueError(f"OpenCLIP model {model_name!r} has no CLIP-style text transformer; only those are supported")
    block = tower.transformer.resblocks[0]
    if isinstance(block.mlp.gelu, QuickGELU):
        hidden_act = "quick_gelu"
    elif isinstance(block.mlp.gelu, torch.nn.GELU):
        hidden_act = "gelu"
    else:
        raise ValueError(f"OpenCLIP model {model_name!r} uses activation {type(block.mlp.gelu).__name__}, not GELU")
    text_state = {k: v for k, v in tower.state_dict().items()
                  if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}

    bpe = open_clip.get_tokenizer(model_name)
    if not hasattr(bpe, "bpe_ranks"):
        raise ValueError(f"OpenCLIP model {model_name!r} does not use the CLIP BPE tokenizer")
    # open_clip renamed CLIP's <|startoftext|>/<|endoftext|>; the ids are the same either way.
    bos_token = next((t for t in ("<start_of_text>", "<|startoftext|>") if t in bpe.encoder), None)
    eos_token = next((t for t in ("<end_of_text>", "<|endoftext|>") if t in bpe.encoder), None)
    if bos_token is None or eos_token is None:
        raise ValueError(f"OpenCLIP model {model_name!r}: its tokenizer has no start/end-of-text tokens")
    # open_clip pads with id 0 ("!"); SD2's diffusers tokenizer declares "!" its pad token for the same
    # reason. Like there, a literal "!" in a prompt is then read as that token rather than "!</w>".
    pad_token = bpe.decoder[0]
    tokenizer = clip_tokenizer_from_bpe(bpe.encoder, bpe.bpe_ranks, bos_token=bos_token, eos_token=eos_token,
                                        pad_token=pad_token, model_max_length=int(tower.context_length))
    clip = clip_text_model_from_openclip(
        text_state, num_heads=block.attn.num_heads, hidden_act=hidden_act, layer_norm_eps=tower.ln_final.eps,
        bos_token_id=bpe.encoder[bos_token], eos_token_id=bpe.encoder[eos_token], pad_token_id=0,
    )
    if dtype is not None:
        clip.to(dtype=dtype)
    return OpenClipTextEncoder(clip, tokenizer, clip_skip=clip_skip)
