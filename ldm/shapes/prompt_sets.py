"""The prompt sets `ldm eval shapes` scores: seeded draws (`eval_cases`) and the committed frozen set.

A case is a prompt, a generation seed and the scene the image should show (for img2img also the
starting scene). The frozen set is data, not code: later changes to `eval_cases` cannot change it.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from ldm.shapes.dataset import (
    COLOURS, HELD_OUT, RELATIONS, SIZES, Scene, ShapeObject, allowed_pairs, place_pair, place_single,
    random_attributes,
)

CATEGORIES = ("single_object", "two_object", "held_out", "img2img")
# The frozen prompt set: drawn once by eval_cases(50, FROZEN_SEED), a seed no stage was selected or
# looked at on, and committed as data, so that a later change to eval_cases cannot change it.
FROZEN_SEED = 740_317
FROZEN_SET = Path(__file__).with_name("frozen_prompts.json")


@dataclass(frozen=True)
class EvalCase:
    """One prompt to generate and the scene it should produce.

    For img2img, `init` is the scene rendered as the starting image and `expected` is the same object
    recoloured, at the same place.
    """

    category: str
    prompt: str
    seed: int
    expected: Scene
    check_size: bool = True
    init: Scene | None = None
    strength: float = 0.7


def _balanced(rng: random.Random, items: list, n: int) -> list:
    """`n` items covering `items` as evenly as possible, each pass in a fresh shuffled order."""
    out: list = []
    while len(out) < n:
        out += rng.sample(items, len(items))
    return out[:n]


def eval_cases(n: int = 50, seed: int = 0) -> dict[str, list[EvalCase]]:
    """The fixed, seeded evaluation set: `n` cases per category."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    rng = random.Random(f"shapes-eval-{seed}")
    seed_of = lambda: rng.randrange(2**31)  # noqa: E731 — per-case generation seed
    cases: dict[str, list[EvalCase]] = {c: [] for c in CATEGORIES}
    sizes = list(SIZES)

    for colour, shape, size in _balanced(rng, [(c, s, z) for c, s in allowed_pairs() for z in sizes], n):
        scene = place_single(rng, colour, shape, size)
        cases["single_object"].append(EvalCase("single_object", scene.caption(), seed_of(), scene))

    for relation in _balanced(rng, list(RELATIONS), n):
        a = random_attributes(rng)
        scene = place_pair(rng, a, random_attributes(rng, exclude_colour=a[0]), relation)
        cases["two_object"].append(EvalCase("two_object", scene.caption(), seed_of(), scene, check_size=False))

    # held-out pairs alone (with size, like single_object) and beside a seen object (like two_object)
    held = sorted(HELD_OUT)
    for kind, (colour, shape) in _balanced(rng, [(k, p) for k in ("single", "pair") for p in held], n):
        size = rng.choice(sizes)
        if kind == "single":
            scene = place_single(rng, colour, shape, size)
        else:
            other = random_attributes(rng, exclude_colour=colour)
            pair = [(colour, shape, size), other]
            rng.shuffle(pair)
            scene = place_pair(rng, pair[0], pair[1], rng.choice(RELATIONS))
        cases["held_out"].append(EvalCase("held_out", scene.caption(), seed_of(), scene, check_size=kind == "single"))

    for colour, shape, size in _balanced(rng, [(c, s, z) for c, s in allowed_pairs() for z in sizes], n):
        init = place_single(rng, colour, shape, size)
        target = rng.choice([c for c in COLOURS if c != colour and (c, shape) not in HELD_OUT])
        o = init.objects[0]
        expected = Scene((ShapeObject(shape, target, size, o.cx, o.cy, o.diameter),))
        cases["img2img"].append(
            EvalCase("img2img", f"a {target} {shape}", seed_of(), expected, check_size=False, init=init)
        )
    return cases


def _scene_from_json(d: dict) -> Scene:
    return Scene(tuple(ShapeObject(**o) for o in d["objects"]), d["relation"])


def cases_to_json(cases: dict[str, list[EvalCase]]) -> dict[str, list[dict]]:
    return {c: [asdict(case) for case in cs] for c, cs in cases.items()}


def cases_from_json(data: dict[str, list[dict]]) -> dict[str, list[EvalCase]]:
    def case(d: dict) -> EvalCase:
        init = _scene_from_json(d["init"]) if d["init"] is not None else None
        return EvalCase(**{**d, "expected": _scene_from_json(d["expected"]), "init": init})

    return {c: [case(d) for d in data[c]] for c in CATEGORIES}


def cases_digest(cases: dict[str, list[EvalCase]]) -> str:
    """Short sha256 of a prompt set's canonical JSON: names the exact cases a result was scored on."""
    text = json.dumps(cases_to_json(cases), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def frozen_cases(n: int = 50) -> dict[str, list[EvalCase]]:
    """The committed frozen prompt set (its first `n` cases per category)."""
    data = json.loads(FROZEN_SET.read_text())
    if not 1 <= n <= data["n"]:
        raise ValueError(f"the frozen prompt set holds {data['n']} cases per category; --n {n} is out of range")
    return {c: cs[:n] for c, cs in cases_from_json(data["cases"]).items()}


def write_frozen_set(path: Path = FROZEN_SET, n: int = 50) -> None:
    """Draw the frozen set from FROZEN_SEED and write it. Run once; the committed file is the set."""
    cases = cases_to_json(eval_cases(n, FROZEN_SEED))
    # one case a line, so a diff of the file reads case by case
    lists = (",\n".join(f"   {json.dumps(d)}" for d in cs) for cs in cases.values())
    body = ",\n".join(f'  "{c}": [\n{text}\n  ]' for c, text in zip(cases, lists))
    head = f'{{\n "drawn_by": "eval_cases({n}, seed={FROZEN_SEED})",\n "n": {n},\n "cases": {{\n'
    Path(path).write_text(head + body + "\n }\n}\n")
