"""A1111 prompt syntax: the parser on A1111's documented examples, weighted CLIP encodings against the
formula applied by hand to the same text encoder, BREAK and 75-token chunks (tiny random CLIP)."""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from tiny import write_tiny_sd_folder

from ldm.text import ClipTextEncoder, load_text_encoder_from_folder
from ldm.text.prompt_syntax import BREAK, Fragment, parse_prompt_attention

TOL = 1e-6


def pairs(prompt: str) -> list[tuple[str, float]]:
    return [("BREAK", -1.0) if f.is_break else (f.text, f.weight) for f in parse_prompt_attention(prompt)]


# The examples of A1111's modules/prompt_parser.py parse_prompt_attention docstring, with its results
@pytest.mark.parametrize("prompt, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_parser_on_a1111_examples(prompt, expected):
    assert pairs(prompt) == expected


def test_parser_brackets_escapes_and_break():
    assert pairs("((word))") == [("word", 1.1 * 1.1)]
    assert pairs("[word]") == [("word", 1 / 1.1)]
    assert pairs("(word: 1.5 )") == [("word", 1.5)]
    assert pairs("a \\(b\\) \\\\ c") == [("a (b) \\ c", 1.0)]
    assert pairs("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert pairs("BREAKING news") == [("BREAKING news", 1.0)]  # only the word itself
    assert pairs("") == [("", 1.0)]
    assert parse_prompt_attention("x BREAK y")[1] is BREAK and Fragment("x").weight == 1.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> ClipTextEncoder:
    folder = write_tiny_sd_folder(tmp_path_factory.mktemp("syntax") / "sd")
    return load_text_encoder_from_folder(folder, json.loads((folder / "model_index.json").read_text()))


def reference(clip: ClipTextEncoder, fragments: list[tuple[str, float]], norm: bool = True) -> torch.Tensor:
    """One chunk encoded by hand: fragments tokenized one by one, the model run on [BOS, ids, EOS, pad],
    states times weights, then (A1111's "original") scaled back to the unweighted mean."""
    tok = clip.tokenizer
    ids, weights = [tok.bos_token_id], [1.0]
    for text, weight in fragments:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    ids.append(tok.eos_token_id)
    weights.append(1.0)
    ids += [tok.pad_token_id] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    with torch.no_grad():
        z = clip.model(torch.tensor([ids])).last_hidden_state
    weighted = z * torch.tensor(weights)[None, :, None]
    return weighted * (z.mean() / weighted.mean()) if norm else weighted


@pytest.mark.parametrize("prompt, fragments", [
    ("a (red:1.4) cat on [the mat]", [("a ", 1.0), ("red", 1.4), (" cat on ", 1.0), ("the mat", 1 / 1.1)]),
    ("((blue)) dog", [("blue", 1.21), (" dog", 1.0)]),
])
def test_weighted_encoding_equals_the_formula(clip, prompt, fragments):
    got = clip.encode([prompt], emphasis="original").states
    assert (got - reference(clip, fragments)).abs().max().item() <= TOL
    no_norm = clip.encode([prompt], emphasis="no-norm").states
    assert (no_norm - reference(clip, fragments, norm=False)).abs().max().item() <= TOL
    assert (got - no_norm).abs().max().item() > 1e-4  # the mean restoration does something
    plain = clip.encode([prompt]).states  # emphasis "none": the brackets are text
    literal = clip.encode([prompt], emphasis="none").states
    assert torch.equal(plain, literal) and (plain - got).abs().max().item() > 1e-3


def test_prompt_without_syntax_encodes_as_before(clip):
    prompts = ["a red cat, on the mat: 3 dogs", string.ascii_lowercase * 4]
    for emphasis in ("original", "no-norm"):
        weighted = clip.encode(prompts, emphasis=emphasis)
        plain = clip.encode(prompts)
        assert torch.equal(weighted.states, plain.states) and torch.equal(weighted.pooled, plain.pooled)


def test_long_prompt_and_break_make_chunks(clip):
    letters = " ".join(string.ascii_lowercase[i % 26] for i in range(100))  # 100 one-letter tokens
    assert clip.num_chunks([letters], emphasis="original") == 2
    assert clip.encode([letters], emphasis="original").states.shape == (1, 2 * 77, 32)
    # BREAK: each side its own chunk, each chunk encoded on its own
    both = clip.encode(["a red cat BREAK a (blue:1.3) dog"], emphasis="original").states
    assert both.shape == (1, 154, 32)
    assert torch.equal(both[:, :77], clip.encode(["a red cat"]).states)
    assert (both[:, 77:] - clip.encode(["a (blue:1.3) dog"], emphasis="original").states).abs().max() <= TOL
    # the negative prompt is padded to the prompt's chunk count with empty chunks
    neg = clip.encode(["(ugly)"], emphasis="original", pad_to_chunks=2).states
    assert torch.equal(neg[:, 77:], clip.encode([""]).states)
    with pytest.raises(ValueError, match="emphasis must be one of"):
        clip.encode(["a"], emphasis="strong")


def test_pipeline_reads_the_syntax_and_records_emphasis(tmp_path):
    import ldm

    pipe = ldm.Pipeline.from_pretrained(write_tiny_sd_folder(tmp_path / "sd"))
    pipe.progress = False
    base = dict(steps=2, seed=0, width=32, height=32, sampler="euler")
    out = {e: pipe.generate(ldm.GenerationSettings("a (red:1.5) cat", emphasis=e, **base), output_type="np")
           for e in ("original", "none")}
    assert abs(out["original"].images - out["none"].images).max() > 1e-4
    text = out["none"].settings.to_infotext()
    assert "Emphasis: None" in text and ldm.GenerationSettings.from_infotext(text).emphasis == "none"
    assert "Emphasis" not in out["original"].settings.to_infotext()  # A1111's default is not written
