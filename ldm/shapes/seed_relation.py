"""Seed the U-Net's cross-attention with a "query position x token side" term, so direction can be learnt.

The default model draws two objects on the axis the caption names, but which object goes on which
side is a coin flip (MODEL_CARD.md). Both halves of what direction needs are linearly readable:
- each cross-attention layer's input tells where its query sits (left/right, top/bottom), even from
  pure noise, because the convolutions' zero padding marks the borders;
- each colour or shape token's text state tells on which side the caption puts its object.
Attention that puts the left object's tokens on the left needs their product, a bilinear term in
q.k. Eight experiments (card) show gradient descent does not find it from a start near zero within
thousands of steps: it is a saddle, since neither factor pays until the other exists.

So `seed_relation_attention` builds the term and leaves the rest to training. It fits both probes by ridge
regression (the query position on the U-Net's own activations at high-noise steps; the token side on
training captions, labelled from the dataset's object records) and writes them into the two least
used query/key rows of head 0 in every cross-attention layer where position is readable (R^2 of at
least --min-r2). Per layer the term adds alpha * (x_q . p)(side_k . s) to that head's logits, with x_q
and side_k in [-1, 1]. Nothing else changes: the U-Net keeps its diffusers architecture, and a
warm-started `ldm train` run then learns to use (or drop) what the head now reads.
The default model's recipe runs it on stage 7 before stage 9 (`ldm recipe default-model`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ldm.io.model_files import save_diffusers_folder
from ldm.pipeline import Pipeline
from ldm.shapes.dataset import FRAME, RELATIONS, Scene, place_pair, random_attributes, render

PROBE_TIMESTEPS = (999, 950, 900, 850)  # where the layout is decided
POSITION_SCENES_SEED = 11  # not the relation binding probe's seeds, so its check stays on unseen scenes


def scenes(n: int, seed: int) -> list[Scene]:
    """`n` two-object training-style scenes, relations cycling through all four."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = random_attributes(rng)
        b = random_attributes(rng, exclude_colour=a[0])
        out.append(place_pair(rng, a, b, RELATIONS[i % len(RELATIONS)]))
    return out


def token_sides(tokenizer, caption: str, objects: list[dict], length: int) -> torch.Tensor:
    """[length, 2]: per token, the (x, y) side of the object it names (-1 left/top, +1 right/bottom),
    on the axis the caption states; 0 for every other token, for a word both objects share (their
    shape when it is the same) and for an axis the caption does not state."""
    sides = torch.zeros(length, 2)
    if len(objects) != 2:
        return sides
    axes = ("left" in caption or "right" in caption, "above" in caption or "below" in caption)
    ids = tokenizer(caption, padding="max_length", max_length=length, truncation=True)["input_ids"]
    for j, word in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        named = [k for k, o in enumerate(objects) if word in (o["colour"], o["shape"])]
        if len(named) != 1:
            continue
        own, other = objects[named[0]], objects[1 - named[0]]
        for a, key in enumerate(("cx", "cy")):
            if axes[a]:
                sides[j, a] = float(np.sign(own[key] - other[key]))
    return sides


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    x, y = x.double(), y.double()
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y).float()


@torch.no_grad()
def fit_token_sides(pipe: Pipeline, rows: list[dict], held_out: list[dict], seed: int) -> tuple[torch.Tensor, float]:
    """Ridge map text state -> (x side, y side), fitted on one random caption of each row (single-object
    rows too: their tokens must read as no side), and its sign accuracy on `held_out`'s object tokens."""
    encoder, rng = pipe.parts.text_encoder, random.Random(seed)

    def states_and_sides(some: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = [rng.choice(r["text"]) if isinstance(r["text"], list) else r["text"] for r in some]
        states = torch.cat([encoder.encode(captions[i:i + 256]).states.float() for i in range(0, len(some), 256)])
        sides = torch.stack([token_sides(encoder.tokenizer, c, r.get("objects", []), states.shape[1])
                             for c, r in zip(captions, some)])
        return states.flatten(0, 1), sides.flatten(0, 1)

    weights = ridge(*states_and_sides(rows))
    states, sides = states_and_sides(held_out)
    named = sides != 0
    return weights, float(((states @ weights)[named].sign() == sides[named]).float().mean())


@torch.no_grad()
def fit_query_positions(pipe: Pipeline, n_scenes: int, seed: int) -> dict[str, tuple[torch.Tensor, float]]:
    """Per cross-attention layer: ridge map of its (normalised) input -> the query's (x, y) in [-1, 1],
    fitted on two-object scenes noised to PROBE_TIMESTEPS, and the smaller of the two held-out R^2."""
    parts = pipe.parts
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: inputs.setdefault(name, []).append(args[0]))
             for name, m in parts.unet.named_modules() if name.endswith("attn2")]
    scene_list = scenes(n_scenes, seed)
    pixels = torch.from_numpy(np.stack([render(s, FRAME) for s in scene_list]).astype(np.float32))
    z0 = parts.vae.scale_latents(parts.vae.encode(pixels.permute(0, 3, 1, 2) / 127.5 - 1).mean)
    states = parts.text_encoder.encode([s.caption() for s in scene_list]).states
    try:
        for t in PROBE_TIMESTEPS:
            abar = parts.schedule.alphas_cumprod[t]
            x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * torch.randn_like(z0)
            for x, c in zip(x_t.split(64), states.split(64)):
                parts.unet(x, torch.full((len(x),), t), c)
    finally:
        for h in hooks:
            h.remove()
    fitted = {}
    for name, chunks in inputs.items():
        h = torch.cat(chunks).float()  # [B, side*side, C]
        side = int(round(h.shape[1] ** 0.5))
        c = (torch.arange(side) + 0.5) / side * 2 - 1
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        xy = torch.stack([xx.flatten(), yy.flatten()], -1).expand(len(h), -1, -1)
        h, xy = h.flatten(0, 1), xy.flatten(0, 1)
        split = int(0.8 * len(h))
        weights = ridge(h[:split], xy[:split])
        pred, truth = h[split:] @ weights, xy[split:]
        r2 = 1 - ((pred - truth) ** 2).mean(0) / truth.var(0)
        fitted[name] = (weights, float(r2.min()))
    return fitted


@torch.no_grad()
def write_side_term(attn, position: torch.Tensor, side: torch.Tensor, alpha: float) -> list[int]:
    """Overwrite head 0's two least used q/k rows so that head's logits gain
    alpha * (x . position[:, 0]) (e . side[:, 0]) + the same for y. Returns the rows used."""
    head_dim = attn.to_q.weight.shape[0] // attn.heads
    use = attn.to_q.weight[:head_dim].norm(dim=1) * attn.to_k.weight[:head_dim].norm(dim=1)
    rows = use.argsort()[:2].tolist()
    beta = (alpha * head_dim ** 0.5) ** 0.5  # attention divides q.k by sqrt(head_dim)
    for axis, row in enumerate(rows):
        attn.to_q.weight[row] = beta * position[:, axis]
        attn.to_k.weight[row] = beta * side[:, axis]
        for linear in (attn.to_q, attn.to_k):
            if linear.bias is not None:  # a biased projection would add terms outside the product
                linear.bias[row] = 0.0
    return rows


def seed_relation_attention(model: Path | str, data: Path | str, out: Path | str, captions: int = 6000,
                            n_scenes: int = 256, alpha: float = 30.0, min_r2: float = 0.5, seed: int = 0) -> list[str]:
    """Write to `out` the model folder `model` with the side term seeded into head 0 of every
    cross-attention layer whose position R^2 is at least `min_r2`. `data` is a shapes dataset with
    object records; `captions` of its rows fit the token-side probe, `n_scenes` scenes the position
    probes. Returns the report lines; bad input is a one-line ValueError and writes nothing."""
    metadata = Path(data) / "metadata.jsonl"
    if not metadata.is_file():
        raise ValueError(f"{metadata}: no such file (make the dataset with `ldm data shapes`)")
    torch.manual_seed(seed)  # before the model is built, whose init draws from it too
    try:
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{metadata}: not JSON lines ({e})") from None
    pipe = Pipeline.from_pretrained(model)
    object_keys = {"colour", "shape", "cx", "cy"}
    rows = [r for r in rows if isinstance(r, dict) and r.get("text")
            and all(isinstance(o, dict) and object_keys <= o.keys() for o in r.get("objects", ()))]
    if not any(len(r.get("objects", ())) == 2 for r in rows) or len(rows) < 7:
        raise ValueError(f"{metadata} has too few captioned rows with two-object records "
                         f"(each object needs {', '.join(sorted(object_keys))}); make it with `ldm data shapes`")
    random.Random(seed).shuffle(rows)
    n = min(captions, len(rows) * 6 // 7)
    side, accuracy = fit_token_sides(pipe, rows[:n], rows[n:n + n // 6], seed)
    report = [f"token side probe: sign right on {accuracy:.1%} of held-out object tokens"]
    for name, (position, r2) in fit_query_positions(pipe, n_scenes, POSITION_SCENES_SEED).items():
        attn = pipe.parts.unet.get_submodule(name)
        if r2 < min_r2:
            report.append(f"{name}: position R^2 {r2:.2f}, left as it is")
            continue
        rows_used = write_side_term(attn, position, side, alpha)
        report.append(f"{name}: position R^2 {r2:.2f}, side term written into head 0 rows {rows_used}")
    save_diffusers_folder(pipe.parts, out)
    return report
