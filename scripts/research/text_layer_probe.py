"""Which layer of the default text encoder (all-MiniLM-L6-v2) lets one cross-attention head read
which colour goes with which shape?

For two-object captions in the shapes dataset's canonical form ("a red circle to the left of a blue
square"), a probe asks for "the object on the left/right/top/bottom". The probe is one learned query
per side, one attention head over the token states of layer L (with the padding masked), and a
linear read-out of that object's colour and shape. It is trained on captions made only of the
training colour-shape pairs. It is then scored on fresh captions of the same kind, and on captions
that use the held-out pairs (purple triangle, orange circle, green square, white triangle). That is
the situation the U-Net's cross-attention is in. This measurement chose the conditioning layer of
configs/default_unet_layer3.yaml.

    .venv/bin/python scripts/research/text_layer_probe.py          # ~2 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F
from torch import nn

from ldm.shapes.dataset import COLOURS, HELD_OUT, SHAPES
from ldm.text.bert import load_minilm

RELATIONS = {"to the left of": ("left", "right"), "to the right of": ("right", "left"),
             "above": ("top", "bottom"), "below": ("bottom", "top")}
SIDES = ["left", "right", "top", "bottom"]


def caption(rng: random.Random, held_out: bool) -> tuple[str, list[tuple[int, int, int]]]:
    """A two-object caption with (side, colour, shape) indices for both objects; `held_out` asks for
    at least one held-out pair, otherwise none."""
    colours = list(COLOURS)
    while True:
        c1, c2 = rng.sample(colours, 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        if held_out == bool({(c1, s1), (c2, s2)} & set(HELD_OUT)):
            break
    relation = rng.choice(list(RELATIONS))
    a, b = RELATIONS[relation]
    objects = [(SIDES.index(a), colours.index(c1), SHAPES.index(s1)),
               (SIDES.index(b), colours.index(c2), SHAPES.index(s2))]
    return f"a {c1} {s1} {relation} a {c2} {s2}", objects


class AttentionProbe(nn.Module):
    def __init__(self, dim: int, n_colours: int, n_shapes: int, width: int = 64) -> None:
        super().__init__()
        self.query = nn.Embedding(len(SIDES), width)
        self.key, self.value = nn.Linear(dim, width), nn.Linear(dim, width)
        self.colour, self.shape = nn.Linear(width, n_colours), nn.Linear(width, n_shapes)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, side: torch.Tensor):
        scores = self.query(side)[:, None] @ self.key(states).transpose(1, 2) / self.key.out_features ** 0.5
        weights = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        read = (weights @ self.value(states))[:, 0]
        return self.colour(read), self.shape(read)


def encode_all_layers(encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[layers + 1, N, tokens, D] hidden states (0 = embeddings) and the [N, tokens] attention mask."""
    states, masks = [], []
    for i in range(0, len(captions), 250):
        batch = encoder.tokenizer(captions[i:i + 250], padding="max_length", max_length=encoder.max_length,
                                  truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = encoder.model(**batch, output_hidden_states=True)
        states.append(torch.stack(out.hidden_states))
        masks.append(batch.attention_mask.bool())
    return torch.cat(states, 1), torch.cat(masks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=6000, help="training captions")
    ap.add_argument("--test", type=int, default=1000, help="captions per test set")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    sets = {"train": [caption(rng, False) for _ in range(args.train)],
            "test": [caption(rng, False) for _ in range(args.test)],
            "held_out": [caption(rng, True) for _ in range(args.test)]}
    encoder = load_minilm()
    data = {}
    for name, items in sets.items():
        states, mask = encode_all_layers(encoder, [c for c, _ in items])
        targets = torch.tensor([obj for _, objects in items for obj in objects])  # two rows per caption
        data[name] = (states.repeat_interleave(2, dim=1), mask.repeat_interleave(2, dim=0), targets)
    results = {}
    print("| layer | test objects right | held-out-pair objects right |\n|---|---|---|")
    for layer in range(data["train"][0].shape[0]):
        probe = AttentionProbe(encoder.hidden_size, len(COLOURS), len(SHAPES))
        opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
        states, mask, targets = data["train"]
        for _ in range(args.steps):
            idx = torch.randint(0, len(targets), (256,))
            colour, shape = probe(states[layer, idx], mask[idx], targets[idx, 0])
            loss = F.cross_entropy(colour, targets[idx, 1]) + F.cross_entropy(shape, targets[idx, 2])
            opt.zero_grad()
            loss.backward()
            opt.step()
        scores = []
        for name in ("test", "held_out"):
            states_, mask_, targets_ = data[name]
            with torch.no_grad():
                colour, shape = probe(states_[layer], mask_, targets_[:, 0])
            right = (colour.argmax(1) == targets_[:, 1]) & (shape.argmax(1) == targets_[:, 2])
            scores.append(right.float().mean().item())
        results[layer] = dict(zip(("test", "held_out"), scores))
        print(f"| {layer} | {scores[0]:.3f} | {scores[1]:.3f} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
