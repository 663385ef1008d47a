"""The one training loop. Accelerate runs it on one device, several GPUs (``accelerate launch``),
CPU processes (``torchrun``, gloo) or Slurm tasks; every stage goes through the same steps.

    for step in range(start, max_steps):
        grad_accum micro-batches -> for each active optimizer (generator, then discriminator):
            stage.training_step -> backward (no DDP sync until the last micro-batch) -> clip -> step
        every log_every: metrics; every val_every: validation metrics + images; every ckpt_every: checkpoint

Only rank 0 logs and writes checkpoints. A non-finite loss stops the run before the
optimizer step (the last checkpoint stays good). SIGUSR1/SIGUSR2 (Slurm's warning
before the time limit, or preemption) make the loop write a checkpoint at the end of
the current step and then hand over to the previous handler (submitit requeues the job).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from vqtransformer.config import ConfigError, validate_config
from vqtransformer.data import balanced_indices, build_datasets, split_summary
from vqtransformer.stages import build_stage
from vqtransformer.training import checkpoint as ckpt_io
from vqtransformer.training.distributed import setup_from_slurm
from vqtransformer.training.sampler import ResumableSampler

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


class _Preemption:
    """Records SIGUSR1/SIGUSR2; after the checkpoint, the previous handler runs (submitit's requeue)."""

    SIGNALS = ("SIGUSR1", "SIGUSR2")

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the end of this step", signum)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def hand_over(self) -> None:
        signum = self.signum
        self.restore()
        handler = self.previous.get(signum)
        if not callable(handler):
            handler = self.previous.get(getattr(signal, "SIGUSR2", -1))
        if callable(handler):
            handler(signum, None)  # submitit: checkpoint() -> requeue -> exit
        raise SystemExit(0)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def output_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.trainer.get("output_dir") or "outputs/manual").resolve()


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def make_accelerator(cfg: DictConfig):
    from accelerate import Accelerator

    tc = cfg.trainer
    want = tc.get("accelerator", "auto")
    cpu = want == "cpu" or (want == "auto" and not torch.cuda.is_available())
    if want == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu but no CUDA device is visible; use trainer=cpu")
    return Accelerator(cpu=cpu, mixed_precision=tc.mixed_precision)


def find_resume(cfg: DictConfig, out_dir: Path) -> Path | None:
    resume = cfg.trainer.get("resume", False)
    if resume in (False, None, "false", "False") and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        log.info("requeued Slurm job (SLURM_RESTART_COUNT=%s): resuming from %s", os.environ["SLURM_RESTART_COUNT"],
                 out_dir)
        resume = True  # preempted / timed out / node failure: carry on in the same run directory and MLflow run
    if resume in (False, None, "false", "False"):
        return None
    if resume in (True, "true", "True", "auto"):
        found = ckpt_io.find_last(out_dir)
        if found is None:
            log.info("trainer.resume=%s: no checkpoint in %s yet, starting fresh", resume, out_dir)
        return found
    p = Path(str(resume)).expanduser()
    found = p if p.is_file() else ckpt_io.find_last(p)
    if found is None:
        raise ConfigError(f"trainer.resume={resume}: no checkpoint there (a .ckpt file, or a run directory "
                          f"with checkpoints/{ckpt_io.LAST})")
    return found


class InfiniteLoader:
    """Iterates the training set epoch after epoch and knows its position for checkpoints."""

    def __init__(self, dataset, cfg: DictConfig, rank: int, world: int, pin: bool):
        self.sampler = ResumableSampler(len(dataset), cfg.trainer.seed, rank, world, shuffle=True)
        self.batch_size = cfg.data.batch_size
        if len(self.sampler.order()) < self.batch_size:
            raise ConfigError(f"data.batch_size={self.batch_size} is larger than the training set per process "
                              f"({len(self.sampler.order())} images)")
        workers = cfg.data.num_workers
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
                                 drop_last=True, pin_memory=pin, persistent_workers=False,
                                 prefetch_factor=4 if workers > 0 else None,
                                 generator=torch.Generator().manual_seed(cfg.trainer.seed + rank))
        self.epoch, self.batches = 0, 0
        self._it = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.batches}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["position"])

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self.sampler.set_position(self.epoch, self.batches * self.batch_size)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                self.batches += 1
                return batch
            except StopIteration:
                self._it, self.epoch, self.batches = None, self.epoch + 1, 0


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def grid_selection(val_ds) -> dict:
    """The fixed validation images shown in the grids: 4 per class for up to 10 classes (class by
    class, so that stages can show a row per class), else 8 evenly spaced ones."""
    from torch.utils.data import default_collate

    idx = balanced_indices(val_ds, 4, 10)
    if len(idx) <= 4:  # no labels: one row of 8
        idx = balanced_indices(val_ds, 8)
    return default_collate([val_ds[i] for i in idx])


def train_step(stage, specs, batches: list[dict], step: int, accelerator, last_ckpt: Path | None = None) -> dict:
    """One optimizer step of every active optimizer, in order, over ``len(batches)`` micro-batches."""
    accum = len(batches)
    logs: dict[str, float] = {}
    for idx, spec in enumerate(specs):
        if step < spec.start_step:
            continue
        for k, batch in enumerate(batches):
            with contextlib.ExitStack() as stack:
                if k < accum - 1:  # no gradient all-reduce until the last micro-batch
                    for m in spec.modules:
                        stack.enter_context(accelerator.no_sync(m))
                with accelerator.autocast():
                    loss, step_logs = stage.training_step(batch, step, idx)
                if not torch.isfinite(loss.detach()).all():
                    raise TrainingDiverged(
                        f"non-finite {spec.name} loss at step {step} ({step_logs}); stopping. The last good "
                        f"checkpoint is {last_ckpt}; lower the learning rate or set trainer.grad_clip")
                accelerator.backward(loss / accum)
            for key, v in step_logs.items():
                logs[key] = logs.get(key, 0.0) + v / accum
        if spec.grad_clip:
            accelerator.clip_grad_norm_(spec.parameters(), spec.grad_clip)
        spec.optimizer.step()
        if spec.scheduler is not None:
            spec.scheduler.step()
        spec.optimizer.zero_grad(set_to_none=True)
    if hasattr(stage, "after_step"):
        stage.after_step(step)
    return logs


def open_tracker(cfg: DictConfig, accelerator, out_dir: Path, resume_run_id: str | None,
                 extra_params: dict[str, Any] | None = None):
    from vqtransformer.tracking import NullTracker, Tracker, flatten

    if not accelerator.is_main_process or cfg.logger.name == "none":
        return NullTracker()
    tracker = Tracker(cfg.logger.get("tracking_uri"), cfg.logger.experiment_name, cfg.logger.get("retries", 3))
    tags = {"vqt.stage": cfg.stage.name, "vqt.output_dir": str(out_dir),
            "vqt.overrides": " ".join(hydra_overrides()) or "(none)", "vqt.world_size": accelerator.num_processes}
    for env, tag in (("SLURM_JOB_ID", "vqt.slurm_job_id"), ("SLURM_ARRAY_TASK_ID", "vqt.slurm_array_task"),
                     ("VQT_JOB_NUM", "vqt.job_num")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):  # the id squeue / scancel / submitit's folders show: ARRAYJOB_TASK
        tags["vqt.slurm_job_id"] = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":  # a sweep's job: its number
        tags["vqt.job_num"] = HydraConfig.get().job.num
    run_id = tracker.start(cfg.logger.get("run_name"), tags, run_id=resume_run_id)
    if run_id and not resume_run_id:
        tracker.log_params({**flatten(OmegaConf.to_container(cfg, resolve=True)), **(extra_params or {})})
    return tracker


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.stage`` to ``trainer.max_steps``; returns the last validation metrics."""
    validate_config(cfg)
    setup_from_slurm()
    accelerator = make_accelerator(cfg)
    tc = cfg.trainer
    is_main = accelerator.is_main_process
    out_dir = output_dir(cfg)
    if accelerator.num_processes > 1:  # every rank uses rank 0's run directory
        from accelerate.utils import broadcast_object_list

        out_dir = Path(broadcast_object_list([str(out_dir)])[0])
    if accelerator.num_processes > 1:
        print(f"[vqtransformer] rank {accelerator.process_index}/{accelerator.num_processes}: training in {out_dir}",
              file=sys.stderr, flush=True)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(tc.seed + accelerator.process_index)

    resume_path = find_resume(cfg, out_dir)
    state = ckpt_io.load(resume_path) if resume_path else None
    if state is not None and state.get("stage") != cfg.stage.name:
        raise ConfigError(f"trainer.resume: checkpoint {resume_path} is a '{state.get('stage')}' run, "
                          f"not stage={cfg.stage.name}")

    # everything that can fail on bad input happens before the MLflow run opens
    train_ds, val_ds = build_datasets(cfg)
    stage = build_stage(cfg)
    specs = stage.setup(accelerator)
    start_step = 0
    loader = InfiniteLoader(train_ds, cfg, accelerator.process_index, accelerator.num_processes,
                            pin=accelerator.device.type == "cuda")
    if state is not None:
        stage.load_state_dict(state["model"])
        for spec, opt_state in zip(specs, state["optimizers"]):
            spec.optimizer.load_state_dict(opt_state)
        for spec, sch_state in zip(specs, state.get("schedulers", [])):
            if spec.scheduler is not None and sch_state is not None:
                spec.scheduler.load_state_dict(sch_state)
        start_step = int(state["step"])
        loader.restore(state["data"])
        log.info("resumed from %s at step %d", resume_path, start_step)

    tracker = open_tracker(cfg, accelerator, out_dir, state.get("mlflow_run_id") if state else None,
                           split_summary(train_ds, val_ds) if is_main else None)  # data.split.* params
    # the loop's randomness starts here, independent of what building and tracking drew
    if state is not None and is_main:
        ckpt_io.set_rng_state(state["rng"])
    else:
        seed_everything(tc.seed * 1000 + accelerator.process_index + start_step)
    preempt = _Preemption()
    # own generators: creating a loader iterator must not draw from the global RNG (resume equality)
    val_loader = DataLoader(val_ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=0,
                            generator=torch.Generator())
    accum = tc.grad_accum
    last_val: dict[str, float] = {}
    grid_batch = grid_selection(val_ds) if is_main else None
    status = "FAILED"

    def save(step: int) -> Path | None:
        if not is_main:
            return None
        path = ckpt_io.atomic_save({
            "format": ckpt_io.FORMAT, "stage": cfg.stage.name,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "model": stage.state_dict(), "optimizers": [s.optimizer.state_dict() for s in specs],
            "schedulers": [s.scheduler.state_dict() if s.scheduler is not None else None for s in specs],
            "step": step, "data": loader.state(), "rng": ckpt_io.rng_state(), "mlflow_run_id": tracker.run_id,
        }, ckpt_dir / ckpt_io.LAST)
        tracker.set_tags({"vqt.checkpoint": str(path), "vqt.checkpoint_step": step})
        tracker.flush()  # a job killed later resumes from here: the metrics up to here must be in MLflow
        return path

    def validate(step: int) -> dict[str, float]:
        if is_main:
            stage.train(False)
            sums: dict[str, float] = {}
            n = 0
            images = {}
            with torch.no_grad(), accelerator.autocast():
                for i, batch in enumerate(val_loader):
                    if i >= tc.val_batches:
                        break
                    batch = to_device(batch, accelerator.device)
                    for k, v in stage.validate(batch).items():
                        sums[k] = sums.get(k, 0.0) + v
                    n += 1
                images = stage.validation_images(to_device(grid_batch, accelerator.device))
                metrics = {k: v / max(n, 1) for k, v in sums.items()}
                metrics.update(stage.validation_end())
            tracker.log_metrics(metrics, step, flush=True)
            for name, grid in images.items():
                tracker.log_image(grid, f"{name}_step{step:07d}.png")
            stage.train(True)
        accelerator.wait_for_everyone()
        return metrics if is_main else {}

    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not is_main, dynamic_ncols=True, desc=cfg.stage.name)
    images_per_step = cfg.data.batch_size * accum * accelerator.num_processes
    t0, steps_timed = time.perf_counter(), 0
    stage.train(True)
    try:
        step = start_step
        while step < tc.max_steps:
            batches = [to_device(next(loader), accelerator.device) for _ in range(accum)]
            logs = train_step(stage, specs, batches, step, accelerator, ckpt_dir / ckpt_io.LAST)
            step += 1
            steps_timed += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                dt = time.perf_counter() - t0
                logs["speed/images_per_s"] = images_per_step * steps_timed / max(dt, 1e-9)
                for spec in specs:
                    logs[f"lr/{spec.name}"] = spec.optimizer.param_groups[0]["lr"]
                tracker.log_metrics(logs, step)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                                 if k.startswith("loss/") or k == "speed/images_per_s"})
                t0, steps_timed = time.perf_counter(), 0
            if step % tc.val_every == 0 or step == tc.max_steps:
                last_val = validate(step)
            if step % tc.ckpt_every == 0 or step == tc.max_steps:
                save(step)
            stop = preempt.signum is not None
            if accelerator.num_processes > 1:
                flag = torch.tensor([1.0 if stop else 0.0], device=accelerator.device)
                stop = bool(accelerator.reduce(flag, "max").item() > 0)
            if stop:
                save(step)
                tracker.flush()
                accelerator.wait_for_everyone()
                status = "RUNNING"  # the requeued job carries on in the same run
                bar.close()
                preempt.hand_over()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        if status != "RUNNING":
            preempt.restore()
        if status == "FINISHED" and is_main:
            final = ckpt_dir / ckpt_io.LAST
            if cfg.logger.get("log_checkpoint", True) and final.is_file():
                tracker.log_artifact(final, "checkpoints")
            tracker.set_tags({"vqt.checkpoint": str(final)})
        if status != "RUNNING":
            tracker.finish(status)
    accelerator.wait_for_everyone()
    if is_main:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last_val.items() if isinstance(v, float) and math.isfinite(v))
        print(f"[vqtransformer] {cfg.stage.name}: finished {tc.max_steps} steps. {summary}\n"
              f"  checkpoint: {ckpt_dir / ckpt_io.LAST}\n  MLflow run: {tracker.run_id} "
              f"({tracker.tracking_uri or 'tracking off: logger=none'})", flush=True)
    accelerator.end_training() if hasattr(accelerator, "end_training") else None
    return last_val
