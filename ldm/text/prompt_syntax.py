"""AUTOMATIC1111's prompt syntax: attention weights and BREAK, parsed into (text, weight) fragments.

    (text)      x1.1 per pair of brackets, so ((text)) is x1.21
    (text:1.5)  x1.5
    [text]      /1.1
    \\( \\) \\[ \\] \\\\   the literal character
    BREAK       ends the current 75-token chunk (the next text starts a new one)

Unbalanced brackets are closed at the end of the prompt, as A1111 does, and neighbouring fragments
of equal weight are merged, so a prompt with none of this syntax is one fragment: its own text, at 1.0.
The results match A1111's `modules/prompt_parser.parse_prompt_attention` (its docstring's examples
are tests/test_prompt_syntax.py's cases).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
EMPHASIS_MODES = ("original", "no-norm", "none")

# One alternative per token of the syntax; the plain-text run stops at every character that could
# start one. A weight may have spaces around it, `(word: 1.2 )`, as A1111 1.6 accepts.
_TOKENS = re.compile(r"""
    \\[()\[\]\\] |          # an escaped bracket or backslash
    \\ |                    # a lone backslash
    \( | \[ |
    :\s*([+-]?[.\d]+)\s*\) |  # the end of (text:weight)
    \) | \] |
    [^\\()\[\]:]+ |
    :
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float = 1.0
    is_break: bool = False  # a BREAK between chunks; text and weight mean nothing then


BREAK = Fragment("BREAK", -1.0, is_break=True)


def parse_prompt_attention(prompt: str) -> list[Fragment]:
    """The prompt as weighted fragments, BREAKs among them; never empty (the empty prompt is [("", 1)])."""
    parts: list[list] = []  # [text, weight] or the BREAK marker, mutable while brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part is not BREAK:
                part[1] *= factor

    for match in _TOKENS.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])  # a lone backslash is dropped, as in A1111
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open and _is_number(weight):
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, text in enumerate(_BREAK.split(token)):
                if i:
                    parts.append(BREAK)
                parts.append([text, 1.0])
    for start in round_open:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_MULTIPLIER)

    merged: list[Fragment] = []
    for part in parts:
        if part is BREAK:
            merged.append(BREAK)
        elif merged and not merged[-1].is_break and merged[-1].weight == part[1]:
            merged[-1] = Fragment(merged[-1].text + part[0], part[1])
        else:
            merged.append(Fragment(part[0], part[1]))
    return merged or [Fragment("", 1.0)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:  # "(a:..)": A1111 would fail; here the text stays text
        return False
    return True


def prompt_fragments(prompt: str, emphasis: str) -> list[Fragment]:
    """What the encoder tokenizes: the parsed prompt, or with emphasis "none" the text as written."""
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {emphasis!r}")
    if emphasis == "none":
        return [Fragment(prompt, 1.0)]
    return parse_prompt_attention(prompt)
