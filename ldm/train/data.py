"""Captioned image datasets: three layouts, bad files skipped and counted, deterministic augmentation.

Layouts: images with same-name `.txt` captions; `metadata.jsonl` rows with `file_name` and `text`
(a string or a list of captions, one picked at random each time); or `metadata.csv` with the same
columns. A metadata row may also name a `source_file_name`: an edit pair, whose image is what the
caption asks the source to become (see `diffusion_loss.noised_inputs`). Every random choice (crop,
flip, caption, caption dropout) comes from a generator seeded by (seed, epoch, index), so an item
looks the same whichever worker loads it and after a resume.
"""
from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.train.config import DataConfig

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """The dataset cannot be used at all (missing, empty, nothing readable)."""


class BadImage(Exception):
    """One image that cannot be decoded; the caller skips it."""


@dataclass
class Record:
    image: Path
    captions: list[str]  # empty when captions are not needed (VAE training on a bare image folder)
    source: Path | None = None  # an edit pair's starting image; `image` is what the caption makes of it


def _captions(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _rows_jsonl(path: Path, skipped: Counter) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d: not valid JSON, skipped", path, n)
            skipped["bad metadata row"] += 1
            continue
        rows.append(row if isinstance(row, dict) else {})
    return rows


def _rows_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return list(csv.DictReader(f))


def _from_rows(root: Path, rows: list[dict], cfg: DataConfig, need_captions: bool, skipped: Counter) -> list[Record]:
    records = []
    for row in rows:
        name = row.get(cfg.image_column)
        captions = _captions(row.get(cfg.caption_column))
        if not isinstance(name, str) or not name:
            logger.warning("%s: metadata row without a '%s' entry, skipped", root, cfg.image_column)
            skipped["bad metadata row"] += 1
        elif captions is None and need_captions:
            logger.warning("%s: unusable '%s' for %s (expected a string or a list of strings), skipped",
                           root, cfg.caption_column, name)
            skipped["bad caption"] += 1
        elif not (root / name).is_file():
            logger.warning("%s: image %s listed in the metadata is missing, skipped", root, name)
            skipped["missing image"] += 1
        elif (source := _source(root, row.get(cfg.source_column), name, skipped)) is not False:
            records.append(Record(root / name, captions or [], source))
    return records


def _source(root: Path, value: Any, name: str, skipped: Counter) -> Path | None | bool:
    """The row's edit source: None when it names none, False (skip the row) when it names an unusable one.
    A row with a broken source is dropped, not trained as a plain image: its caption describes an edit."""
    if value is None or value == "":  # csv rows without the column read as ""
        return None
    if not isinstance(value, str) or not (root / value).is_file():
        logger.warning("%s: edit source %r of %s is missing, skipped", root, value, name)
        skipped["missing edit source"] += 1
        return False
    return root / value


def _from_folder(root: Path, need_captions: bool, skipped: Counter) -> list[Record]:
    records = []
    for image in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt = image.with_suffix(".txt")
        if not txt.exists():
            if need_captions:
                logger.warning("%s has no caption file %s, skipped", image, txt.name)
                skipped["no caption"] += 1
                continue
            records.append(Record(image, []))
            continue
        try:
            records.append(Record(image, [txt.read_text(encoding="utf-8").strip()]))
        except (OSError, UnicodeDecodeError) as e:
            logger.warning("%s: unreadable caption (%s), skipped", txt, e)
            skipped["bad caption"] += 1
    return records


def scan_records(cfg: DataConfig, need_captions: bool = True) -> tuple[list[Record], Counter]:
    """Every usable (image, captions) pair of the dataset, and the count of what was skipped and why."""
    if not cfg.path:
        raise DataError("no dataset given: set data.path (or pass --data)")
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset folder or file")
    skipped: Counter = Counter()
    if path.is_file() and path.suffix in (".jsonl", ".csv"):
        root, meta = path.parent, path
    elif path.is_dir():
        root = path
        meta = next((path / n for n in ("metadata.jsonl", "metadata.csv") if (path / n).is_file()), None)
    else:
        raise DataError(f"{path}: expected a folder, a .jsonl or a .csv file")
    if meta is None:
        records = _from_folder(root, need_captions, skipped)
    else:
        rows = _rows_jsonl(meta, skipped) if meta.suffix == ".jsonl" else _rows_csv(meta)
        records = _from_rows(root, rows, cfg, need_captions, skipped)
    if cfg.verify_images:
        usable = []
        for record in records:
            try:
                open_image(record.image)
                usable.append(record)
            except BadImage as e:
                logger.warning("%s, skipped", e)
                skipped["unreadable image"] += 1
        records = usable
    if not records:
        why = f" (skipped: {dict(skipped)})" if skipped else ""
        raise DataError(f"{path}: no usable images{why}")
    if skipped:
        logger.warning("dataset %s: %d usable images, %d entries skipped (%s)", path, len(records),
                       sum(skipped.values()), ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    return records, skipped


def open_image(path: Path) -> Image.Image:
    """Fully decoded RGB image; truncated, corrupt or non-image files raise BadImage."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later inside a worker
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadImage(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def resize_crop(im: Image.Image, resolution: int, rng: random.Random, center: bool) -> Image.Image:
    """Shorter side to `resolution`, then a centre or random square crop."""
    scale = resolution / min(im.size)
    size = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
    if im.size != size:
        im = im.resize(size, Image.BICUBIC)
    dx, dy = im.width - resolution, im.height - resolution
    left, top = (dx // 2, dy // 2) if center else (rng.randint(0, dx), rng.randint(0, dy))
    return im.crop((left, top, left + resolution, top + resolution))


def to_tensor(im: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], the range the autoencoder works in."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class CaptionDataset(torch.utils.data.Dataset):
    """Indexed by (epoch, index) so the per-item generator can be derived without shared state."""

    def __init__(self, records: list[Record], cfg: DataConfig, seed: int, load_pixels: bool = True) -> None:
        self.records, self.cfg, self.seed, self.load_pixels = records, cfg, seed, load_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        rng = random.Random(f"ldm-data:{self.seed}:{epoch}:{index}")  # str seeds hash stably across runs
        flip = self.cfg.random_flip and rng.random() < 0.5
        pixels, source, bad = None, None, 0
        if self.load_pixels:
            crop = random.Random()
            crop.setstate(rng.getstate())  # the source is cropped exactly like its target
            pixels, index, bad = self.pixels(index, flip, rng)
            if self.records[index].source is not None:
                source, broken = self.source_pixels(index, flip, crop)
                bad += broken
        captions = self.records[index].captions
        caption = rng.choice(captions) if captions else ""
        if self.cfg.caption_dropout > 0 and rng.random() < self.cfg.caption_dropout:
            caption = ""
        return {"pixels": pixels, "source_pixels": source, "has_source": self.records[index].source is not None,
                "caption": caption, "index": index, "flip": flip, "bad": bad}

    def _prepare(self, im: Image.Image, flip: bool, rng: random.Random) -> torch.Tensor:
        im = resize_crop(im, self.cfg.resolution, rng, self.cfg.center_crop)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(im)

    def pixels(self, index: int, flip: bool, rng: random.Random | None = None) -> tuple[torch.Tensor, int, int]:
        """(pixels, index of the image actually used, bad files passed over); `rng` only for random crops.

        A file that went bad after the scan is replaced by the next usable one, so batches keep their size
        and the replacement is the same on every run (exact resume holds even with bad files).
        """
        rng = rng or random.Random(index)
        for bad in range(len(self.records)):
            i = (index + bad) % len(self.records)
            try:
                im = open_image(self.records[i].image)
            except BadImage as e:
                logger.warning("%s, skipped (using the next image instead)", e)
                continue
            return self._prepare(im, flip, rng), i, bad
        raise DataError("no image of the dataset is readable any more")

    def source_pixels(self, index: int, flip: bool, rng: random.Random | None = None) -> tuple[torch.Tensor, int]:
        """(pixels of record `index`'s edit source, bad files met), cropped and flipped as `pixels` does with
        the same `rng`. A record without a source, or whose source broke after the scan, gives its own
        image: the row then trains as a plain one (an x_t of the image itself), never on another row's
        source."""
        record, rng = self.records[index], rng or random.Random(index)
        if record.source is not None:
            try:
                return self._prepare(open_image(record.source), flip, rng), 0
            except BadImage as e:
                logger.warning("%s, skipped (its row trains on its own image instead)", e)
        pixels, _, bad = self.pixels(index, flip, rng)
        return pixels, int(record.source is not None) + bad


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    pixels = [it["pixels"] for it in items]
    loaded = pixels[0] is not None
    edits = loaded and any(it["has_source"] for it in items)  # a batch without pairs stacks nothing more
    # rows without an edit source are their own source: the noised input then is the usual one
    sources = [it["pixels"] if it["source_pixels"] is None else it["source_pixels"] for it in items]
    return {
        "pixels": torch.stack(pixels) if loaded else None,
        "source_pixels": torch.stack(sources) if edits else None,
        "has_source": torch.tensor([it["has_source"] for it in items]),
        "captions": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
        "flip": torch.tensor([it["flip"] for it in items]),
        "bad": sum(it["bad"] for it in items),
    }
