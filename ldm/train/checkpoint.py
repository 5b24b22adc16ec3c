"""Atomic training checkpoints: written into a hidden temp folder, renamed into place, last N kept.

A folder named `step-XXXXXXXX` is only ever created by a rename of a finished temp folder, and old
checkpoints are renamed away before they are deleted, so a kill at any moment (even mid-save or
mid-prune) leaves every visible checkpoint complete. accelerate's save_state does the writing, which
handles DDP, FSDP and DeepSpeed state the same way; our `training_state.json` is written last.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ldm.io.weights import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """`None`: fresh run; "latest": the newest checkpoint in output_dir, or a fresh run if there is none
    (so a preemptible job can always pass --resume latest); otherwise a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("no checkpoint in %s yet: starting a new run", checkpoints_dir(output_dir))
        return path
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    return path


def read_training_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE_FILE} ({e})") from None


def _fsync_tree(folder: Path) -> None:
    # rename is atomic against kills already; the fsyncs make it hold across a power cut as well
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Rename first, delete after: a half-deleted folder never keeps a checkpoint's name."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(output_dir: Path) -> None:
    """Temp and trash folders left by a run that was killed while saving or pruning."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Collective: every process must call it (each writes its own RNG state file)."""
    root = checkpoints_dir(output_dir)
    name = f"step-{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # e.g. resumed from an older checkpoint and reached this step again
            _discard(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            _discard(old)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restores models, optimizers, schedulers, registered objects and RNG states; returns the
    training state (step, micro-step, counters) written with it."""
    state = read_training_state(path)
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot restore this checkpoint ({str(e).splitlines()[0]})") from None
    return state
