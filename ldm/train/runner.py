"""One training run: accelerator, data, the stage the config names, the loop. The same code runs in a
plain process, under `accelerate launch` and under `torchrun` (accelerate reads their environment)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from ldm.train.checkpoint import list_checkpoints, resolve_resume
from ldm.train.config import StageConfig, UNetStageConfig, VAEStageConfig
from ldm.train.config_io import to_dict
from ldm.train.data import CaptionDataset, scan_records
from ldm.train.loop import LoopResult, run_loop
from ldm.train.stage_unet import UNetStage
from ldm.train.stage_vae import VAEStage

logger = logging.getLogger(__name__)


def make_accelerator(cfg: StageConfig, output_dir: Path) -> Accelerator:
    t = cfg.train
    tracker = None if t.log_with == "none" else t.log_with
    if tracker == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("train.log_with=tensorboard needs the tensorboard package "
                             "(pip install tensorboard)") from None
    # Under torchrun on a machine without GPUs, accelerate sets up gloo only when told to use the CPU;
    # without this each process would silently train alone.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu_processes = distributed and not torch.cuda.is_available()
    if not distributed:
        # accelerate keeps its settings in a process-wide singleton and refuses a second run with another
        # mixed_precision; a single process has no process group to lose, so start from a clean state
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        cpu=cpu_processes, mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=tracker, project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                              logging_dir=str(Path(output_dir) / "logs")),
        # we step the LR schedule once per optimizer step ourselves; accelerate would step it once per process
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def _configure_logging(accelerator: Accelerator) -> None:
    # step lines are INFO; the `ldm` CLI sets WARNING for everything else. Other ranks only warn.
    logging.getLogger("ldm.train").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)


def _check_distributed(cfg: StageConfig, accelerator: Accelerator) -> None:
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and cfg.ema.enabled:
        raise ValueError("ema.enabled is not supported with FSDP (the EMA would average parameter shards); "
                         "use DDP or DeepSpeed ZeRO-2")
    if sharded and cfg.train.validation_every and isinstance(cfg, UNetStageConfig) and cfg.validation.prompts:
        raise ValueError("validation grids during training are not supported with FSDP; set train.validation_every=0")


def train(cfg: StageConfig, output_dir: Path | str, resume: str | None = None) -> LoopResult:
    """Train per `cfg` into `output_dir`; `resume`: None, "latest" or a checkpoint folder."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} exists and is not a folder")
    resume_path = resolve_resume(output_dir, resume)
    if resume_path is None and list_checkpoints(output_dir):
        raise ValueError(f"{output_dir} already holds checkpoints of a run: pass --resume latest to continue it, "
                         "or choose another --output-dir")
    # the data is checked before any model is loaded: a bad dataset fails in seconds
    records, _ = scan_records(cfg.data, need_captions=isinstance(cfg, UNetStageConfig))
    accelerator = make_accelerator(cfg, output_dir)
    _configure_logging(accelerator)
    _check_distributed(cfg, accelerator)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)  # model initialisation: the same weights on every rank and every run
    logger.info("%d usable images; %d process(es) x batch %d x accumulation %d", len(records),
                accelerator.num_processes, cfg.train.batch_size, cfg.train.gradient_accumulation_steps)
    cache = isinstance(cfg, UNetStageConfig) and cfg.cache_latents
    dataset = CaptionDataset(records, cfg.data, cfg.train.seed, load_pixels=not cache)
    if isinstance(cfg, VAEStageConfig):
        stage = VAEStage(cfg, accelerator, output_dir, dataset)
    else:
        stage = UNetStage(cfg, accelerator, output_dir, dataset)
    config_dict = to_dict(cfg)
    if cfg.train.log_with != "none":
        accelerator.init_trackers("ldm", config=_flat(config_dict))
    try:
        return run_loop(stage, accelerator, cfg.train, dataset, output_dir, max_grad_norm=cfg.optim.max_grad_norm,
                        resume=resume_path, config_dict=config_dict)
    finally:
        accelerator.end_training()


def _flat(d: dict, prefix: str = "") -> dict:
    """Trackers take scalar hyper-parameters only."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
