"""Caption datasets: the three layouts, bad files skipped and counted, deterministic items and order."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.train.config import DataConfig
from ldm.train.data import CaptionDataset, DataError, scan_records
from ldm.train.order import GlobalBatchOrder, StepDraws


def image(path: Path, colour=(200, 30, 30), size=(24, 16)) -> Path:
    im = Image.new("RGB", size, colour)
    for x in range(size[0]):  # a horizontal ramp in green, so crops and flips change the pixels
        for y in range(size[1]):
            im.putpixel((x, y), (colour[0], 10 * x % 256, colour[2]))
    im.save(path)
    return path


def test_txt_layout_with_bad_files(tmp_path, caplog):
    for i in range(3):
        image(tmp_path / f"good{i}.png")
        (tmp_path / f"good{i}.txt").write_text(f"caption {i}\n")
    noise = Image.frombytes("RGB", (32, 32), bytes(range(256)) * 12)
    noise.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "full.png").unlink()
    (tmp_path / "truncated.png").write_bytes(data[:len(data) * 2 // 3])  # a valid header, cut-off pixel data
    (tmp_path / "truncated.txt").write_text("t")
    (tmp_path / "notimage.png").write_text("this is text")
    (tmp_path / "notimage.txt").write_text("n")
    image(tmp_path / "badcaption.png")
    (tmp_path / "badcaption.txt").write_bytes(b"\xff\xfe\xfa invalid utf-8")
    image(tmp_path / "nocaption.png")
    with caplog.at_level(logging.WARNING):
        records, skipped = scan_records(DataConfig(path=str(tmp_path), resolution=8))
    assert [r.image.name for r in records] == ["good0.png", "good1.png", "good2.png"]
    assert [r.captions for r in records] == [["caption 0"], ["caption 1"], ["caption 2"]]
    assert skipped == {"unreadable image": 2, "bad caption": 1, "no caption": 1}
    assert "truncated.png" in caplog.text and "notimage.png" in caplog.text and "4 entries skipped" in caplog.text
    # a VAE run needs no captions: the uncaptioned image is used
    records, _ = scan_records(DataConfig(path=str(tmp_path), resolution=8), need_captions=False)
    assert "nocaption.png" in [r.image.name for r in records]


def test_jsonl_and_csv_layouts(tmp_path):
    for i in range(3):
        image(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join([
        json.dumps({"file_name": "0.png", "text": ["a", "b"]}),
        "{not json",
        json.dumps({"file_name": "1.png", "text": "c"}),
        json.dumps({"file_name": "missing.png", "text": "d"}),
        json.dumps({"file_name": "2.png", "text": 5}),
    ]) + "\n")
    records, skipped = scan_records(DataConfig(path=str(tmp_path)))
    assert [(r.image.name, r.captions) for r in records] == [("0.png", ["a", "b"]), ("1.png", ["c"])]
    assert skipped == {"bad metadata row": 1, "missing image": 1, "bad caption": 1}
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    image(csv_dir / "x.png")
    (csv_dir / "metadata.csv").write_text('file_name,text\nx.png,"a cat, sitting"\n')
    records, _ = scan_records(DataConfig(path=str(csv_dir)))
    assert records[0].captions == ["a cat, sitting"]
    # a path straight to the CSV file works too
    assert scan_records(DataConfig(path=str(csv_dir / "metadata.csv")))[0][0].image == csv_dir / "x.png"


def test_no_usable_image_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such dataset"):
        scan_records(DataConfig(path=str(tmp_path / "nope")))
    (tmp_path / "a.png").write_text("junk")
    (tmp_path / "a.txt").write_text("caption")
    with pytest.raises(DataError, match=r"no usable images \(skipped: \{'unreadable image': 1\}\)"):
        scan_records(DataConfig(path=str(tmp_path)))
    with pytest.raises(DataError, match="set data.path"):
        scan_records(DataConfig(path=""))


def test_items_are_deterministic_and_bad_files_are_replaced(tmp_path):
    for i in range(4):
        image(tmp_path / f"{i}.png", colour=(60 * i, 0, 0), size=(20, 12))
        (tmp_path / f"{i}.txt").write_text(f"c{i}")
    cfg = DataConfig(path=str(tmp_path), resolution=8, center_crop=False, random_flip=True, caption_dropout=0.3)
    records, _ = scan_records(cfg)
    ds = CaptionDataset(records, cfg, seed=3)
    a, b = ds[(1, 2)], ds[(1, 2)]
    assert torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"] and a["flip"] == b["flip"]
    assert a["pixels"].shape == (3, 8, 8) and -1.0 <= a["pixels"].min() and a["pixels"].max() <= 1.0
    # over many epochs, flips, crops and caption dropout all happen, and differ between epochs
    items = [ds[(e, 2)] for e in range(40)]
    assert {it["flip"] for it in items} == {False, True}
    assert {it["caption"] for it in items} == {"c2", ""}
    assert len({it["pixels"].numpy().tobytes() for it in items}) > 2
    # a file that breaks after the scan is replaced by the next image, and counted
    (tmp_path / "2.png").write_bytes(b"broken")
    item = ds[(0, 2)]
    assert item["bad"] == 1 and item["index"] == 3 and item["caption"] in ("c3", "")


def test_global_order_slices_one_big_batch_between_ranks():
    single = iter(GlobalBatchOrder(10, 4, 1, 0, seed=1))
    ranks = [iter(GlobalBatchOrder(10, 2, 2, r, seed=1)) for r in range(2)]
    for _ in range(5):  # 2 batches per epoch: crosses epoch boundaries
        big = next(single)
        assert big == next(ranks[0]) + next(ranks[1])
    # starting at micro-step 3 gives exactly what the uninterrupted stream gives from there on
    stream = iter(GlobalBatchOrder(10, 3, 1, 0, seed=2))
    expected = [next(stream) for _ in range(7)][3:]
    resumed = iter(GlobalBatchOrder(10, 3, 1, 0, seed=2, start_micro=3))
    assert [next(resumed) for _ in range(4)] == expected
    # every index once per epoch (the incomplete tail is dropped)
    epoch0 = [i for b in [next(iter(GlobalBatchOrder(9, 3, 1, 0, seed=0)))] for _, i in b]
    assert len(set(epoch0)) == 3
    with pytest.raises(DataError, match="fewer than one global batch"):
        GlobalBatchOrder(3, 2, 2, 0, seed=0)


def test_step_draws_are_slices_of_the_global_draws():
    full = StepDraws(0, 5, 4, 1, 0)
    parts = [StepDraws(0, 5, 2, 2, r) for r in range(2)]
    assert torch.equal(full.randint(1000), torch.cat([p.randint(1000) for p in parts]))
    assert torch.equal(full.randn(3, 2), torch.cat([p.randn(3, 2) for p in parts]))
    assert not torch.equal(StepDraws(0, 6, 4, 1, 0).randn(3), StepDraws(0, 5, 4, 1, 0).randn(3))


def test_edit_pair_rows_carry_their_source_cropped_and_flipped_alike(tmp_path, caplog):
    from ldm.train.data import collate

    image(tmp_path / "plain.png")
    image(tmp_path / "target.png", colour=(20, 0, 200))
    image(tmp_path / "source.png", colour=(200, 0, 20))
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file_name": "plain.png", "text": "p"},
        {"file_name": "target.png", "source_file_name": "source.png", "text": "a blue thing"},
        {"file_name": "target.png", "source_file_name": "gone.png", "text": "x"},
    ]) + "\n")
    cfg = DataConfig(path=str(tmp_path), resolution=8, center_crop=False, random_flip=True)
    with caplog.at_level(logging.WARNING):
        records, skipped = scan_records(cfg)
    # a row whose source is missing is dropped: its caption describes an edit, not its image
    assert [(r.image.name, r.source and r.source.name) for r in records] == [("plain.png", None),
                                                                             ("target.png", "source.png")]
    assert skipped == {"missing edit source": 1} and "gone.png" in caplog.text
    ds = CaptionDataset(records, cfg, seed=0)
    items = [ds[(e, 1)] for e in range(12)]
    assert {it["flip"] for it in items} == {False, True}
    for it in items:  # the green ramp is the same in both images: same crop, same flip
        assert it["has_source"] and torch.equal(it["source_pixels"][1], it["pixels"][1])
        assert it["source_pixels"][0].min() > 0 > it["pixels"][0].max()  # red source, blue target
    plain = ds[(0, 0)]
    assert not plain["has_source"] and plain["source_pixels"] is None
    batch = collate([plain, items[0]])
    assert batch["has_source"].tolist() == [False, True]
    assert torch.equal(batch["source_pixels"][0], plain["pixels"])  # a plain row is its own source
    assert torch.equal(batch["source_pixels"][1], items[0]["source_pixels"])


def test_an_edit_source_that_breaks_after_the_scan_trains_its_row_on_its_own_image(tmp_path, caplog):
    for name, colour in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200)), ("b-src.png", (0, 200, 0))):
        image(tmp_path / name, colour=colour)
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "source_file_name": "b-src.png", "text": "b"},
    ]) + "\n")
    cfg = DataConfig(path=str(tmp_path), resolution=8)
    ds = CaptionDataset(scan_records(cfg)[0], cfg, seed=0)
    assert not torch.equal(ds[(0, 1)]["source_pixels"], ds[(0, 1)]["pixels"])
    (tmp_path / "b-src.png").write_bytes(b"broken")
    with caplog.at_level(logging.WARNING):
        item = ds[(0, 1)]
    # not the next row's image: the row's own, so the pair degrades to a plain example, and it is counted
    assert item["bad"] == 1 and item["index"] == 1 and torch.equal(item["source_pixels"], item["pixels"])
    assert "b-src.png" in caplog.text
