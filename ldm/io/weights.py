"""Reading and writing weight files safely, and loading state dicts with every key and shape checked."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A weight file that cannot be used: corrupt, truncated, wrong layout or wrong shapes."""


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Returns (tensors, metadata). Truncated or corrupt files raise CheckpointError with one clear line."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return tensors, metadata


def read_pickle_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Pickle checkpoints can run arbitrary code, so they load only on explicit opt-in, and then only
    through torch's restricted unpickler (weights_only=True), which refuses code objects."""
    if not allow_pickle:
        raise CheckpointError(f"{path}: pickle checkpoints can execute code; convert it to .safetensors, "
                              "or pass --allow-pickle if you trust its source")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: refused or unreadable pickle ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return read_pickle_checkpoint(path, allow_pickle)
    raise CheckpointError(f"{path}: unknown weight file type '{path.suffix}' (expected .safetensors, or .ckpt with --allow-pickle)")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic: written next to the target and renamed, so a crash never leaves a half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """Written next to the target and renamed, so a reader never sees half a file; readable by all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], what: str,
                            assign: bool = False) -> None:
    """Copies `state` into `module`, requiring exactly the same keys and shapes.

    The first problem is reported with the key and both shapes, which is what a user needs to see
    when a checkpoint belongs to a different architecture.
    """
    expected = module.state_dict()
    for key, tensor in state.items():
        if key not in expected:
            raise CheckpointError(f"{what}: unexpected key '{key}' {tuple(tensor.shape)} (unknown layout or architecture)")
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{what}: shape mismatch for '{key}': model has {tuple(expected[key].shape)}, "
                                  f"checkpoint has {tuple(tensor.shape)}")
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{what}: missing key '{missing[0]}'{more}")
    module.load_state_dict(state, strict=True, assign=assign)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces (A1111's model and LoRA hashes are prefixes of it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_option(given: Path | str | None, env_var: str, what: str) -> Path | None:
    """A folder option: the one given, else the environment variable's, else None; it must exist."""
    folder = given if given is not None else os.environ.get(env_var) or None
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: the {what} folder does not exist")
    return folder
