"""The shapes dataset (exact ground truth) and its pixel evaluator (right on truth, wrong on wrong)."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm.shapes.dataset import (
    BACKGROUND, COLOURS, HELD_OUT, MARGIN, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, place_pair, place_single,
    random_scene, read_scenes, render, write_shapes_dataset,
)
from ldm.shapes.evaluate import detect_objects, run_shapes_eval, score_case, score_single, to_uint8
from ldm.shapes.prompt_sets import CATEGORIES, cases_from_json, cases_to_json, eval_cases

N_EVAL = 24  # per category: covers every relation and every held-out pair/kind several times


def _accuracy(cases, image_of) -> float:
    return sum(score_case(c, image_of(c)) for c in cases) / len(cases)


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slight blur plus N(0, 8/255) noise: what a well-trained generator's flat colours look like."""
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7))).astype(np.float64) / 255
    return np.clip(blurred + rng.normal(0, 8 / 255, blurred.shape), 0, 1)


def _other_size(o: ShapeObject) -> ShapeObject:
    """Same object drawn in the other size range, kept on the pixel grid inside the canvas."""
    size = "large" if o.size == "small" else "small"
    d = sum(SIZES[size]) // 2
    lo, hi = MARGIN, 64 - MARGIN - d
    x0, y0 = (min(max(int(c - d / 2), lo), hi) for c in (o.cx, o.cy))
    return replace(o, size=size, diameter=d, cx=x0 + d / 2, cy=y0 + d / 2)


def _other(values, current):
    return next(v for v in values if v != current)


@pytest.fixture(scope="module")
def cases():
    return eval_cases(N_EVAL, seed=0)


# ---- dataset -----------------------------------------------------------------------------------


def test_dataset_pixels_agree_with_ground_truth(tmp_path):
    write_shapes_dataset(tmp_path, 40, seed=3, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and len(list(tmp_path.glob("*.png"))) == 40
    palette = {BACKGROUND, *COLOURS.values()}
    for (path, scene), row in zip(read_scenes(tmp_path), rows):
        assert isinstance(row["text"], list) and row["text"][0] == row["caption"] == scene.caption()
        img = np.asarray(Image.open(path))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert {tuple(p) for p in img.reshape(-1, 3)} <= palette  # exact colours: no anti-aliasing
        assert tuple(img[0, 0]) == BACKGROUND
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        centres = []
        for o in scene.objects:
            assert (o.colour, o.shape) not in HELD_OUT
            ys, xs = np.nonzero((img == COLOURS[o.colour]).all(-1))
            w, h = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
            lo, hi = SIZES[o.size]
            assert w == h == o.diameter and lo <= w <= hi, (o, w, h)
            centres.append(((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2))
        if scene.relation is not None:
            (ax, ay), (bx, by) = centres
            sep = {"to the left of": bx - ax, "to the right of": ax - bx, "above": by - ay, "below": ay - by}
            assert sep[scene.relation] >= 12, (scene, centres)
            assert scene.relation in row["text"][0]


def test_scene_balance_and_held_out_never_drawn():
    scenes = [random_scene(random.Random(i)) for i in range(1500)]
    pairs = [s for s in scenes if len(s.objects) == 2]
    assert 0.33 < 1 - len(pairs) / len(scenes) < 0.47
    for relation in RELATIONS:
        assert 0.2 < sum(s.relation == relation for s in pairs) / len(pairs) < 0.3
    drawn = {(o.colour, o.shape) for s in scenes for o in s.objects}
    assert drawn.isdisjoint(HELD_OUT) and len(drawn) == len(COLOURS) * len(SHAPES) - len(HELD_OUT)
    assert {o.size for s in scenes for o in s.objects} == set(SIZES)


def test_dataset_is_deterministic_per_seed(tmp_path):
    a, b, c = (write_shapes_dataset(tmp_path / name, 6, seed=s, progress=False) for name, s in
               (("a", 7), ("b", 7), ("c", 8)))
    meta = [(d / "metadata.jsonl").read_text() for d in (a, b, c)]
    assert meta[0] == meta[1] and meta[0] != meta[2]
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(a / f"{i:06d}.png")), np.asarray(Image.open(b / f"{i:06d}.png")))


def test_dataset_bad_input_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        write_shapes_dataset(tmp_path / "x", 0, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        write_shapes_dataset(tmp_path / "file", 2, progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("keep me")
    write_shapes_dataset(tmp_path / "d", 2, progress=False)
    assert (tmp_path / "d" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="different colours"):
        place_pair(random.Random(0), ("red", "circle", "small"), ("red", "square", "small"), "above")


def test_captions_canonical_first_and_converse_true():
    rng = random.Random(0)
    scene = place_pair(rng, ("red", "circle", "small"), ("blue", "square", "large"), "to the left of")
    caps = scene.captions(rng)
    assert caps[0] == "a red circle to the left of a blue square"
    assert caps[1] == "a blue square to the right of a red circle"
    for cap in caps:  # paraphrases never name anything that is not drawn
        assert set(re.findall("|".join(COLOURS), cap)) == {"red", "blue"}
        assert "above" not in cap and "below" not in cap
    single = place_single(rng, "green", "triangle", "large").captions(rng)
    assert single[:2] == ["a large green triangle", "a green triangle"]


# ---- evaluator: right on ground truth ------------------------------------------------------------


def test_eval_cases_fixed_and_well_formed(cases):
    assert eval_cases(N_EVAL, seed=0) == cases and eval_cases(N_EVAL, seed=1) != cases
    assert cases_from_json(json.loads(json.dumps(cases_to_json(cases)))) == cases  # how the frozen set is stored
    assert all(len(cases[c]) == N_EVAL for c in CATEGORIES)
    for c in cases["single_object"]:
        (o,) = c.expected.objects
        assert c.prompt == f"a {o.size} {o.colour} {o.shape}" and (o.colour, o.shape) not in HELD_OUT
    assert {c.expected.relation for c in cases["two_object"]} == set(RELATIONS)
    for c in cases["held_out"]:
        assert any((o.colour, o.shape) in HELD_OUT for o in c.expected.objects)
    assert {len(c.expected.objects) for c in cases["held_out"]} == {1, 2}
    for c in cases["img2img"]:
        (o,), (i,) = c.expected.objects, c.init.objects
        assert c.prompt == f"a {o.colour} {o.shape}" and o.colour != i.colour and (o.cx, o.cy) == (i.cx, i.cy)


@pytest.mark.parametrize("degraded", [False, True])
def test_evaluator_scores_ground_truth_right(cases, degraded):
    rng = np.random.default_rng(0)
    for category in CATEGORIES:
        image_of = lambda c: _degrade(render(c.expected), rng) if degraded else render(c.expected)  # noqa: E731
        assert _accuracy(cases[category], image_of) >= 0.98, category


def test_evaluator_reads_other_resolutions_and_ignores_specks(cases):
    case = cases["single_object"][0]
    assert score_case(case, render(case.expected, 128).astype(np.float32) / 255)
    img = render(case.expected)
    # a 3x3 speck of another colour is noise, a 6x6 blob is an extra object; both in the corner
    # farthest from the object so they cannot touch it
    o = case.expected.objects[0]
    y, x = max(((1, 1), (1, 57), (57, 1), (57, 57)), key=lambda p: (p[0] - o.cy) ** 2 + (p[1] - o.cx) ** 2)
    colour = COLOURS[_other(COLOURS, o.colour)]
    speck, blob = img.copy(), img.copy()
    speck[y:y + 3, x:x + 3] = colour
    blob[y:y + 6, x:x + 6] = colour
    assert score_case(case, speck)
    assert len(detect_objects(blob)) == 2 and not score_case(case, blob)
    with pytest.raises(ValueError, match="HxWx3"):
        to_uint8(np.zeros((64, 64)))


# ---- evaluator: wrong on wrong images -------------------------------------------------------------


def _blank(_case) -> np.ndarray:
    return render(Scene(()))


def _noise(case) -> np.ndarray:
    return np.random.default_rng(case.seed).random((64, 64, 3))


def _recoloured(scene: Scene) -> Scene:
    return replace(scene, objects=tuple(replace(o, colour=_other(COLOURS, o.colour)) for o in scene.objects))


def _reshaped(scene: Scene) -> Scene:
    return replace(scene, objects=tuple(replace(o, shape=_other(SHAPES, o.shape)) for o in scene.objects))


def _colours_swapped(scene: Scene) -> Scene:
    a, b = scene.objects
    return replace(scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)))


def _mirrored(scene: Scene) -> Scene:
    """Reflect positions across the canvas along the relation's axis: the relation flips, nothing else."""
    horizontal = scene.relation in ("to the left of", "to the right of")
    return replace(scene, objects=tuple(
        replace(o, cx=64 - o.cx) if horizontal else replace(o, cy=64 - o.cy) for o in scene.objects))


def _one_missing(scene: Scene) -> Scene:
    return replace(scene, objects=scene.objects[:1], relation=None)


SINGLE_WRONG = {
    "colour": lambda c: render(_recoloured(c.expected)),
    "shape": lambda c: render(_reshaped(c.expected)),
    "size": lambda c: render(Scene((_other_size(c.expected.objects[0]),))),
    "blank": _blank,
    "noise": _noise,
}
PAIR_WRONG = {
    "colours swapped": lambda c: render(_colours_swapped(c.expected)),
    "mirrored relation": lambda c: render(_mirrored(c.expected)),
    "shapes": lambda c: render(_reshaped(c.expected)),
    "one missing": lambda c: render(_one_missing(c.expected)),
    "blank": _blank,
    "noise": _noise,
}


def _moved(case) -> np.ndarray:
    """The right object 16 px away from where it started (towards the centre, so it stays inside)."""
    (o,) = case.expected.objects
    dx = 16 if o.cx < 32 else -16
    return render(Scene((replace(o, cx=o.cx + dx),)))


IMG2IMG_WRONG = {
    "moved 16 px": _moved,
    "colour unchanged": lambda c: render(c.init),
    "shape": lambda c: render(_reshaped(c.expected)),
    "blank": _blank,
    "noise": _noise,
}


@pytest.mark.parametrize("wrong", list(SINGLE_WRONG))
def test_single_object_wrong_images_score_low(cases, wrong):
    singles = cases["single_object"] + [c for c in cases["held_out"] if len(c.expected.objects) == 1]
    assert _accuracy(singles, SINGLE_WRONG[wrong]) <= 0.1


@pytest.mark.parametrize("wrong", list(PAIR_WRONG))
def test_two_object_wrong_images_score_low(cases, wrong):
    pairs = cases["two_object"] + [c for c in cases["held_out"] if len(c.expected.objects) == 2]
    assert _accuracy(pairs, PAIR_WRONG[wrong]) <= 0.1


@pytest.mark.parametrize("wrong", list(IMG2IMG_WRONG))
def test_img2img_wrong_images_score_low(cases, wrong):
    assert _accuracy(cases["img2img"], IMG2IMG_WRONG[wrong]) <= 0.1


def test_size_only_checked_when_prompted(cases):
    case = cases["single_object"][0]
    wrong_size = render(Scene((_other_size(case.expected.objects[0]),)))
    assert not score_single(wrong_size, case.expected.objects[0])
    assert score_single(wrong_size, case.expected.objects[0], check_size=False)


# ---- the runner, with stand-in models ---------------------------------------------------------------


def test_run_shapes_eval_with_oracle_and_blank_models(tmp_path):
    n, seed = 6, 4
    by_prompt = {(c.prompt, c.seed): c for cs in eval_cases(n, seed).values() for c in cs}
    calls = []

    def oracle(prompt: str, s: int) -> np.ndarray:
        return render(by_prompt[(prompt, s)].expected, 128).astype(np.float32) / 255

    def recolour(init: np.ndarray, prompt: str, strength: float, s: int) -> np.ndarray:
        # a perfect img2img: repaint the object's pixels in the prompt's colour, leave everything else
        calls.append((init.shape, strength))
        out = init.copy()
        out[(init != BACKGROUND).any(-1)] = COLOURS[prompt.split()[1]]
        return out.astype(np.float32) / 255

    # a 128 px model: init images come at its size, and its outputs are scored at any size
    result = run_shapes_eval(oracle, recolour, n=n, seed=seed, progress=False, save_dir=tmp_path, resolution=128)
    assert all(result[c] == 1.0 for c in CATEGORIES) and calls == [((128, 128, 3), 0.7)] * n
    assert result["n"] == n and result["seed"] == seed and result["counts"]["held_out"] == {"correct": n, "total": n}
    assert len(list(tmp_path.glob("*_ok.png"))) == 4 * n
    json.dumps(result)

    blank = run_shapes_eval(lambda p, s: np.full((64, 64, 3), 0.5), None, n=n, seed=seed, progress=False)
    assert all(blank[c] == 0.0 for c in CATEGORIES[:3]) and blank["img2img"] is None
    first_two = {c: cs[:2] for c, cs in eval_cases(n, seed).items()}
    given = run_shapes_eval(oracle, None, seed=None, progress=False, cases=first_two)
    assert given["n"] == 2 and given["seed"] is None and given["counts"]["two_object"] == {"correct": 2, "total": 2}
    assert given["cases_sha256"] != result["cases_sha256"]


def test_lookalikes_are_no_shape():
    """Shapes outside the dataset's three must not pass as one of them."""
    tri = render(Scene((ShapeObject("triangle", "red", "large", 32, 32, 28),)))
    square = render(Scene((ShapeObject("square", "red", "large", 32, 32, 28),)))
    hollow = square.copy()
    hollow[22:42, 22:42] = BACKGROUND
    yy, xx = np.mgrid[:64, :64] + 0.5
    ellipse, diamond = (np.full((64, 64, 3), BACKGROUND, np.uint8) for _ in range(2))
    ellipse[((xx - 32) / 14) ** 2 + ((yy - 32) / 8) ** 2 < 1] = COLOURS["red"]
    diamond[np.abs(xx - 32) + np.abs(yy - 32) <= 14] = COLOURS["red"]
    for name, img in {"upside-down triangle": tri[::-1], "hollow square": hollow, "ellipse": ellipse,
                      "diamond": diamond}.items():
        (found,) = detect_objects(img)
        assert found.colour == "red" and found.shape is None, name
    giant = render(Scene((ShapeObject("square", "red", "large", 32, 32, 48),)))
    assert detect_objects(giant)[0].size is None
    assert not score_single(giant, ShapeObject("square", "red", "large", 32, 32, 48), check_size=False)


def _load_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "research" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("prediction_type,zero_snr,t", [("epsilon", False, 999), ("v_prediction", False, 999),
                                                      ("v_prediction", True, 999), ("v_prediction", True, 500)])
def test_relation_binding_probe_x0_matches_diffusers(prediction_type, zero_snr, t):
    from diffusers import DDPMScheduler

    probe = _load_script("relation_binding_probe")
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = sched.step(out, t, x_t, generator=g).pred_original_sample
    ours = probe.predicted_x0(out, x_t, sched.alphas_cumprod[t], prediction_type)
    assert torch.isfinite(ours).all() and (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_relation_binding_probe_mirrors_only_the_direction(tmp_path):
    """scripts/research/relation_binding_probe.py: the false caption differs from the true one in the relation's
    direction only; with identical conditioning both captions must score the same (same x_t)."""
    from tiny import write_tiny_sd_folder

    from ldm.pipeline import Pipeline

    probe = _load_script("relation_binding_probe")
    scene_list = probe.scenes(8, seed=0)
    assert [s.relation for s in scene_list[:4]] == list(RELATIONS)
    for s in scene_list:
        false = probe.mirrored(s)
        a, b = s.objects
        assert false == f"a {a.colour} {a.shape} {probe.MIRROR[s.relation]} a {b.colour} {b.shape}"
        holds = {"to the left of": a.cx < b.cx, "to the right of": a.cx > b.cx, "above": a.cy < b.cy, "below": a.cy > b.cy}
        assert holds[s.relation] and not holds[probe.MIRROR[s.relation]]  # the mirrored caption is false
    pipe = Pipeline.from_pretrained(write_tiny_sd_folder(tmp_path / "m"))
    rows = probe.binding_table(pipe, scene_list, timesteps=(999, 500))
    assert [r["t"] for r in rows] == [999, 500]
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("true_caption", "mirrored_caption"))
    probe.mirrored = lambda s: s.caption()  # the "false" caption now equals the true one
    same = probe.binding_table(pipe, scene_list, timesteps=(999, 500))
    assert all(r["true_caption"] == r["mirrored_caption"] for r in same)


def test_align_vae_colours_folds_an_exact_latent_map(tmp_path):
    """ldm.shapes.align_vae: the map z' = A z - c folded into the VAE's 1x1 convolutions leaves
    reconstructions unchanged and gives exactly A z - c as the new latent; the U-Net carried over
    satisfies unet'(M x) = M unet(x); and the stretch raises the smallest pairwise cosine."""
    from tiny import write_tiny_sd_folder

    from ldm.pipeline import Pipeline

    from ldm.shapes import align_vae as align
    parts = Pipeline.from_pretrained(write_tiny_sd_folder(tmp_path / "m")).parts
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    w = torch.nn.functional.normalize(torch.randn(4, generator=g), dim=0)
    a, centre = align.stretch_matrix(w, 3.0), torch.randn(4, generator=g)
    with torch.no_grad():
        z = parts.vae.encode(x).mean
        before = parts.vae.decode(z)
        align.fold_into_vae(parts.vae, a, centre)
        z_new = parts.vae.encode(x).mean
        after = parts.vae.decode(z_new)
    assert torch.allclose(z_new, torch.einsum("ij,bjhw->bihw", a, z) - centre.view(1, 4, 1, 1), atol=1e-5)
    assert (after - before).abs().max() <= 1e-4

    unet = parts.unet
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    m = 1.7 * a
    with torch.no_grad():
        out = unet(latents, t, states)
        align.fold_into_unet(unet, m)
        out_new = unet(torch.einsum("ij,bjhw->bihw", m, latents), t, states)
    assert torch.allclose(out_new, torch.einsum("ij,bjhw->bihw", m, out), atol=1e-4)

    # offsets in one half-space but with some pairs pointing apart, like the trained VAE's palette
    offsets = {"a": torch.tensor([1.0, 0.9, 0.0, 0.0]), "b": torch.tensor([1.0, -0.9, 0.0, 0.0]),
               "c": torch.tensor([0.4, 0.0, 1.0, 0.0]), "d": torch.tensor([0.4, 0.0, -1.0, 0.3])}
    w, margin = align.shared_direction(offsets)
    assert abs(float(w.norm()) - 1) < 1e-5
    d = torch.nn.functional.normalize(torch.stack(list(offsets.values())), dim=1)
    random_dirs = torch.nn.functional.normalize(torch.randn(20000, 4, generator=g), dim=1)
    assert margin > 0 and margin >= float((random_dirs @ d.T).min(1).values.max()) - 1e-3
    stretched = torch.nn.functional.normalize(d @ align.stretch_matrix(w, 4.0).T, dim=1)
    assert float((stretched @ stretched.T).min()) > float((d @ d.T).min())
    assert float((stretched @ stretched.T).min()) > 0


@pytest.fixture
def seed_script():
    from ldm.shapes import seed_relation

    return seed_relation


def test_seed_relation_attention_labels_token_sides(seed_script):
    """ldm.shapes.seed_relation: each colour/shape word gets its own object's side on the axis
    the caption states, in either phrasing; shared words, other axes and lone objects get none."""
    from ldm.text import load_minilm

    seed = seed_script
    tok = load_minilm().tokenizer
    red = {"colour": "red", "shape": "circle", "cx": 10.0, "cy": 30.0}
    blue = {"colour": "blue", "shape": "square", "cx": 40.0, "cy": 35.0}

    def by_word(caption, objects):
        sides = seed.token_sides(tok, caption, objects, 16)
        words = tok.convert_ids_to_tokens(tok(caption, padding="max_length", max_length=16)["input_ids"])
        return {w: tuple(sides[j].tolist()) for j, w in enumerate(words) if sides[j].any()}

    want = {"red": (-1.0, 0.0), "circle": (-1.0, 0.0), "blue": (1.0, 0.0), "square": (1.0, 0.0)}
    assert by_word("a red circle to the left of a blue square", [red, blue]) == want
    assert by_word("a blue square to the right of a red circle", [blue, red]) == want
    blue_circle = dict(blue, shape="circle")
    assert by_word("a red circle above a blue circle", [red, blue_circle]) == {"red": (0.0, -1.0), "blue": (0.0, 1.0)}
    assert not seed.token_sides(tok, "a red circle", [red], 16).any()


def test_seed_relation_attention_writes_exactly_the_side_term(seed_script):
    """The written rows add alpha * (x . p)(e . s), summed over both axes, to head 0's scaled logits;
    every other row and head is left as it was. Ridge recovers an exact linear map."""
    from ldm.models.attention import Attention

    seed = seed_script
    g = torch.Generator().manual_seed(0)
    x, truth = torch.randn(200, 6, generator=g), torch.randn(6, 2, generator=g)
    assert torch.allclose(seed.ridge(x, x @ truth, lam=1e-9), truth, atol=1e-4)

    attn = Attention(16, heads=2, head_dim=8, context_dim=12, bias=True)
    q0, k0 = attn.to_q.weight.detach().clone(), attn.to_k.weight.detach().clone()
    position, side = torch.randn(16, 2, generator=g), torch.randn(12, 2, generator=g)
    rows = seed.write_side_term(attn, position, side, alpha=3.0)
    assert len(set(rows)) == 2 and all(0 <= r < 8 for r in rows)
    kept = [r for r in range(16) if r not in rows]
    assert torch.equal(attn.to_q.weight[kept], q0[kept]) and torch.equal(attn.to_k.weight[kept], k0[kept])
    h, e = torch.randn(5, 16, generator=g), torch.randn(7, 12, generator=g)
    with torch.no_grad():
        q, k = attn.to_q(h)[:, rows], attn.to_k(e)[:, rows]
    logits = q @ k.T / 8 ** 0.5
    assert torch.allclose(logits, 3.0 * (h @ position) @ (e @ side).T, rtol=1e-4, atol=1e-4)


def test_seed_relation_attention_fits_every_cross_attention_and_rejects_bad_data(tmp_path, seed_script):
    """Every cross-attention layer gets a position probe of the right shape; a missing dataset is one
    clear error and writes nothing."""
    from tiny import write_tiny_sd_folder

    from ldm.pipeline import Pipeline

    seed = seed_script
    folder = write_tiny_sd_folder(tmp_path / "m")
    pipe = Pipeline.from_pretrained(folder)
    fitted = seed.fit_query_positions(pipe, 8, seed=0)
    names = [n for n, _ in pipe.parts.unet.named_modules() if n.endswith("attn2")]
    assert sorted(fitted) == sorted(names)
    for name, (weights, r2) in fitted.items():
        assert weights.shape == (pipe.parts.unet.get_submodule(name).to_q.in_features, 2) and r2 <= 1.0

    with pytest.raises(ValueError) as exit_info:
        seed.seed_relation_attention(folder, tmp_path / "none", tmp_path / "o")
    assert "no such file" in str(exit_info.value) and not (tmp_path / "o").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metadata.jsonl").write_text('{"file_name": "a.png", "objects": [{}, {}]}\n')
    with pytest.raises(ValueError) as exit_info:
        seed.seed_relation_attention(folder, tmp_path / "bad", tmp_path / "o")
    assert "two-object records" in str(exit_info.value) and not (tmp_path / "o").exists()
    assert len(str(exit_info.value).splitlines()) == 1


def test_edit_pairs_recolour_the_object_in_place(tmp_path):
    plain = write_shapes_dataset(tmp_path / "plain", 4, seed=3, progress=False)
    out = write_shapes_dataset(tmp_path / "edit", 4, seed=3, progress=False, edit_pairs=40)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    # the plain rows are untouched by the pairs that follow them
    assert (out / "metadata.jsonl").read_text().startswith((plain / "metadata.jsonl").read_text())
    edits = rows[4:]
    assert len(edits) == 40
    for row in edits:
        source, target = Scene.from_dict(row["source"]).objects[0], Scene.from_dict(row).objects[0]
        assert source.colour != target.colour and replace(source, colour=target.colour) == target
        assert (source.colour, source.shape) not in HELD_OUT and (target.colour, target.shape) not in HELD_OUT
        assert row["caption"] == Scene((target,)).caption() and row["text"][0] == row["caption"]
        for name, obj in ((row["source_file_name"], source), (row["file_name"], target)):
            assert np.array_equal(np.asarray(Image.open(out / name)), render(Scene((obj,))))
    with pytest.raises(ValueError, match="edit-pairs"):
        write_shapes_dataset(tmp_path / "bad", 2, progress=False, edit_pairs=-1)
