"""The training loop shared by both stages: accumulation, clipping, NaN policy, stop requests,
atomic checkpoints, logging. What is trained and how the loss is computed belongs to the stage."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ldm.train.checkpoint import load_checkpoint, remove_stale, save_checkpoint
from ldm.train.config import LoopConfig
from ldm.train.data import CaptionDataset, collate
from ldm.train.order import GlobalBatchOrder, StepDraws
from ldm.train.signals import StopRequest, ignore_stop_signals_in_worker

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"


class TrainingError(ValueError):
    """Training cannot go on (a non-finite loss under nan_policy=error). A ValueError so the CLI
    reports it as one line."""


class Stage(Protocol):
    """One thing to train. `models`/`optimizers`/`schedulers` are what accelerate prepared."""

    models: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]

    def loss(self, batch: dict[str, Any], draws: StepDraws, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    def after_step(self, step: int) -> None: ...

    def validate(self, step: int) -> None: ...

    def finish(self) -> None: ...


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint's training_state.json."""

    step: int = 0  # optimizer steps taken (including skipped non-finite ones)
    micro: int = 0  # micro-batches consumed: the position in the data stream
    bad_images: int = 0  # unreadable images met during training and replaced
    skipped_steps: int = 0  # steps dropped under nan_policy=skip


@dataclass
class LoopResult:
    progress: Progress
    stopped: bool  # True: a signal ended the run early (a checkpoint was saved)


def _clip(accelerator: Accelerator, stage: Stage, max_norm: float | None) -> None:
    if not max_norm:
        return
    for model in stage.models:
        params = [p for p in model.parameters() if p.requires_grad]
        if params:
            accelerator.clip_grad_norm_(params, max_norm)


class _Log:
    def __init__(self, accelerator: Accelerator, output_dir: Path, cfg: LoopConfig) -> None:
        self.accelerator, self.cfg = accelerator, cfg
        self.path = Path(output_dir) / LOG_FILE
        self.samples, self.t0 = 0, time.perf_counter()

    def step(self, step: int, loss: float, lr: float, samples: int, logs: dict[str, float], progress: Progress) -> None:
        self.samples += samples
        if step % self.cfg.log_every and step != self.cfg.max_steps:
            return
        now = time.perf_counter()
        rate = self.samples / max(now - self.t0, 1e-9)
        self.samples, self.t0 = 0, now
        # a step whose loss was non-finite (nan_policy=skip) logs null: NaN is not JSON
        record = {"step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr, "samples_per_s": rate, "bad_images": progress.bad_images,
                  "skipped_steps": progress.skipped_steps, **logs}
        if self.accelerator.is_main_process:
            logger.info("step %d/%d loss %.5g lr %.3g samples/s %.1f%s", step, self.cfg.max_steps, loss, lr, rate,
                        f" bad images {progress.bad_images}" if progress.bad_images else "")
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _resume(accelerator: Accelerator, resume: Path | None, cfg: LoopConfig, config_dict: dict[str, Any]) -> Progress:
    if resume is None:
        return Progress()
    state = load_checkpoint(accelerator, resume)
    progress = Progress(**state["progress"])
    old, new = _flat(state.get("config") or {}), _flat(config_dict)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "train.max_steps")
    if changed:
        logger.warning("resuming with a changed config: %s", ", ".join(
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
    micro_batch = cfg.batch_size * accelerator.num_processes
    if state.get("micro_batch") != micro_batch or state.get("accumulation") != cfg.gradient_accumulation_steps:
        # keep the number of samples seen; the data from here on is not what an uninterrupted run would see
        logger.warning("resuming with a different batch size, process count or accumulation: resume is not exact")
        micro = progress.micro * state["micro_batch"] // micro_batch
        progress.micro = micro - micro % cfg.gradient_accumulation_steps
    logger.info("resumed from %s at step %d", resume, progress.step)
    return progress


def run_loop(stage: Stage, accelerator: Accelerator, cfg: LoopConfig, dataset: CaptionDataset, output_dir: Path, *,
             max_grad_norm: float | None, resume: Path | None = None,
             config_dict: dict[str, Any] | None = None) -> LoopResult:
    output_dir = Path(output_dir)
    if accelerator.is_main_process:
        remove_stale(output_dir)
    progress = _resume(accelerator, resume, cfg, config_dict or {})
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.gradient_accumulation_steps
    order = GlobalBatchOrder(len(dataset), cfg.batch_size, world, rank, cfg.seed, start_micro=progress.micro)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=collate,
                                         num_workers=dataset.cfg.num_workers,
                                         worker_init_fn=ignore_stop_signals_in_worker)
    log = _Log(accelerator, output_dir, cfg)
    global_batch = cfg.batch_size * world * accum

    def checkpoint() -> None:
        state = {"progress": asdict(progress), "micro_batch": cfg.batch_size * world, "accumulation": accum,
                 "world_size": world, "config": config_dict or {}}
        save_checkpoint(accelerator, output_dir, progress.step, state, cfg.keep_checkpoints)

    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="training", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process))
    batches = iter(loader)
    stop_now = False
    with StopRequest() as stop:
        while progress.step < cfg.max_steps and not stop_now:
            losses, nonfinite, logs = [], False, {}
            for _ in range(accum):
                batch = next(batches)
                draws = StepDraws(cfg.seed, progress.micro, cfg.batch_size, world, rank)
                with accelerator.accumulate(*stage.models):
                    loss, logs = stage.loss(batch, draws, progress.step)
                    value = float(loss.detach())
                    bad = not math.isfinite(value)
                    # one collective per micro-batch carries the loss, the NaN flag, the stop request and the
                    # bad-image count, so every rank takes the same branch below and counts the same
                    local = [0.0 if bad else value, float(bad), float(stop.requested), float(batch["bad"])]
                    flags = accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").tolist()
                    if flags[1] > 0:
                        if cfg.nan_policy == "error":
                            raise TrainingError(f"non-finite loss at step {progress.step + 1} (micro-batch "
                                                f"{progress.micro}); set train.nan_policy=skip to drop such steps")
                        nonfinite = True
                    else:
                        accelerator.backward(loss)
                        losses.append(flags[0] / world)
                    if accelerator.sync_gradients:
                        if not nonfinite:
                            _clip(accelerator, stage, max_grad_norm)
                            for opt in stage.optimizers:
                                opt.step()
                        for opt in stage.optimizers:
                            opt.zero_grad(set_to_none=True)
                progress.micro += 1
                progress.bad_images += int(flags[3])
            stop_now = flags[2] > 0
            lr = stage.optimizers[0].param_groups[0]["lr"]
            progress.step += 1
            for sched in stage.schedulers:
                sched.step()
            if nonfinite:
                progress.skipped_steps += 1
                logger.warning("non-finite loss at step %d: step skipped (%d so far)", progress.step,
                               progress.skipped_steps)
            else:
                stage.after_step(progress.step)
            mean_loss = sum(losses) / len(losses) if losses else float("nan")
            log.step(progress.step, mean_loss, lr, global_batch, logs, progress)
            bar.set_postfix(loss=f"{mean_loss:.4g}", refresh=False)
            bar.update(1)
            if progress.step % cfg.checkpoint_every == 0 or progress.step == cfg.max_steps or stop_now:
                checkpoint()
            if cfg.validation_every and progress.step % cfg.validation_every == 0 and accelerator.is_main_process:
                stage.validate(progress.step)
    bar.close()
    stopped = progress.step < cfg.max_steps
    if stopped:
        logger.warning("stopped at step %d on request; continue with --resume latest", progress.step)
    else:
        stage.finish()
    return LoopResult(progress, stopped)
