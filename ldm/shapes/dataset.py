"""The procedural "shapes" dataset: flat-coloured circles, squares and triangles with captions.

A dataset small models can learn in minutes and whose every image can be scored exactly: colours are
exact palette RGB with no anti-aliasing, so `ldm.shapes.evaluate` can read the ground truth back from the
pixels. Geometry lives in a fixed 64 px frame; `render` scales it to other resolutions.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

FRAME = 64  # the pixel frame all object coordinates are expressed in
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Diameter ranges in px (inclusive). The gap between them is what lets the evaluator tell sizes apart.
SIZES: dict[str, tuple[int, int]] = {"small": (12, 18), "large": (24, 32)}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
CONVERSE: dict[str, str] = {
    "to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above",
}
# Never drawn in training images, so evaluation can test whether colour and shape compose.
HELD_OUT: set[tuple[str, str]] = {
    ("purple", "triangle"), ("orange", "circle"), ("green", "square"), ("white", "triangle"),
}

MARGIN = 2  # px kept free at the canvas border so no object is clipped
GAP = 2  # px kept free between two objects' boxes so both stay separate, visible components
MIN_SEPARATION = 12  # px between centres along the relation's axis
P_SINGLE = 0.4


@dataclass(frozen=True)
class ShapeObject:
    """One flat object. (cx, cy) is the centre of its square bounding box in the 64 px frame."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    diameter: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1), right/bottom edges exclusive."""
        r = self.diameter / 2
        return self.cx - r, self.cy - r, self.cx + r, self.cy + r


@dataclass(frozen=True)
class Scene:
    """One or two objects; `relation` says where objects[0] is relative to objects[1]."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def caption(self) -> str:
        """The canonical caption: the exact prompt format the evaluator uses."""
        if len(self.objects) == 1:
            o = self.objects[0]
            return f"a {o.size} {o.colour} {o.shape}"
        a, b = self.objects
        return f"a {a.colour} {a.shape} {self.relation} a {b.colour} {b.shape}"

    def captions(self, rng: random.Random, n_extra: int = 2) -> list[str]:
        """Canonical captions first, then `n_extra` true paraphrases drawn with `rng`."""
        if len(self.objects) == 1:
            o = self.objects[0]
            fixed = [self.caption(), f"a {o.colour} {o.shape}"]
            extra = [
                f"{o.colour} {o.shape}",
                f"a picture of a {o.size} {o.colour} {o.shape}",
                f"an image of a {o.colour} {o.shape}",
                f"a {o.colour} {o.shape} on a grey background",
                f"a {o.size} {o.colour} {o.shape} on a grey background",
            ]
        else:
            a, b = self.objects
            rel, conv = self.relation or "", CONVERSE[self.relation or "above"]
            fixed = [self.caption(), f"a {b.colour} {b.shape} {conv} a {a.colour} {a.shape}"]
            extra = [
                f"a {a.size} {a.colour} {a.shape} {rel} a {b.size} {b.colour} {b.shape}",
                f"a picture of a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}",
                f"{a.colour} {a.shape} {rel} {b.colour} {b.shape}",
                f"a {a.colour} {a.shape} and a {b.colour} {b.shape}",
            ]
            if rel in ("to the left of", "to the right of"):
                extra.append(f"a {a.colour} {a.shape} {rel.replace('to the', 'on the')} a {b.colour} {b.shape}")
        return fixed + rng.sample(extra, min(n_extra, len(extra)))

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(ShapeObject(**o) for o in d["objects"]), d.get("relation"))


def _object_mask(o: ShapeObject, resolution: int) -> np.ndarray:
    """Boolean HxW mask, evaluated at pixel centres mapped into the 64 px frame (hard edges, no AA)."""
    c = (np.arange(resolution) + 0.5) * (FRAME / resolution)
    x, y = c[None, :], c[:, None]
    x0, y0, x1, y1 = o.box
    inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    if o.shape == "square":
        return inside
    if o.shape == "circle":
        # strict: a pixel centre exactly on the rim would add one-pixel bumps that widen the box
        return (x - o.cx) ** 2 + (y - o.cy) ** 2 < (o.diameter / 2) ** 2
    if o.shape == "triangle":
        # upright isosceles, apex at top centre, height == base; the +0.25 keeps a visible apex pixel
        return inside & (np.abs(x - o.cx) <= (y - y0) / 2 + 0.25)
    raise ValueError(f"unknown shape {o.shape!r}; expected one of {', '.join(SHAPES)}")


def render(scene: Scene, resolution: int = FRAME) -> np.ndarray:
    """Draw a scene as an HxWx3 uint8 array of exact palette colours on the grey background."""
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 px, got {resolution}")
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        if o.colour not in COLOURS:
            raise ValueError(f"unknown colour {o.colour!r}; expected one of {', '.join(COLOURS)}")
        img[_object_mask(o, resolution)] = COLOURS[o.colour]
    return img


def allowed_pairs(allow_held_out: bool = False) -> list[tuple[str, str]]:
    """Every (colour, shape) pair the generator may draw, in a fixed order."""
    return [(c, s) for c in COLOURS for s in SHAPES if allow_held_out or (c, s) not in HELD_OUT]


def _draw_box(rng: random.Random, diameter: int) -> tuple[float, float]:
    """A random centre whose box lies on the integer pixel grid inside the margins."""
    x0 = rng.randint(MARGIN, FRAME - MARGIN - diameter)
    y0 = rng.randint(MARGIN, FRAME - MARGIN - diameter)
    return x0 + diameter / 2, y0 + diameter / 2


def place_single(rng: random.Random, colour: str, shape: str, size: str) -> Scene:
    """One object of the given kind, with a random diameter in its size range, at a random place."""
    d = rng.randint(*SIZES[size])
    cx, cy = _draw_box(rng, d)
    return Scene((ShapeObject(shape, colour, size, cx, cy, d),))


def _pair_ok(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """Boxes apart by GAP along the relation's axis, and that axis dominates the separation."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    dx, dy = b.cx - a.cx, b.cy - a.cy  # a relative to b, positive when a is left of / above b
    apart = {
        "to the left of": bx0 - ax1, "to the right of": ax0 - bx1, "above": by0 - ay1, "below": ay0 - by1,
    }[relation]
    along, across = (abs(dx), abs(dy)) if relation in ("to the left of", "to the right of") else (abs(dy), abs(dx))
    # `apart` >= GAP already puts the centres >= 12 px apart for the smallest sizes; checked anyway
    return apart >= GAP and along >= MIN_SEPARATION and along >= across


def place_pair(
    rng: random.Random, a: tuple[str, str, str], b: tuple[str, str, str], relation: str, max_tries: int = 20000
) -> Scene:
    """Two objects, each (colour, shape, size), with `a` placed `relation` `b`; rejection-sampled."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")
    if a[0] == b[0]:
        raise ValueError(f"the two objects must have different colours, both are {a[0]}")
    for _ in range(max_tries):
        # diameters are redrawn each try: two 32 px objects cannot sit side by side in 64 px
        oa = ShapeObject(a[1], a[0], a[2], *_draw_box(rng, da := rng.randint(*SIZES[a[2]])), da)
        ob = ShapeObject(b[1], b[0], b[2], *_draw_box(rng, db := rng.randint(*SIZES[b[2]])), db)
        if _pair_ok(oa, ob, relation):
            return Scene((oa, ob), relation)
    raise RuntimeError(f"could not place {a} {relation} {b} after {max_tries} tries")


def random_attributes(
    rng: random.Random, *, allow_held_out: bool = False, exclude_colour: str | None = None
) -> tuple[str, str, str]:
    """A uniformly drawn (colour, shape, size) among the allowed pairs."""
    pairs = [p for p in allowed_pairs(allow_held_out) if p[0] != exclude_colour]
    colour, shape = rng.choice(pairs)
    return colour, shape, rng.choice(list(SIZES))


def random_scene(rng: random.Random, *, allow_held_out: bool = False, p_single: float = P_SINGLE) -> Scene:
    """A training scene: one object with probability `p_single`, else two of different colours."""
    a = random_attributes(rng, allow_held_out=allow_held_out)
    if rng.random() < p_single:
        return place_single(rng, *a)
    b = random_attributes(rng, allow_held_out=allow_held_out, exclude_colour=a[0])
    return place_pair(rng, a, b, rng.choice(RELATIONS))


def edit_pair(rng: random.Random) -> tuple[Scene, Scene]:
    """(source, target): one object, and the same object at the same place, size and shape in a new
    colour; neither is a held-out pair.

    Colour only: with shape edits among the pairs too (a quarter of them, tried in stage 11's first
    run), text-to-image squares came out as circles and two-object accuracy fell (0.78 -> 0.72):
    a model taught to overrule the shape it sees at mid noise hedges towards round blobs.
    """
    colour, shape, size = random_attributes(rng)
    source = place_single(rng, colour, shape, size)
    target = rng.choice([c for c in COLOURS if c != colour and (c, shape) not in HELD_OUT])
    return source, Scene((replace(source.objects[0], colour=target),))


def write_shapes_dataset(
    out: Path, n: int, seed: int = 0, resolution: int = FRAME, progress: bool = True, edit_pairs: int = 0
) -> Path:
    """Write `n` PNGs plus an imagefolder-style metadata.jsonl into `out` and return `out`.

    Each row holds `file_name`, `text` (caption variants, canonical first), `caption` (canonical) and
    the ground truth (`objects`, `relation`). Image i depends only on (seed, i), so a larger `n` extends
    a smaller one. Files this writer owns are overwritten; anything else in `out` is left alone.

    `edit_pairs` more rows are img2img training pairs (`edit_pair`): `source_file_name` names the
    starting image, and the row's image and captions are the edited object; `source` holds the
    starting scene. Pair j depends only on (seed, j).
    """
    if edit_pairs < 0:
        raise ValueError(f"--edit-pairs must be >= 0, got {edit_pairs}")
    out = Path(out)
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(n), desc="shapes", disable=not progress):
        rng = random.Random(f"shapes-{seed}-{i}")
        scene = random_scene(rng)
        name = f"{i:06d}.png"
        Image.fromarray(render(scene, resolution)).save(out / name)
        rows.append({"file_name": name, "text": scene.captions(rng), "caption": scene.caption(), **scene.to_dict()})
    for j in tqdm(range(edit_pairs), desc="edit pairs", disable=not progress or not edit_pairs):
        rng = random.Random(f"shapes-edit-{seed}-{j}")
        source, target = edit_pair(rng)
        name, source_name = f"edit-{j:06d}.png", f"edit-{j:06d}-source.png"
        Image.fromarray(render(source, resolution)).save(out / source_name)
        Image.fromarray(render(target, resolution)).save(out / name)
        rows.append({"file_name": name, "source_file_name": source_name, "text": target.captions(rng),
                     "caption": target.caption(), **target.to_dict(), "source": source.to_dict()})
    # written last and atomically: a half-written dataset never has a metadata file pointing at it
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "metadata.jsonl")
    logger.info("wrote %d shapes images and %d edit pairs to %s", n, edit_pairs, out)
    return out


def read_scenes(root: Path) -> list[tuple[Path, Scene]]:
    """(image path, ground-truth scene) for every row of a shapes dataset's metadata.jsonl."""
    root = Path(root)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(f"{meta} not found: not a shapes dataset")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    return [(root / r["file_name"], Scene.from_dict(r)) for r in rows]

