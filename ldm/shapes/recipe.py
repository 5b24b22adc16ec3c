"""`ldm recipe default-model`: the default model rebuilt by one command, stage by stage.

The stages are the ones MODEL_CARD.md's "Training (reproduce)" lists: the data, the VAE, each shipped
U-Net stage (configs/default_*.yaml) wired to its predecessor's output, the two weight-rewriting steps
(`ldm.shapes.align_vae`, `ldm.shapes.seed_relation`) and packaging. Each writes one folder under DIR.

A stage counts as done when DIR/state/NAME.done exists (written atomically once the stage returns),
its fingerprint (the resolved config or parameters) matches, it names the same run of the stage
before it, and the stage's output file is there. So a rerun skips what is done, and a stage that
runs again makes every later one run again. A train stage whose DIR/state/NAME.started matches
resumes from its latest checkpoint; any other stage that must run starts from an empty folder.

`--smoke` applies `SMOKE` (a handful of steps, tiny data and probe counts) to the same stages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.io.weights import write_text_atomic

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STATE = "state"


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # data | train | align | seed | package
    out: str  # its folder, relative to DIR
    historic_s: float  # wall time of the full-size stage as measured (MODEL_CARD.md), for the ETA
    config: str | None = None  # train: the file under configs/
    data: str | None = None  # the dataset folder it reads, relative to DIR
    vae: str | None = None  # train: the VAE folder
    warm_start: str | None = None  # train: the model whose U-Net it continues
    model: str | None = None  # align/seed/package: the model folder it rewrites
    params: dict[str, Any] = field(default_factory=dict)  # data/align/seed: the function's arguments


def _unet(name: str, config: str, historic_s: float, vae: str, warm_start: str,
          data: str = "data/shapes") -> Stage:
    return Stage(name, "train", f"runs/{name}", historic_s, config, data, vae, warm_start)


# wall times: the card's stage table, steps only where it names pauses for probes or other jobs
DEFAULT_MODEL = (
    Stage("data", "data", "data/shapes", 20, params={"n": 20000, "seed": 0}),
    Stage("vae", "train", "runs/vae", 1435, "default_vae.yaml", "data/shapes"),
    Stage("unet", "train", "runs/unet", 3034, "default_unet.yaml", "data/shapes", "runs/vae"),
    _unet("unet_refine", "default_unet_refine.yaml", 3722, "runs/vae", "runs/unet"),
    _unet("unet_layer3", "default_unet_layer3.yaml", 4481, "runs/vae", "runs/unet_refine"),
    _unet("unet_debiased", "default_unet_debiased.yaml", 4860, "runs/vae", "runs/unet_layer3"),
    Stage("align_vae", "align", "runs/aligned_init", 30, data="data/shapes", model="runs/unet_debiased",
          params={"stretch": 4.0, "samples": 512}),
    _unet("unet_aligned", "default_unet_aligned.yaml", 3900, "runs/aligned_init/vae", "runs/aligned_init"),
    Stage("seed_relation", "seed", "runs/relation_init", 120, data="data/shapes", model="runs/unet_aligned",
          params={"captions": 6000, "n_scenes": 256, "alpha": 30.0, "min_r2": 0.5, "seed": 0}),
    _unet("unet_relation", "default_unet_relation.yaml", 2460, "runs/relation_init/vae", "runs/relation_init"),
    _unet("unet_relation_more", "default_unet_relation_more.yaml", 1860, "runs/unet_relation/vae",
          "runs/unet_relation"),
    Stage("data_edit", "data", "data/shapes_edit", 24, params={"n": 20000, "seed": 0, "edit_pairs": 4000}),
    _unet("unet_edit", "default_unet_edit.yaml", 1260, "runs/unet_relation_more/vae", "runs/unet_relation_more",
          "data/shapes_edit"),
    _unet("unet_edit_more", "default_unet_edit_more.yaml", 1560, "runs/unet_edit/vae", "runs/unet_edit",
          "data/shapes_edit"),
    Stage("package", "package", "model", 5, model="runs/unet_edit_more"),
)
RECIPES = {"default-model": DEFAULT_MODEL}

# --smoke: the whole chain in seconds. Parameters replace a stage's own; `--set` overrides go on top
# of every train stage's config (by its `stage:` kind).
SMOKE: dict[str, Any] = {
    "data": {"n": 48},
    "data_edit": {"n": 48, "edit_pairs": 8},
    "align": {"samples": 16},
    "seed": {"captions": 40, "n_scenes": 4},
    "train": ["train.max_steps=2", "train.batch_size=4", "train.validation_every=0", "train.progress=false",
              "optim.warmup_steps=0"],
    "train.vae": ["scale_samples=16", "validation_images=2"],
    "train.unet": ["validation.prompts=[]", "unet.block_out_channels=[32,32,32]"],
}
MIN_STAGE_S = 3.0  # start-up of any stage (imports, MiniLM, saving): the floor of its estimate


def _params(stage: Stage, smoke: bool) -> dict[str, Any]:
    if not smoke:
        return dict(stage.params)
    return {**stage.params, **SMOKE.get(stage.name, SMOKE.get(stage.kind, {}))}


def train_config(stage: Stage, root: Path | None, smoke: bool):
    """The stage's config with its inputs wired to the folders under `root` (None: as relative paths)."""
    from ldm.train.config import UNetStageConfig, load_config
    from ldm.train.config_io import read_config

    def at(rel: str | None) -> str | None:
        return rel if rel is None or root is None else str(root / rel)

    overrides: list[str] = []
    if smoke:
        kind = read_config(CONFIGS / stage.config).get("stage", "unet")
        overrides = [*SMOKE["train"], *SMOKE[f"train.{kind}"]]
    cfg = load_config(CONFIGS / stage.config, overrides)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=at(stage.data)))
    if isinstance(cfg, UNetStageConfig):
        cfg = dataclasses.replace(cfg, vae=at(stage.vae), warm_start=at(stage.warm_start))
    return cfg


def fingerprint(stage: Stage, smoke: bool) -> str:
    """What the stage computes from its inputs: the resolved config, or the function's parameters."""
    from ldm.train.config_io import to_dict

    what: dict[str, Any] = {"kind": stage.kind, "data": stage.data, "model": stage.model}
    if stage.kind == "train":
        what["config"] = to_dict(train_config(stage, None, smoke))
    else:
        what["params"] = _params(stage, smoke)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _output_file(stage: Stage) -> str:
    """The file that shows a stage's folder holds its finished output."""
    if stage.kind == "data":
        return "metadata.jsonl"
    if stage.kind == "train" and stage.vae is None:  # the VAE stage writes a VAE folder
        return "config.json"
    return "model_index.json"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(path: Path, marker: dict[str, Any]) -> None:
    # atomic: a killed run leaves the old marker or the new one, never half of one
    write_text_atomic(path, json.dumps(marker) + "\n")


# ---- the stages' work -------------------------------------------------------------------------------

def _run_data(stage: Stage, root: Path, smoke: bool, resume: bool) -> str:
    from ldm.shapes.dataset import write_shapes_dataset

    p = _params(stage, smoke)
    write_shapes_dataset(root / stage.out, p["n"], seed=p["seed"], progress=not smoke,
                         edit_pairs=p.get("edit_pairs", 0))
    return f"{p['n']} images" + (f" + {p['edit_pairs']} edit pairs" if p.get("edit_pairs") else "")


def _run_train(stage: Stage, root: Path, smoke: bool, resume: bool) -> str:
    from ldm.train.runner import train

    cfg = train_config(stage, root, smoke)
    result = train(cfg, root / stage.out, resume="latest" if resume else None)
    if result.stopped:
        print(f"{stage.name}: stopped at step {result.progress.step}; run the same command again to resume")
        raise KeyboardInterrupt
    return f"{cfg.train.max_steps} steps x {cfg.train.batch_size}"


def _run_align(stage: Stage, root: Path, smoke: bool, resume: bool) -> str:
    from ldm.shapes.align_vae import align_vae_colours

    return align_vae_colours(root / stage.model, root / stage.data, root / stage.out, **_params(stage, smoke))


def _run_seed(stage: Stage, root: Path, smoke: bool, resume: bool) -> str:
    from ldm.shapes.seed_relation import seed_relation_attention

    report = seed_relation_attention(root / stage.model, root / stage.data, root / stage.out, **_params(stage, smoke))
    written = sum("written" in line for line in report)
    return f"{report[0]}; side term written into {written} of {len(report) - 1} cross-attention layers"


def _run_package(stage: Stage, root: Path, smoke: bool, resume: bool) -> str:
    from ldm.shapes.package import package_model

    return f"{package_model(root / stage.model, root / stage.out) / 2**20:.1f} MiB"


Runner = Callable[[Stage, Path, bool, bool], str]
RUNNERS: dict[str, Runner] = {"data": _run_data, "train": _run_train, "align": _run_align, "seed": _run_seed,
                              "package": _run_package}


# ---- the driver ---------------------------------------------------------------------------------------

def _work(stage: Stage, smoke: bool) -> tuple[float, float]:
    """(this run's work, the historic run's work) in the units the stage's time scales with."""
    if stage.kind == "train":
        full, this = train_config(stage, None, False).train, train_config(stage, None, smoke).train
        return this.max_steps * this.batch_size, full.max_steps * full.batch_size
    if stage.kind == "data":
        full, this = _params(stage, False), _params(stage, smoke)
        return this["n"] + this.get("edit_pairs", 0), full["n"] + full.get("edit_pairs", 0)
    return (0.02, 1.0) if smoke else (1.0, 1.0)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def run_recipe(name: str, out: Path | str, smoke: bool = False, runners: dict[str, Runner] | None = None,
               log: Callable[[str], None] = print) -> Path:
    """Run recipe `name` into `out`, skipping the stages already done; returns `out`/model.

    The ETA is the card's measured wall time of each remaining stage (at least MIN_STAGE_S), scaled by
    this run's steps x batch (or images) against that run's, and by how fast this run's stages went
    against the same estimate so far."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    stages, runners = RECIPES[name], {**RUNNERS, **(runners or {})}
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    state = root / STATE
    estimates = [max(MIN_STAGE_S, historic * this / full) for historic, (this, full) in
                 ((s.historic_s, _work(s, smoke)) for s in stages)]
    measured = predicted = 0.0  # over the stages run so far: how this machine compares with the card's
    previous = ""  # the run id of the stage before; a stage done after another run of it is stale
    for i, stage in enumerate(stages):
        head = f"[{i + 1}/{len(stages)}] {stage.name}"
        spec = fingerprint(stage, smoke)
        done = _read_marker(state / f"{stage.name}.done")
        if (done is not None and done.get("spec") == spec and done.get("after") == previous
                and (root / stage.out / _output_file(stage)).is_file()):
            log(f"{head}: done, skipped ({root / stage.out})")
            previous = done["id"]
            continue
        started = _read_marker(state / f"{stage.name}.started")
        resume = stage.kind == "train" and started == {"spec": spec, "after": previous}
        (state / f"{stage.name}.done").unlink(missing_ok=True)
        if not resume and (root / stage.out).exists():
            shutil.rmtree(root / stage.out)  # a partial or stale output: start this stage afresh
        _write_marker(state / f"{stage.name}.started", {"spec": spec, "after": previous})
        speed = (measured + 30.0) / (predicted + 30.0)  # 30 s of prior belief in the card's speed
        what = f"configs/{stage.config}" if stage.config else stage.kind
        log(f"{head}: {'resuming' if resume else 'running'} {what} -> {root / stage.out} (ETA this stage "
            f"{_duration(estimates[i] * speed)}, all left {_duration(sum(estimates[i:]) * speed)})")
        t0 = time.monotonic()
        summary = runners[stage.kind](stage, root, smoke, resume)
        elapsed = time.monotonic() - t0
        measured, predicted = measured + elapsed, predicted + estimates[i]
        run_id = uuid.uuid4().hex
        _write_marker(state / f"{stage.name}.done", {"spec": spec, "after": previous, "id": run_id,
                                                     "seconds": round(elapsed, 1)})
        previous = run_id
        log(f"{head}: done in {_duration(elapsed)}: {summary}")
    log(f"model: {root / stages[-1].out}")
    return root / stages[-1].out
