"""Stage-2 training end to end, and the fault-tolerance promises: exact resume (bit for bit on CPU),
SIGTERM -> checkpoint + exit 0, kill -9 at any moment leaves a loadable checkpoint, bad data and
non-finite losses handled loudly."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from test_train_common import (assert_identical, checkpoint_state, ldm_train_cmd, run_training, shapes, subprocess_env,
                               unet_stage, write_yaml)


pytestmark = pytest.mark.usefixtures("one_thread")


# every optional piece switched on, so that each of them is covered by the exactness check
FULL = dict(
    data={"random_flip": True, "center_crop": False, "caption_dropout": 0.3, "num_workers": 1},
    train={"gradient_accumulation_steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2},
    optim={"warmup_steps": 2, "decay": "cosine", "decay_steps": 6},
    ema={"enabled": True, "decay": 0.9},
    diffusion={"min_snr_gamma": 5.0, "noise_offset": 0.05},
    schedule={"prediction_type": "v_prediction"},
)


def final_checkpoint(out):
    return checkpoint_state(sorted((out / "checkpoints").iterdir())[-1])


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_resume_is_exact(tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more: weights, optimizer, LR schedule and EMA
    identical bit for bit. 16 images / (2 x 2 accumulation) = 4 steps per epoch, so the stop lands
    mid-epoch and the resumed part crosses an epoch boundary."""
    cfg = unet_stage(**FULL)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_training(cfg, straight, overrides=["train.max_steps=6"])
    first = run_training(cfg, split, overrides=["train.max_steps=3"])
    assert first.progress.step == 3 and first.progress.micro == 6 and not first.stopped
    second = run_training(cfg, split, resume=str(split / "checkpoints" / "step-00000003"),
                          overrides=["train.max_steps=6"])
    assert second.progress.step == 6 and second.progress.micro == 12
    a, b = final_checkpoint(straight), final_checkpoint(split)
    assert any(k.startswith("custom_checkpoint") for k in a)  # the EMA is part of what is compared
    assert_identical(a, b)
    assert losses(straight) == losses(split)  # the log of the split run continues where it stopped
    # keep_checkpoints=2: only the two newest remain, and the final model folder is written
    assert [p.name for p in sorted((split / "checkpoints").iterdir())] == ["step-00000005", "step-00000006"]
    assert (split / "model_index.json").is_file()


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path, caplog):
    cfg = unet_stage(train={"max_steps": 1})
    run_training(cfg, tmp_path)
    with caplog.at_level("WARNING"):
        run_training(cfg, tmp_path, resume="latest", overrides=["train.max_steps=2", "optim.learning_rate=0.001"])
    assert "changed config: optim.learning_rate: 0.0001 -> 0.001" in caplog.text
    with pytest.raises(ValueError, match="--resume latest"):
        run_training(cfg, tmp_path)
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        run_training(cfg, tmp_path, resume=str(tmp_path / "nope"))


def test_trained_folder_generates_and_converts(tmp_path):
    from ldm.cli import main as ldm_main
    from ldm.io.model_files import load_model
    from ldm.pipeline import Pipeline

    out = tmp_path / "model"
    cfg = unet_stage(validation={"prompts": ["a red circle", "a blue square"], "steps": 2},
                     train={"max_steps": 2, "validation_every": 1})
    run_training(cfg, out)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000001.png", "step-00000002.png"]
    parts = load_model(out)
    assert parts.unet.config.sample_size == 8 and parts.unet.config.block_out_channels == [16, 16]
    image = Pipeline(parts)("a red circle", num_inference_steps=2, seed=0, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and 0.0 <= image.min() <= image.max() <= 1.0
    assert ldm_main(["convert", str(out), str(tmp_path / "model.safetensors")]) == 0
    again = load_model(tmp_path / "model.safetensors")
    for k, v in parts.unet.state_dict().items():
        assert torch.equal(v, again.unet.state_dict()[k]), k
    # and diffusers itself reads the folder
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    theirs = pipe.unet.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in parts.unet.state_dict().items())


def test_mixed_precision_and_gradient_checkpointing(tmp_path, monkeypatch):
    import ldm.models.unet

    calls = []
    real = ldm.models.unet.checkpoint
    monkeypatch.setattr(ldm.models.unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = unet_stage(train={"max_steps": 2, "mixed_precision": "bf16", "gradient_checkpointing": True,
                            "gradient_accumulation_steps": 2})
    result = run_training(cfg, tmp_path / "bf16")
    assert result.progress.step == 2 and calls  # the U-Net blocks ran through torch.utils.checkpoint
    log = [json.loads(line) for line in (tmp_path / "bf16" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < r["loss"] < 10 for r in log)
    state = final_checkpoint(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith("model"))  # fp32 master weights
    # a second run in the same process may change the precision (accelerate's state is reset)
    run_training(unet_stage(train={"max_steps": 1}), tmp_path / "fp32")


def test_bad_images_during_training_are_skipped_and_counted(tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes(), data)
    # verify_images=false: the scan does not open images, so the loader meets the broken files
    (data / "000003.png").write_bytes(b"not a png")
    (data / "000007.png").write_bytes((shapes() / "000007.png").read_bytes()[:30])
    cfg = unet_stage(data, data={"verify_images": False}, train={"max_steps": 8})
    result = run_training(cfg, tmp_path / "out")
    assert result.progress.step == 8
    # 8 steps x 2 = one epoch: each broken file is met exactly once
    assert result.progress.bad_images == 2
    assert json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[-1])["bad_images"] == 2


def test_nonfinite_loss_error_names_the_step(tmp_path, monkeypatch):
    from ldm.train import stage_unet
    from ldm.train.loop import TrainingError

    real = stage_unet.UNetStage.loss

    def loss_nan_at_step_3(self, batch, draws, step):
        loss, logs = real(self, batch, draws, step)
        return (loss * float("nan") if step == 2 else loss), logs

    monkeypatch.setattr(stage_unet.UNetStage, "loss", loss_nan_at_step_3)
    with pytest.raises(TrainingError, match="non-finite loss at step 3"):
        run_training(unet_stage(train={"max_steps": 5}), tmp_path / "error")
    result = run_training(unet_stage(train={"max_steps": 5, "nan_policy": "skip"}), tmp_path / "skip")
    assert result.progress.step == 5 and result.progress.skipped_steps == 1
    state = final_checkpoint(tmp_path / "skip")
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("model"))
    # the optimizer took 4 steps, not 5: the bad step's update was dropped, not applied
    assert {int(s["step"]) for s in state["optimizer.bin"]["state"].values()} == {4}


def _tail_until(proc, needle: str, lines: list[str]) -> None:
    for line in proc.stderr:
        lines.append(line)
        if needle in line:
            return
    raise AssertionError("training ended before printing " + needle + ":\n" + "".join(lines[-20:]))


@pytest.mark.slow
def test_sigterm_saves_checkpoint_exits_0_and_resumes_exactly(tmp_path):
    """SIGTERM lands at a random step; the run finishes that step, saves, exits 0; resuming to 8
    steps gives bit for bit what 8 uninterrupted steps give."""
    cfg = unet_stage(train={"max_steps": 100000, "checkpoint_every": 1000, "keep_checkpoints": 1},
                     data={"caption_dropout": 0.2}, ema={"enabled": True})
    out = tmp_path / "run"
    proc = subprocess.Popen(ldm_train_cmd("train", str(write_yaml(cfg, tmp_path / "c.yaml")), "--output-dir", str(out)),
                            env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        _tail_until(proc, f"step {random.Random(0).randint(2, 4)}/", lines)
        proc.send_signal(signal.SIGTERM)
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=120) == 0, "".join(lines)
    finally:
        proc.kill()
    text = "".join(lines)
    assert "received SIGTERM" in text and "stopped at step" in text
    ckpts = sorted((out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not (out / "model_index.json").exists()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 2 <= stopped_at < 8
    run_training(cfg, out, resume="latest", overrides=["train.max_steps=8"])
    run_training(cfg, tmp_path / "straight", overrides=["train.max_steps=8"])
    assert_identical(final_checkpoint(out), final_checkpoint(tmp_path / "straight"))


KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import ldm.train.checkpoint as ck
    point, at_step = sys.argv[1], int(sys.argv[2])
    saves = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-write":  # some of the checkpoint's files written, others not
        import accelerate.checkpointing as acc
        real_save = acc.save

        def save(obj, path, *a, **k):
            if "optimizer" in str(path) and f"step-{at_step:08d}" in str(path):
                die()
            return real_save(obj, path, *a, **k)
        acc.save = save
    elif point == "before-rename":  # every file written and synced, not yet renamed into place
        real_fsync = ck._fsync_tree

        def fsync_tree(folder):
            real_fsync(folder)
            if f"step-{at_step:08d}" in folder.name:
                die()
        ck._fsync_tree = fsync_tree
    elif point == "mid-prune":  # an old checkpoint renamed away, not yet deleted
        real_rmtree = ck.shutil.rmtree

        def rmtree(path, *a, **k):
            if f".trash-step-{at_step - 2:08d}" in str(path) and os.path.exists(path):
                die()
            return real_rmtree(path, *a, **k)
        ck.shutil.rmtree = rmtree
    from ldm.train.commands import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["mid-write", "before-rename", "mid-prune"])
def test_kill_9_while_saving_leaves_newest_complete_checkpoint(tmp_path, point):
    from ldm.train.checkpoint import latest_checkpoint

    cfg = unet_stage(train={"max_steps": 6, "checkpoint_every": 1, "keep_checkpoints": 2})
    out = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    proc = subprocess.run([sys.executable, str(driver), point, "4", "train", str(write_yaml(cfg, tmp_path / "c.yaml")),
                           "--output-dir", str(out)], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    expect_latest = 4 if point == "mid-prune" else 3
    assert latest_checkpoint(out).name == f"step-{expect_latest:08d}", names
    assert any(n.startswith((".tmp-", ".trash-")) for n in names), names  # the kill really hit mid-save
    # the newest checkpoint loads into a fresh run, and resuming finishes the job
    result = run_training(cfg, out, resume="latest")
    assert result.progress.step == 6
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in (out / "checkpoints").iterdir())
    state = json.loads((latest_checkpoint(out) / "training_state.json").read_text())
    assert state["progress"]["step"] == 6


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_matches_uninterrupted(tmp_path):
    """Two kill -9s at seeded-random points (a checkpoint is saved after every step, so a kill often
    lands inside a save); each time the newest checkpoint is complete, and the resumed run ends bit
    for bit where an uninterrupted one does."""
    from ldm.train.checkpoint import latest_checkpoint

    cfg = unet_stage(train={"max_steps": 100000, "checkpoint_every": 1, "keep_checkpoints": 2})
    out, config = tmp_path / "run", write_yaml(cfg, tmp_path / "c.yaml")
    rng = random.Random(1)
    for round_ in range(2):
        args = ["train", str(config), "--output-dir", str(out)] + (["--resume", "latest"] if round_ else [])
        proc = subprocess.Popen(ldm_train_cmd(*args), env=subprocess_env(), stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True)
        lines: list[str] = []
        try:
            _tail_until(proc, f"step {3 * round_ + rng.randint(2, 3)}/", lines)
            proc.kill()
        finally:
            proc.kill()
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert latest_checkpoint(out) is not None
    run_training(cfg, out, resume="latest", overrides=["train.max_steps=9"])
    run_training(cfg, tmp_path / "straight", overrides=["train.max_steps=9"])
    assert_identical(final_checkpoint(out), final_checkpoint(tmp_path / "straight"))


def test_tensorboard_tracker_gets_the_step_scalars(tmp_path):
    pytest.importorskip("tensorboard")  # in the `test` extra; optional for users
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_training(unet_stage(train={"max_steps": 3, "log_with": "tensorboard"}), tmp_path)
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    log = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx(log, rel=1e-6)
