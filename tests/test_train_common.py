"""Shared helpers for the training tests (imported by the other test_train_* files), plus the
command-line checks that need nothing but them.

Everything is tiny: 16 px shapes images, the tiny SD folder's VAE (factor 2) and CLIP text encoder,
and a 16/16-channel U-Net, so one optimizer step takes a few tens of milliseconds on one CPU core.
"""
from __future__ import annotations

import atexit
import copy
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_WORK = Path(tempfile.mkdtemp(prefix="ldm-train-tests-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)


@functools.cache
def tiny_sd() -> Path:
    from tiny import write_tiny_sd_folder

    return write_tiny_sd_folder(_WORK / "tiny-sd")


@functools.cache
def shapes(n: int = 16, resolution: int = 16) -> Path:
    from ldm.shapes.dataset import write_shapes_dataset

    return write_shapes_dataset(_WORK / f"shapes-{n}-{resolution}", n, seed=0, resolution=resolution, progress=False)


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def unet_stage(data_dir: Path | None = None, **sections) -> dict:
    """A from-scratch stage-2 config mapping over the tiny parts; `sections` are deep-merged in."""
    sd = tiny_sd()
    base = {
        "stage": "unet", "vae": str(sd), "text_encoder": {"kind": "clip", "path": str(sd)},
        "unet": {"block_out_channels": [16, 16], "attention_levels": [True, False], "layers_per_block": 1,
                 "cross_attention_dim": 32, "num_heads": 2, "norm_num_groups": 8},
        "data": {"path": str(data_dir or shapes()), "resolution": 16},
        "train": {"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "progress": False},
    }
    return merge(base, sections)


def vae_stage(data_dir: Path | None = None, **sections) -> dict:
    base = {
        "stage": "vae",
        "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4},
        "data": {"path": str(data_dir or shapes()), "resolution": 16},
        "train": {"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "progress": False},
        "scale_samples": 8, "validation_images": 4,
    }
    return merge(base, sections)


def run_training(mapping: dict, out: Path, resume: str | None = None, overrides: list[str] | None = None):
    from ldm.train.config import load_config
    from ldm.train.runner import train

    cfg = load_config(None, overrides or [], base=copy.deepcopy(mapping))
    return train(cfg, out, resume=resume)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # the CI box is small and shared: no thread oversubscription
    return env


def write_yaml(mapping: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(mapping))
    return path


def ldm_train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ldm.train.commands", *args]


def checkpoint_state(path: Path) -> dict[str, object]:
    """Every saved tensor of a checkpoint (weights, optimizer, scheduler, EMA) keyed by file and name."""
    from safetensors.torch import load_file

    out: dict[str, object] = {}
    for f in sorted(Path(path).iterdir()):
        if f.suffix == ".safetensors":
            out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
        elif f.name.startswith(("optimizer", "scheduler", "custom_checkpoint")):
            out[f.name] = torch.load(f, weights_only=False)
    return out


def assert_identical(a: object, b: object, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ (max abs {(a.float() - b.float()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# -- command-line behaviour ------------------------------------------------------------------------

def error_line(capsys) -> str:
    """The one `error:` line, with no traceback (import-time library chatter may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    from ldm.train.commands import main

    cfg = write_yaml(unet_stage(), tmp_path / "c.yaml")
    out = ["--output-dir", str(tmp_path / "o")]
    assert main(["train", str(cfg), *out, "--set", "train.bach_size=2"]) == 2
    assert "unknown config key 'train.bach_size'" in error_line(capsys)
    assert main(["train", str(cfg), *out, "--set", "nonsense"]) == 2
    assert "key=value" in error_line(capsys)
    assert main(["train", str(cfg), *out, "--max-steps", "0"]) == 2
    assert "--max-steps must be >= 1" in error_line(capsys)
    assert main(["train", str(write_yaml(unet_stage(tmp_path / "missing"), tmp_path / "d.yaml")), *out]) == 2
    assert "missing: no such dataset folder or file" in error_line(capsys)
    assert main(["train", str(tmp_path / "nope.yaml"), *out]) == 2
    assert "no such config file" in error_line(capsys)
    assert main(["finetune", "--model", str(tmp_path / "nomodel"), "--data", str(shapes()), *out]) == 2
    assert "no such model file or folder" in error_line(capsys)
    assert not (tmp_path / "o" / "checkpoints").exists()  # nothing was trained


def test_register_adds_train_and_finetune():
    import argparse

    from ldm.train.commands import cmd_finetune, cmd_recipe, cmd_train, register

    parser = argparse.ArgumentParser()
    handlers = register(parser.add_subparsers(dest="command"))
    assert handlers == {"train": cmd_train, "finetune": cmd_finetune, "recipe": cmd_recipe}
    args = parser.parse_args(["finetune", "--model", "m", "--data", "d", "--output-dir", "o", "--lora", "--rank", "8",
                              "--max-steps", "5", "--learning-rate", "0.001", "--batch-size", "3", "--resolution",
                              "32", "--resume", "latest"])
    assert (args.rank, args.max_steps, args.learning_rate, args.batch_size, args.resolution, args.resume) == \
        (8, 5, 0.001, 3, 32, "latest")
    with pytest.raises(SystemExit):
        parser.parse_args(["train"])  # the config file is required


def test_finetune_flags_override_config_file(tmp_path):
    import argparse

    from ldm.train.commands import finetune_config, register
    from ldm.train.config import load_config

    yaml_file = write_yaml({"train": {"max_steps": 7, "batch_size": 9}, "ema": {"enabled": True}}, tmp_path / "f.yaml")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--model", "m", "--data", "d", "--output-dir", "o", "--batch-size", "3",
                              "--config", str(yaml_file)])
    cfg = load_config(None, ["train.seed=5"], base=finetune_config(args))
    assert cfg.init_from == "m" and cfg.data.path == "d"
    assert cfg.train.batch_size == 3 and cfg.train.max_steps == 7 and cfg.train.seed == 5 and cfg.ema.enabled
    assert cfg.optim.learning_rate == 1e-5 and not cfg.lora.enabled and cfg.data.resolution is None
    bad = parser.parse_args(["finetune", "--model", "m", "--data", "d", "--output-dir", "o", "--rank", "0"])
    with pytest.raises(ValueError, match="--rank"):
        finetune_config(bad)


def test_text_encoder_num_layers_only_for_bert_family():
    from ldm.train.components import build_parts
    from ldm.train.config import load_config

    sd = tiny_sd()
    cfg = load_config(None, [], base=unet_stage(text_encoder={"kind": "clip", "path": str(sd), "num_layers": 1}))
    with pytest.raises(ValueError, match="num_layers applies to bert/minilm encoders, not clip"):
        build_parts(cfg, "x")
