"""Score generated images of the shapes world by reading their pixels, and the eval runner around it.
The prompt sets it runs on are ldm/shapes/prompt_sets.py.

No learned judge: each pixel is snapped to the nearest palette colour (or left unassigned when nothing
is close), same-colour pixels are grouped into connected components, and each component's geometry
gives its shape, size and centre. Every check is strict — an extra object, a hollow or lumpy blob, or
a wrong colour fails the image — so a model scores high only by drawing the scene the prompt asks for.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ldm.shapes.dataset import BACKGROUND, COLOURS, FRAME, Scene, ShapeObject, render
from ldm.shapes.prompt_sets import CATEGORIES, EvalCase, cases_digest, eval_cases

logger = logging.getLogger(__name__)

COLOUR_TOLERANCE = 60.0  # min RGB distance a pixel may sit from its palette colour (see _tolerances)
MIN_AREA = 20  # px; smaller components are specks, not objects
MIN_SOLIDITY = 0.85  # pixels / filled row spans: rejects hollow, ragged or scattered blobs
SIZE_SPLIT = 21  # px extent between the small (12-18) and large (24-32) ranges
MAX_EXTENT = 38  # px; anything wider is not one of our objects
MIN_EXTENT = 9
RELATION_MIN_PX = 6  # half the dataset's 12 px minimum: generated layouts are looser
MAX_SHIFT = 8.0  # px an img2img result may move its object's centre


@dataclass(frozen=True)
class Detected:
    """One connected same-colour region, measured in the 64 px frame."""

    colour: str
    shape: str | None  # None when the geometry matches no shape
    size: str | None  # None when the extent fits neither size range
    area: int
    cx: float  # bounding-box centre: equals the drawing centre for every shape (a triangle's
    cy: float  # mass centroid sits h/6 below it, which would bias vertical relations)
    fill: float  # filled row spans / bounding box: square 1.0, circle ~0.785, triangle ~0.5
    top_fraction: float  # share of the filled area in the top half of the box: upright triangle ~0.25


def to_uint8(image: np.ndarray | Image.Image, frame: int | None = FRAME) -> np.ndarray:
    """HxWx3 uint8 or float in [0, 1] (or a PIL image) -> square uint8, resized to `frame` unless None."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"expected a square image, got {arr.shape[1]}x{arr.shape[0]}")
    if np.issubdtype(arr.dtype, np.floating):
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image or a float image in [0, 1], got dtype {arr.dtype}")
    if frame is not None and arr.shape[0] != frame:
        # BOX averages when shrinking; the colour tolerance absorbs the blended edge pixels
        arr = np.asarray(Image.fromarray(arr).resize((frame, frame), Image.Resampling.BOX))
    return arr


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """8-connected components of a boolean mask as (ys, xs) index arrays."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, ys, xs = [(y0, x0)], [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append((np.array(ys), np.array(xs)))
    return out


def _classify(fill: float, top: float, aspect: float) -> str | None:
    """Shape from geometry; all three shapes have square boxes, so a stretched box is no shape."""
    if not 0.7 <= aspect <= 1.43:
        return None
    if top < 0.4:  # upright triangle: narrow apex on top, wide base below (~0.25 of the area on top)
        # up to 0.72: blur eats a small triangle's one-pixel apex, which raises its fill from ~0.55
        return "triangle" if 0.38 <= fill <= 0.72 else None
    if top > 0.6:
        return None
    if fill >= 0.92:
        return "square"
    return "circle" if fill >= 0.68 else None  # a circle is as heavy on top as below, fill ~0.785


def _peel(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Drop edge rows/columns holding a single pixel: noise spurs that would inflate the box.

    Returns the peeled mask and how many rows and columns came off the top and left.
    """
    top = left = 0
    while mask.shape[0] > 2 and mask.shape[1] > 2:
        if mask[0].sum() <= 1:
            mask, top = mask[1:], top + 1
        elif mask[-1].sum() <= 1:
            mask = mask[:-1]
        elif mask[:, 0].sum() <= 1:
            mask, left = mask[:, 1:], left + 1
        elif mask[:, -1].sum() <= 1:
            mask = mask[:, :-1]
        else:
            break
    return mask, top, left


def _measure(colour: str, ys: np.ndarray, xs: np.ndarray) -> Detected:
    y0, x0 = int(ys.min()), int(xs.min())
    mask = np.zeros((int(ys.max()) + 1 - y0, int(xs.max()) + 1 - x0), dtype=bool)
    mask[ys - y0, xs - x0] = True
    mask, dy, dx = _peel(mask)
    y0, x0 = y0 + dy, x0 + dx
    h, w = mask.shape
    cx, cy = x0 + w / 2, y0 + h / 2
    # row spans fill interior holes and noisy pixels: every shape here is one interval per row
    has = mask.any(1)
    first, last = mask.argmax(1), w - 1 - mask[:, ::-1].argmax(1)
    spans = np.where(has, last - first + 1, 0).astype(np.float64)
    filled = float(spans.sum())
    if filled == 0 or mask.sum() / filled < MIN_SOLIDITY:
        return Detected(colour, None, None, len(ys), cx, cy, 0.0, 0.0)
    # the middle row of an odd-height box counts half to each half
    top = float(spans[: h // 2].sum() + (spans[h // 2] / 2 if h % 2 else 0.0))
    fill, top_fraction = filled / (h * w), top / filled
    extent = max(h, w)
    size = None
    if MIN_EXTENT <= extent < SIZE_SPLIT:
        size = "small"
    elif SIZE_SPLIT <= extent <= MAX_EXTENT:
        size = "large"
    return Detected(colour, _classify(fill, top_fraction, w / h), size, len(ys), cx, cy, fill, top_fraction)


def _tolerances() -> np.ndarray:
    """Per palette entry (background first), how far in RGB a pixel may sit from it and still count.

    Half the colour's distance to the background, so a blurred edge is cut where it is half grey for
    every colour alike (a fixed radius would erode white and black shapes more than purple ones).
    Blends of any colour with the grey never come nearer a third palette colour, so this cannot
    mislabel an edge; the radius only rejects colours that are far from everything.
    """
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
    half_way = np.linalg.norm(palette - palette[0], axis=-1) / 2
    return np.maximum(half_way, COLOUR_TOLERANCE)


def detect_objects(image: np.ndarray | Image.Image) -> list[Detected]:
    """Every non-speck palette-coloured region of an image, largest first."""
    img = to_uint8(image).astype(np.float32)
    names = ["background", *COLOURS]
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(-1)
    nearest[dist.min(-1) > _tolerances()[nearest]] = -1  # unassigned: an off-palette colour
    found = []
    for k in range(1, len(names)):
        for ys, xs in _components(nearest == k):
            if len(ys) >= MIN_AREA:
                found.append(_measure(names[k], ys, xs))
    return sorted(found, key=lambda d: -d.area)


def _matches(d: Detected, o: ShapeObject, check_size: bool) -> bool:
    # unprompted sizes may be either, but an object outside both ranges is not one of ours
    return d.colour == o.colour and d.shape == o.shape and (d.size == o.size if check_size else d.size is not None)


def relation_holds(a: Detected, b: Detected, relation: str) -> bool:
    """`a` lies `relation` `b`: on the right side by RELATION_MIN_PX, and not mainly along the other axis."""
    dx, dy = a.cx - b.cx, a.cy - b.cy  # image y grows downwards, so "above" means dy < 0
    along, across = {
        "to the left of": (-dx, dy), "to the right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx),
    }[relation]
    return bool(along >= RELATION_MIN_PX and along >= 0.5 * abs(across))


def score_single(image: np.ndarray, expected: ShapeObject, check_size: bool = True) -> bool:
    """Exactly one object, with the expected colour and shape (and size, if checked)."""
    found = detect_objects(image)
    return len(found) == 1 and _matches(found[0], expected, check_size)


def score_pair(image: np.ndarray, scene: Scene, check_size: bool = False) -> bool:
    """Exactly two objects matching the scene's colour+shape, in the scene's relation."""
    found = detect_objects(image)
    if len(found) != 2 or len(scene.objects) != 2 or scene.relation is None:
        return False
    a, b = scene.objects
    # the two colours always differ, so colour alone pairs detections with expected objects
    da = next((d for d in found if d.colour == a.colour), None)
    db = next((d for d in found if d.colour == b.colour), None)
    if da is None or db is None or not (_matches(da, a, check_size) and _matches(db, b, check_size)):
        return False
    return relation_holds(da, db, scene.relation)


def score_img2img(image: np.ndarray, expected: ShapeObject, max_shift: float = MAX_SHIFT) -> bool:
    """The recoloured object, right colour and shape, with its centre within `max_shift` px of the input's."""
    found = detect_objects(image)
    if len(found) != 1 or not _matches(found[0], expected, check_size=False):
        return False
    return float(np.hypot(found[0].cx - expected.cx, found[0].cy - expected.cy)) <= max_shift


def score_case(case: EvalCase, image: np.ndarray) -> bool:
    """Whether `image` shows what `case` asked for, by the category's rule."""
    if case.category == "img2img":
        return score_img2img(image, case.expected.objects[0])
    if len(case.expected.objects) == 1:
        return score_single(image, case.expected.objects[0], case.check_size)
    return score_pair(image, case.expected)


Generate = Callable[[str, int], np.ndarray]  # (prompt, seed) -> HxWx3 float image in [0, 1]
Img2Img = Callable[[np.ndarray, str, float, int], np.ndarray]  # (init uint8, prompt, strength, seed) -> same


def run_shapes_eval(
    generate: Generate,
    img2img: Img2Img | None,
    n: int = 50,
    seed: int | None = 0,
    progress: bool = True,
    save_dir: Path | None = None,
    resolution: int = FRAME,
    cases: dict[str, list[EvalCase]] | None = None,
) -> dict:
    """Generate every eval case and return accuracies per category (JSON-ready).

    `img2img=None` skips that category (its accuracy is then None); its init images are rendered at
    `resolution` px. With `save_dir`, each generated image is saved as
    `{category}_{index:03d}_{ok|fail}.png` for inspection. Images of any square size are scored.
    `cases` replaces the seeded draw `eval_cases(n, seed)` (e.g. with `frozen_cases()`).
    """
    cases = dict(eval_cases(n, seed) if cases is None else cases)
    digest = cases_digest(cases)
    if img2img is None:
        cases["img2img"] = []
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    counts = {c: [0, len(cs)] for c, cs in cases.items()}
    bar = tqdm(total=sum(len(cs) for cs in cases.values()), desc="eval shapes", disable=not progress)
    for category, cs in cases.items():
        for i, case in enumerate(cs):
            if case.init is not None and img2img is not None:
                image = img2img(render(case.init, resolution), case.prompt, case.strength, case.seed)
            else:
                image = generate(case.prompt, case.seed)
            ok = score_case(case, image)
            counts[category][0] += int(ok)
            if save_dir is not None:
                name = f"{category}_{i:03d}_{'ok' if ok else 'fail'}.png"
                Image.fromarray(to_uint8(image, frame=None)).save(Path(save_dir) / name)
            bar.update(1)
    bar.close()
    result: dict = {c: (k / total if total else None) for c, (k, total) in counts.items()}
    result.update(n=max(len(cs) for cs in cases.values()), seed=seed, cases_sha256=digest,
                  counts={c: {"correct": k, "total": total} for c, (k, total) in counts.items()})
    logger.info("shapes eval: %s", {c: result[c] for c in CATEGORIES})
    return result
