"""Signals, kill -9 and resume (issue 14, points 4, 5 and 6), with real signals to a real train.py."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from mlflow import MlflowClient

from tests.conftest import run_train
from tests.reliability.helpers import FAST, Train, metric_steps
from vqtransformer.training import checkpoint as ckpt_io


def _run(client: MlflowClient):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


# SIGINT takes the same path as SIGTERM (_Preemption.STOP): its run is in `make test-all` only
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, "KILLED"),
                                        pytest.param(signal.SIGINT, "KILLED", marks=pytest.mark.slow)])
def test_a_stop_signal_checkpoints_the_step_closes_the_run_and_resume_continues_it(tmp_path, sig, status):
    db, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    uri = f"sqlite:///{db}"
    common = FAST + ["trainer.ckpt_every=1000", f"logger.tracking_uri={uri}", f"hydra.run.dir={run_dir}"]
    t = Train(common + ["trainer.max_steps=100000"], cwd=tmp_path)
    try:
        t.wait_step(12)
        t.signal(sig)
        rc = t.wait()
    finally:
        t.kill()
    assert rc == 128 + sig, t.text()[-3000:]
    assert "Traceback" not in t.text()
    state = ckpt_io.load(run_dir / "checkpoints" / "last.ckpt")  # written at the end of the step
    stopped = state["step"]
    assert stopped >= 12
    run = _run(MlflowClient(uri))
    assert run.info.status == status and run.data.tags["vqt.checkpoint_step"] == str(stopped)
    assert f"stopped by {signal.Signals(sig).name} at step {stopped}" in t.text()
    assert metric_steps(db) == list(range(1, stopped + 1))
    # resume: the same MLflow run goes on, one point per step
    r = run_train(common + [f"trainer.max_steps={stopped + 5}", "trainer.resume=true"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = _run(MlflowClient(uri))
    assert run.info.status == "FINISHED" and run.info.run_id == state["mlflow_run_id"]
    assert metric_steps(db) == list(range(1, stopped + 6))


def test_kill_9_loop_keeps_a_loadable_checkpoint_no_temp_files_and_one_point_per_step(tmp_path):
    """Several kill -9 (checkpoints every 2 steps, so some land in a checkpoint write); after each, the
    last checkpoint loads; the next start removes the temp files the killed writer left; resumed runs
    record one point per step although the killed processes had sent points past their checkpoint."""
    db, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    uri = f"sqlite:///{db}"
    ckpts = run_dir / "checkpoints"
    common = FAST + ["trainer.ckpt_every=2", f"logger.tracking_uri={uri}", f"hydra.run.dir={run_dir}",
                     "trainer.resume=true"]
    rng = random.Random(14)
    target = 0
    planted = ckpts / f".last.ckpt.{os.uname().nodename.split('.')[0]}.999999999.abc123.tmp"
    for k in range(3):
        t = Train(common + ["trainer.max_steps=100000"], cwd=tmp_path)
        try:
            if k:  # the start removed the stale temp files of the killed writers (ours, by name)
                t.wait_step(target + 1)
                assert not [p.name for p in ckpts.glob(".last.ckpt.*.tmp") if not _live(p)], list(ckpts.iterdir())
                assert not planted.exists()
            target = t.step() + 8
            t.wait_step(target)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(t.proc.pid, signal.SIGKILL)
            t.wait()
        finally:
            t.kill()
        assert ckpt_io.load(ckpts / "last.ckpt")["step"] >= 2  # always loadable
        # what a kill during a checkpoint write leaves behind (a half-written temp file of a dead writer)
        planted.write_bytes(b"\0" * 1000)
    # one more kill -9 after the process sent points past its checkpoint (validation flushes them)
    last = ckpt_io.load(ckpts / "last.ckpt")["step"]
    t = Train(common + ["trainer.max_steps=100000", "trainer.ckpt_every=100000", "trainer.val_every=5"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while max(metric_steps(db)) < last + 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(t.proc.pid, signal.SIGKILL)
        t.wait()
    finally:
        t.kill()
    assert ckpt_io.load(ckpts / "last.ckpt")["step"] == last and max(metric_steps(db)) >= last + 8
    r = run_train(common + [f"trainer.max_steps={last + 12}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(ckpts.glob(".last.ckpt.*.tmp"))
    assert metric_steps(db) == list(range(1, last + 13))  # one point per step
    assert _run(MlflowClient(uri)).info.status == "FINISHED"


def _live(p) -> bool:
    try:
        os.kill(int(p.name.split(".")[4]), 0)
        return True
    except (ProcessLookupError, ValueError, IndexError):
        return False


def test_start_up_removes_only_stale_temp_files_of_its_checkpoint(tmp_path):
    host = os.uname().nodename.split(".")[0]
    keep = [tmp_path / "last.ckpt", tmp_path / "notes.tmp", tmp_path / ".other.ckpt.x.tmp",
            tmp_path / f".last.ckpt.{host}.{os.getpid()}.live.tmp"]  # a live writer's file stays
    stale = [tmp_path / ".last.ckpt.abc123.tmp",  # mkstemp's name of earlier versions
             tmp_path / f".last.ckpt.{host}.999999999.dead.tmp", tmp_path / ".last.ckpt.otherhost.12.x.tmp"]
    for p in keep + stale:
        p.write_bytes(b"x")
    assert sorted(ckpt_io.remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep)
