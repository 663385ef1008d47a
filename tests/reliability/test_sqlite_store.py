"""A real SQLite store (issue 14, points 2 and 3): held locked, training goes on and the points arrive
afterwards; jobs that start together into a new store all get complete runs."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.reliability.helpers import FAST, Train, metric_steps


def _lock(db, seconds: float, locked: threading.Event, stop: threading.Event) -> None:
    con = sqlite3.connect(str(db), timeout=60, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    locked.set()
    stop.wait(seconds)
    con.execute("ROLLBACK")
    con.close()


def _held_lock(tmp_path, lock_s: float):
    db = tmp_path / "mlflow.db"
    # the first validation flush into the locked store waits logger.flush_timeout (then it is "behind" and
    # later flushes do not wait): 1 s here, so that the bound, not the lock, is what the step count sees
    t = Train(FAST + ["trainer.max_steps=100000", "trainer.val_every=40", "trainer.ckpt_every=40",
                      "logger.flush_timeout=1.0",
                      f"logger.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    locked, stop = threading.Event(), threading.Event()
    try:
        t.wait_step(20)
        s0 = t.step()
        time.sleep(lock_s)
        before = t.step() - s0
        holder = threading.Thread(target=_lock, args=(db, lock_s, locked, stop), daemon=True)
        holder.start()
        assert locked.wait(60)
        s1 = t.step()
        holder.join(lock_s + 60)
        during = t.step() - s1
        time.sleep(5)  # the sender sends what waited as soon as the lock is gone
        import signal

        t.signal(signal.SIGTERM)
        rc = t.wait()
    finally:
        stop.set()
        t.kill()
    print(f"\nSQLite locked {lock_s:.0f}s: {before} steps in {lock_s:.0f}s before, {during} steps while locked")
    assert rc == 143, t.text()[-3000:]
    assert during >= 0.5 * before and during > 0, (before, during)
    from vqtransformer.training import checkpoint as ckpt_io

    last = ckpt_io.load(tmp_path / "run" / "checkpoints" / "last.ckpt")["step"]
    assert metric_steps(db) == list(range(1, last + 1))  # the points of the locked time arrived afterwards
    assert "Traceback" not in t.text() and "SQLAlchemy" not in t.text()
    assert len([ln for ln in t.text().splitlines() if "tracking is behind" in ln]) == 1


def test_a_locked_sqlite_store_does_not_stop_training(tmp_path):
    _held_lock(tmp_path, 10)


@pytest.mark.slow
def test_a_sqlite_store_locked_for_30s_does_not_stop_training(tmp_path):
    _held_lock(tmp_path, 30)


JOB = textwrap.dedent("""
    import sys
    from vqtransformer.tracking import Tracker
    t = Tracker(sys.argv[1], "race")
    run_id = t.start(f"job{sys.argv[2]}", {"job": sys.argv[2]})
    assert run_id, "no run"
    t.log_params({"job": sys.argv[2], "n": 3})
    for s in range(1, 11):
        t.log_metrics({"loss": 1.0 / s}, s)
    t.finish()
    print("OK", run_id)
""")


def test_jobs_starting_together_into_a_new_sqlite_store_all_get_complete_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, str(script), uri, str(i)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    results = [p.communicate(timeout=300) for p in procs]
    failed = [(p.returncode, err[-1500:]) for p, (out, err) in zip(procs, results) if p.returncode != 0]
    assert not failed, failed
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == 8
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.params["n"] == "3"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 11))


@pytest.mark.slow
def test_eight_training_runs_starting_together_into_a_new_store(tmp_path):
    db = tmp_path / "new.db"
    jobs = [Train(FAST + ["trainer.max_steps=3", f"logger.tracking_uri=sqlite:///{db}",
                          f"hydra.run.dir={tmp_path / f'run{i}'}"], cwd=tmp_path) for i in range(8)]
    rcs = [j.wait(900) for j in jobs]
    assert rcs == [0] * 8, [j.text()[-1500:] for j, rc in zip(jobs, rcs) if rc]
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("vqgan").experiment_id])
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/rec")] == [1, 2, 3]
