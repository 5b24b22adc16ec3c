"""`ldm recipe default-model`: stage order, skipping what is done, resuming what was stopped."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.shapes import recipe
from ldm.shapes.recipe import DEFAULT_MODEL, run_recipe

LDM = str(Path(sys.executable).parent / "ldm")
NAMES = [s.name for s in DEFAULT_MODEL]


def test_stages_follow_the_cards_chain():
    """Every train stage reads what an earlier stage wrote, in the order MODEL_CARD.md lists them."""
    assert NAMES[0] == "data" and NAMES[-1] == "package" and len(set(NAMES)) == len(NAMES)
    written: set[str] = set()
    for stage in DEFAULT_MODEL:
        needs = [p for p in (stage.data, stage.model, stage.warm_start) if p]
        if stage.vae:  # a VAE folder, or a model folder's vae/
            needs.append(stage.vae if stage.vae in written else stage.vae.removesuffix("/vae"))
        assert all(p in written for p in needs), stage.name
        if stage.kind == "train":
            cfg = recipe.train_config(stage, Path("/r"), smoke=False)
            assert cfg.data.path == f"/r/{stage.data}", stage.name
            assert getattr(cfg, "warm_start", None) == (stage.warm_start and f"/r/{stage.warm_start}"), stage.name
        written.add(stage.out)
    trains = [s.config for s in DEFAULT_MODEL if s.kind == "train"]
    assert trains[-1] == "default_unet_edit_more.yaml"
    assert sorted(trains) == sorted(p.name for p in recipe.CONFIGS.glob("*.yaml"))  # each shipped config, once


def _fake_runners(calls: list):
    def run(stage, root, smoke, resume):
        calls.append((stage.name, resume))
        out = root / stage.out
        out.mkdir(parents=True, exist_ok=True)
        (out / recipe._output_file(stage)).write_text("{}")
        return "ok"
    return {kind: run for kind in recipe.RUNNERS}


def test_done_stages_skip_and_a_redone_stage_reruns_the_rest(tmp_path):
    calls: list = []
    lines: list[str] = []
    run_recipe("default-model", tmp_path, smoke=True, runners=_fake_runners(calls), log=lines.append)
    assert [c[0] for c in calls] == NAMES and not any(resume for _, resume in calls)
    assert lines[0].startswith(f"[1/{len(NAMES)}] data: running") and "ETA" in lines[0]

    calls.clear()
    lines.clear()
    run_recipe("default-model", tmp_path, smoke=True, runners=_fake_runners(calls), log=lines.append)
    assert calls == [] and sum("done, skipped" in line for line in lines) == len(NAMES)

    # a stage's completion deleted: it runs again (a train stage resumes its own checkpoints), and every
    # stage after it reruns from an empty folder, since its inputs changed
    i = NAMES.index("unet_aligned")
    (tmp_path / "state" / "unet_aligned.done").unlink()
    stale = tmp_path / "runs" / "unet_relation" / "leftover"
    stale.write_text("x")
    run_recipe("default-model", tmp_path, smoke=True, runners=_fake_runners(calls), log=lines.append)
    assert calls == [("unet_aligned", True)] + [(n, False) for n in NAMES[i + 1:]]
    assert not stale.exists()

    # a missing output makes its stage run again even with its marker in place; the full-size recipe
    # is another fingerprint, so it starts every stage afresh
    calls.clear()
    (tmp_path / "model" / "model_index.json").unlink()
    run_recipe("default-model", tmp_path, smoke=True, runners=_fake_runners(calls), log=lines.append)
    assert calls == [("package", False)]
    calls.clear()
    run_recipe("default-model", tmp_path, smoke=False, runners=_fake_runners(calls), log=lines.append)
    assert [c[0] for c in calls] == NAMES and not any(resume for _, resume in calls)


def test_bad_input_is_one_line(tmp_path, capsys):
    from ldm.cli import main

    with pytest.raises(ValueError, match="unknown recipe 'nope' \\(known: default-model\\)"):
        run_recipe("nope", tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        run_recipe("default-model", tmp_path / "f")
    assert main(["recipe", "nope", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: unknown recipe 'nope' (known: default-model)"]
    assert main(["recipe", "default-model", "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --out {tmp_path / 'f'} exists and is not a folder"]


def _ldm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # see conftest's one_thread
    done = subprocess.run([LDM, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_smoke_recipe_builds_a_model_that_generates_and_reruns_only_what_changed(tmp_path):
    out = tmp_path / "run"
    first = _ldm("recipe", "default-model", "--smoke", "--out", str(out))
    assert f"[{len(NAMES)}/{len(NAMES)}] package: done" in first.stdout
    assert (out / "model" / "text_encoder" / "packaged.json").is_file()
    _ldm("generate", "--model", str(out / "model"), "a red circle", "--steps", "2", "--out", str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    folders = [out / s.out for s in DEFAULT_MODEL] + [out / "state"]
    mtimes = {f: f.stat().st_mtime_ns for f in folders}
    again = _ldm("recipe", "default-model", "--smoke", "--out", str(out))
    assert again.stdout.count("done, skipped") == len(NAMES) and "running" not in again.stdout
    assert {f: f.stat().st_mtime_ns for f in folders} == mtimes

    (out / "state" / "unet_edit.done").unlink()
    third = _ldm("recipe", "default-model", "--smoke", "--out", str(out)).stdout
    i = NAMES.index("unet_edit")
    assert third.count("done, skipped") == i
    assert "unet_edit: resuming" in third and "unet_edit_more: running" in third and "package: running" in third
    assert all(mtimes[out / s.out] == (out / s.out).stat().st_mtime_ns for s in DEFAULT_MODEL[:i])
