"""The one training loop. Accelerate runs it on one device, several GPUs (``accelerate launch``),
CPU processes (``torchrun``, gloo) or Slurm tasks; every stage goes through the same steps.

    for step in range(start, max_steps):
        grad_accum micro-batches -> for each active optimizer (generator, then discriminator):
            stage.training_step -> backward (accelerator.accumulate: no DDP sync until the last
            micro-batch) -> clip -> step
        every log_every: metrics; every val_every: validation metrics + images; every ckpt_every: checkpoint

Only rank 0 logs and writes checkpoints. A non-finite loss stops the run before the
optimizer step (the last checkpoint stays good). SIGUSR1/SIGUSR2 (Slurm's warning
before the time limit, or preemption) make the loop write a checkpoint at the end of
the current step and then hand over to the previous handler (submitit requeues the job);
SIGTERM/SIGINT write a checkpoint at the end of the current step, close the run KILLED and
exit 128 + signal. Tracking goes through the tracker's background sender: it never blocks a step.
"""

from __future__ import annotations

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
from vqtransformer.data import DataError, balanced_indices, build_datasets, split_summary
from vqtransformer.errors import UserError
from vqtransformer.loading import build_stage
from vqtransformer.training import checkpoint as ckpt_io
from vqtransformer.training.distributed import setup_from_slurm
from vqtransformer.training.sampler import ResumableSampler

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """A loss became NaN or infinite."""


class _Preemption:
    """Signals that end a run cleanly at the end of the current step (after a checkpoint).

    - SIGUSR1 / SIGUSR2 (Slurm's warning before the time limit, or preemption, with ``--signal``): the
      run stays RUNNING and the previous handler runs (submitit's requeue); the requeued job resumes it.
    - SIGTERM (``scancel``, the time limit or preemption without ``--signal``) and SIGINT (Ctrl-C): the
      run is closed KILLED and the process exits 128 + signal; ``trainer.resume`` (or a requeued job)
      continues the same run. The same signal a second time stops at once.
    """

    REQUEUE = ("SIGUSR1", "SIGUSR2")
    STOP = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        for name in self.REQUEUE + self.STOP:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def stopping(self) -> bool:
        """A stop signal (SIGTERM / SIGINT), as opposed to a requeue signal."""
        return self.signum is not None and signal.Signals(self.signum).name in self.STOP

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None and name in self.STOP:  # a second stop signal: stop now
            self.restore()
            if name == "SIGINT":
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        if name in self.STOP:
            log.warning("received %s: writing a checkpoint at the end of this step, then stopping "
                        "(send %s again to stop at once)", name, name)
        else:
            log.warning("received %s: checkpointing at the end of this step", name)
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
    """Python, NumPy and torch (all devices) from ``seed``: ``accelerate.utils.set_seed`` (NumPy takes seeds
    below 2**32, so larger ones wrap)."""
    from accelerate.utils import set_seed

    set_seed(seed % 2**32)


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
    # gradient_accumulation_steps: accelerator.accumulate skips the gradient all-reduce of the first
    # grad_accum - 1 micro-batches and accelerator.backward divides each loss by grad_accum
    return Accelerator(cpu=cpu, mixed_precision=tc.mixed_precision,
                       gradient_accumulation_steps=int(tc.get("grad_accum", 1) or 1))


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
                if hasattr(self.loader.dataset, "set_epoch"):  # e.g. captions: one of several drawn per epoch
                    self.loader.dataset.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                self.batches += 1
                return batch
            except DataError as e:  # raised in a DataLoader worker: one line, without the worker's traceback
                raise DataError.without_worker_traceback(e) from None
            except StopIteration:
                self._it, self.epoch, self.batches = None, self.epoch + 1, 0


def probe_datasets(dataset) -> None:
    """Read a sample of the files of file-based datasets (``ImagePaths.probe``) so that a dataset of
    unreadable files fails before any MLflow run exists."""
    for part in getattr(dataset, "datasets", [dataset]):
        if hasattr(part, "probe"):
            part.probe()


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
    """One optimizer step of every active optimizer, in order, over ``len(batches)`` micro-batches
    (``accelerator`` made with ``gradient_accumulation_steps=len(batches)``): each spec's micro-batches run in
    ``accelerator.accumulate``, whose step counter then syncs gradients on the last one of each spec."""
    accum = len(batches)
    if accelerator.gradient_accumulation_steps != accum:
        raise ConfigError(f"{accum} micro-batches but the accelerator accumulates "
                          f"{accelerator.gradient_accumulation_steps} (trainer.grad_accum)")
    logs: dict[str, float] = {}
    for idx, spec in enumerate(specs):
        if step < spec.start_step:
            continue
        for batch in batches:
            with accelerator.accumulate(*spec.modules):
                with accelerator.autocast():
                    loss, step_logs = stage.training_step(batch, step, idx)
                if not torch.isfinite(loss.detach()).all():
                    raise TrainingDiverged(
                        f"non-finite {spec.name} loss at step {step} ({step_logs}); stopping. The last good "
                        f"checkpoint is {last_ckpt}; lower the learning rate or set trainer.grad_clip")
                accelerator.backward(loss)  # divided by grad_accum
            for key, v in step_logs.items():
                logs[key] = logs.get(key, 0.0) + v / accum
        if not accelerator.sync_gradients:  # cannot happen: every spec runs exactly grad_accum micro-batches
            raise RuntimeError("gradient accumulation out of step: the last micro-batch did not sync")
        if spec.grad_clip:
            accelerator.clip_grad_norm_(spec.parameters(), spec.grad_clip)
        spec.optimizer.step()
        if spec.scheduler is not None:
            spec.scheduler.step()
        spec.optimizer.zero_grad(set_to_none=True)
    stage.after_step(step)
    return logs


def open_tracker(cfg: DictConfig, accelerator, out_dir: Path, resume_run_id: str | None,
                 extra_params: dict[str, Any] | None = None):
    from vqtransformer.tracking import NullTracker, Tracker, flatten

    if not accelerator.is_main_process or cfg.logger.name == "none":
        return NullTracker()
    lg = cfg.logger
    tracker = Tracker(lg.get("tracking_uri"), lg.experiment_name, lg.get("retries", 3),
                      flush_timeout=lg.get("flush_timeout", 5.0), finish_timeout=lg.get("finish_timeout", 60.0),
                      max_buffered=lg.get("max_buffered", 200_000))
    tags = {"vqt.stage": cfg.stage.name, "vqt.output_dir": str(out_dir),
            "vqt.overrides": " ".join(hydra_overrides()) or "(none)", "vqt.world_size": str(accelerator.num_processes)}
    for env, tag in (("SLURM_JOB_ID", "vqt.slurm_job_id"), ("SLURM_ARRAY_TASK_ID", "vqt.slurm_array_task"),
                     ("VQT_JOB_NUM", "vqt.job_num")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):  # the id squeue / scancel / submitit's folders show: ARRAYJOB_TASK
        tags["vqt.slurm_job_id"] = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":  # a sweep's job: its number
        tags["vqt.job_num"] = str(HydraConfig.get().job.num)
    run_id = tracker.start(cfg.logger.get("run_name"), tags, run_id=resume_run_id)
    if run_id and not resume_run_id:
        tracker.log_params({**flatten(OmegaConf.to_container(cfg, resolve=True)), **(extra_params or {})})
    return tracker


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.stage`` to ``trainer.max_steps``; returns the last validation metrics."""
    validate_config(cfg, hydra_overrides())
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
    if is_main:  # temp files of checkpoint writes that a killed process (kill -9, node failure) left behind
        ckpt_io.remove_stale_temp_files(ckpt_dir)
    torch.manual_seed(tc.seed + accelerator.process_index)

    resume_path = find_resume(cfg, out_dir)
    state = ckpt_io.load(resume_path) if resume_path else None
    if state is not None and state.get("stage") != cfg.stage.name:
        raise ConfigError(f"trainer.resume: checkpoint {resume_path} is a '{state.get('stage')}' run, "
                          f"not stage={cfg.stage.name}")

    # everything that can fail on bad input happens before the MLflow run opens
    train_ds, val_ds = build_datasets(cfg)
    stage = build_stage(cfg, overrides=hydra_overrides())
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

    # bad files show before the run exists: a probe of the training files, the validation grid's images
    probe_datasets(train_ds)
    grid_batch = grid_selection(val_ds) if is_main else None
    preempt = _Preemption()  # from here on SIGTERM / SIGINT end the run cleanly (checkpoint, status)
    tracker = open_tracker(cfg, accelerator, out_dir, state.get("mlflow_run_id") if state else None,
                           split_summary(train_ds, val_ds) if is_main else None)  # data.split.* params
    if state is not None:
        tracker.resend_metrics(state.get("unsent_metrics"))
    # the loop's randomness starts here, independent of what building and tracking drew
    if state is not None and is_main:
        ckpt_io.set_rng_state(state["rng"])
    else:
        seed_everything(tc.seed * 1000 + accelerator.process_index + start_step)
    # own generators: creating a loader iterator must not draw from the global RNG (resume equality)
    val_loader = DataLoader(val_ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=0,
                            generator=torch.Generator())
    accum = tc.grad_accum
    last_val: dict[str, float] = {}
    status = "FAILED"
    saved_step = start_step if state is not None else None  # the step of the last good checkpoint

    def save(step: int) -> Path | None:
        nonlocal saved_step
        if not is_main:
            return None
        path = ckpt_io.atomic_save({
            "format": ckpt_io.FORMAT, "stage": cfg.stage.name,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "model": stage.state_dict(), "optimizers": [s.optimizer.state_dict() for s in specs],
            "schedulers": [s.scheduler.state_dict() if s.scheduler is not None else None for s in specs],
            "step": step, "data": loader.state(), "rng": ckpt_io.rng_state(), "mlflow_run_id": tracker.run_id,
            "unsent_metrics": tracker.unsent_metrics() or [],  # re-sent on resume: a kill -9 loses no step
        }, ckpt_dir / ckpt_io.LAST)
        saved_step = step
        tracker.set_tags({"vqt.checkpoint": str(path), "vqt.checkpoint_step": step})
        tracker.flush()  # bounded wait, none while the store is down (tracker.flush)
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
                tracker.log_image(grid, f"{name}_step{step:07d}.png", key=name, step=step)  # + MLflow image grid
            stage.train(True)
        accelerator.wait_for_everyone()
        return metrics if is_main else {}

    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not is_main, dynamic_ncols=True, desc=cfg.stage.name)
    images_per_step = cfg.data.batch_size * accum * accelerator.num_processes
    t0, steps_timed = time.perf_counter(), 0
    stage.train(True)
    step = start_step
    error: BaseException | None = None
    try:
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
                if saved_step != step:
                    save(step)
                accelerator.wait_for_everyone()
                if preempt.stopping or preempt.signum is None:  # SIGTERM / SIGINT (on this or another rank)
                    status = "KILLED"
                    break
                tracker.flush()
                status = "RUNNING"  # the requeued job carries on in the same run
                bar.close()
                preempt.hand_over()
        else:
            status = "FINISHED"
    except (KeyboardInterrupt, SystemExit) as e:
        status = "RUNNING" if status == "RUNNING" else "KILLED"
        error = e
        raise
    except BaseException as e:
        error = e
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
        if status in ("FAILED", "KILLED") and is_main:
            why = (f"stopped by {preempt.name}" if preempt.stopping else
                   " ".join(f"{type(error).__name__}: {error}".split()) if error is not None else "interrupted")
            tracker.set_tags({"vqt.checkpoint_step": "none" if saved_step is None else saved_step,
                              "vqt.stopped_at_step": step, "vqt.end_reason": why[:500]})
        if status != "RUNNING":
            tracker.finish(status)
    accelerator.wait_for_everyone()
    if status == "KILLED":  # SIGTERM / SIGINT: checkpointed, run closed; exit as the signal would
        if is_main:
            print(f"[vqtransformer] {cfg.stage.name}: stopped by {preempt.name or 'a signal'} at step {step} "
                  f"(checkpoint: {ckpt_dir / ckpt_io.LAST}, step {saved_step}); continue with "
                  f"trainer.resume={out_dir}", file=sys.stderr, flush=True)
        raise SystemExit(128 + (preempt.signum or signal.SIGTERM))
    if is_main:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last_val.items() if isinstance(v, float) and math.isfinite(v))
        print(f"[vqtransformer] {cfg.stage.name}: finished {tc.max_steps} steps. {summary}\n"
              f"  checkpoint: {ckpt_dir / ckpt_io.LAST}\n  MLflow run: {tracker.run_id} "
              f"({tracker.tracking_uri or 'tracking off: logger=none'})", flush=True)
    accelerator.end_training() if hasattr(accelerator, "end_training") else None
    return last_val
