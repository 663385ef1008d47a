"""Sweeps: Hydra multiruns (basic, submitit_local, the real local Slurm cluster), MLflow parent/child
runs, multi-task jobs, preemption and requeue. Tests marked ``slurm`` need ``sbatch``/``sinfo`` to reach
a cluster (``make slurm-up``) and are skipped otherwise. MLflow stores and sweep dirs live in tmp dirs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, run_train

# TINY without its codebook size (the sweeps vary it) and with a codebook that fits 16 px images
SWEEP_TINY = [o for o in TINY if not o.startswith("codebook.")] + ["codebook.embed_dim=8"]


def _cluster_up() -> bool:
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and "up" in p.stdout


needs_slurm = [pytest.mark.slurm, pytest.mark.skipif(not _cluster_up(), reason="no Slurm cluster (make slurm-up)")]


def slurm(fn):
    for mark in needs_slurm:
        fn = mark(fn)
    return fn


# -- helpers -------------------------------------------------------------------------------------------
def compose(overrides: list[str]):
    """train.py's config with its ``hydra`` node (launcher, sweeper, callbacks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import vqtransformer.config  # noqa: F401
    import vqtransformer.tracking.sweep  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def sweep_runs(uri: str, sweep_id: str):
    """(parent run, child runs sorted by job number) of one sweep."""
    c = client(uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                         filter_string=f"tags.`vqt.sweep_id` = '{sweep_id}'")
    parents = [r for r in runs if r.data.tags.get("vqt.role") == "parent"]
    children = sorted((r for r in runs if r.data.tags.get("vqt.role") != "parent"),
                      key=lambda r: int(r.data.tags["vqt.job_num"]))
    assert len(parents) == 1, [r.data.tags for r in runs]
    return parents[0], children


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client(uri).get_metric_history(run_id, key))


def sweep_info(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


def check(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
    return p


def slurm_launcher(**extra) -> list[str]:
    """The repo's CPU Slurm launcher, small: 1 CPU and 1 GB per task."""
    opts = {"cpus_per_task": 1, "mem_gb": 1, **extra}
    return ["hydra/launcher=slurm_cpu", *(f"hydra.launcher.{k}={v}" for k, v in opts.items())]


def job_log(sweep_dir: Path, pattern: str = "*_0_log.*") -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((sweep_dir / ".submitit").rglob(pattern)))


def wait_for(cond, timeout: float, what: str, every: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- fast: configs, resolvers, the callback ---------------------------------------------------------
def test_launcher_configs_and_the_ablation_preset_compose():
    cpu = compose(["hydra/launcher=slurm_cpu"]).hydra.launcher
    assert cpu._target_.endswith("SlurmLauncher") and cpu.timeout_min >= 10 and cpu.max_num_timeout >= 1
    assert cpu.tasks_per_node == 1 and any("OMP_NUM_THREADS=1" in s for s in cpu.setup)
    gpu = compose(["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_node=4"]).hydra.launcher
    assert gpu.tasks_per_node == 4 and gpu.gpus_per_node == 4  # one process per GPU
    cfg = compose(["experiment=codebook_ablation"])
    assert cfg.hydra.sweeper.params.codebook == "k1024,k16384,fsq_1k,fsq_16k,lfq_1k,lfq_16k"  # kind x size
    assert cfg.stage.name == "vqgan"
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "vqtransformer.tracking.sweep.MLflowSweepCallback"
    cfg = compose(["experiment=transformer_depth_ablation"])
    assert cfg.hydra.sweeper.params["transformer.n_layer"] == "2,4,8" and cfg.stage.name == "transformer"


def test_rank_zero_resolver_and_global_rank(monkeypatch):
    from omegaconf import OmegaConf

    from vqtransformer.training.distributed import global_rank, setup_from_slurm

    for var in ("RANK", "SLURM_PROCID", "SLURM_NTASKS", "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS",
                "SUBMITIT_EXECUTOR", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(var, "")  # recorded, so that monkeypatch restores what setup_from_slurm exports
        monkeypatch.delenv(var)
    cfg = OmegaConf.create({"sub": "${vqt.on_rank_zero:.hydra}"})
    assert global_rank() == 0 and cfg.sub == ".hydra"
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert global_rank() == 0  # a one-task job
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert global_rank() == 1 and cfg.sub is None  # not cached: every task resolves its own
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.delenv("SLURM_NTASKS")
    # submitit's local executor with 2 tasks -> a torch.distributed world of 2
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
                 "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "4242"}.items():
        monkeypatch.setenv(k, v)
    assert global_rank() == 1
    assert setup_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == str(20000 + 4242)


def test_sweep_dirs_of_two_sweeps_started_together_differ(tmp_path):
    """``${vqt.unique:}`` is per process: two submitters in the same second get different sweep dirs."""
    cmd = [sys.executable, str(ROOT / "train.py"), "hydra.mode=MULTIRUN", "--cfg", "hydra", "--resolve"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    dirs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        dirs.append(re.search(r"^  sweep:\n    dir: (\S+)", out, re.M).group(1))
    assert dirs[0] != dirs[1] and all(re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]{6}", d)
                                      for d in dirs), dirs


def test_callback_parent_run_lifecycle(tmp_path, mlflow_uri, monkeypatch):
    """Parent created before the jobs with the sweep's tags; ids exported and carried by the pickled
    callback into a job; closed FINISHED at the end, or FAILED when the sweep raised."""
    from vqtransformer.tracking.mlflow_tracker import ENV_PARENT, ENV_SWEEP
    from vqtransformer.tracking.sweep import MLflowSweepCallback

    monkeypatch.delenv(ENV_PARENT, raising=False)
    monkeypatch.delenv(ENV_SWEEP, raising=False)
    cfg = compose(["experiment=codebook_ablation", f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.max_steps=7"])
    from omegaconf import flag_override

    with flag_override(cfg, ["readonly", "struct"], [False, False]):  # as on the command line, with a sweep
        cfg.hydra.overrides.task = ["experiment=codebook_ablation", "trainer.max_steps=7", "first_stage.ch=32,64"]
    cb = MLflowSweepCallback()
    cb.on_multirun_start(cfg)
    info = sweep_info(tmp_path / "sweep")
    assert info["sweep_id"] == cb.sweep_id and info["parent_run_id"] == cb.parent_run_id
    assert os.environ[ENV_PARENT] == cb.parent_run_id and os.environ[ENV_SWEEP] == cb.sweep_id
    parent = client(mlflow_uri).get_run(cb.parent_run_id)
    tags = parent.data.tags
    assert parent.info.status == "RUNNING" and tags["vqt.role"] == "parent" and tags["vqt.sweep_id"] == cb.sweep_id
    assert tags["vqt.sweep_dir"] == str(tmp_path / "sweep") and "trainer.max_steps=7" in tags["vqt.overrides"]
    assert parent.data.params == {"sweep.codebook": "k1024,k16384,fsq_1k,fsq_16k,lfq_1k,lfq_16k",
                                  "sweep.first_stage.ch": "32,64"}
    assert client(mlflow_uri).get_experiment(parent.info.experiment_id).name == "vqgan"  # the children's
    # in a job (another process, no inherited environment): the unpickled callback exports the ids
    job_cb = pickle.loads(pickle.dumps(cb))
    monkeypatch.delenv(ENV_PARENT)
    monkeypatch.delenv(ENV_SWEEP)
    job_cb.on_job_start(cfg)
    assert os.environ[ENV_PARENT] == cb.parent_run_id and os.environ[ENV_SWEEP] == cb.sweep_id
    job_cb._close("FINISHED")  # a job never closes the parent
    assert client(mlflow_uri).get_run(cb.parent_run_id).info.status == "RUNNING"
    cb.on_multirun_end(cfg)
    assert client(mlflow_uri).get_run(cb.parent_run_id).info.status == "FINISHED"
    assert ENV_PARENT not in os.environ and ENV_SWEEP not in os.environ  # restored
    failed = MLflowSweepCallback()
    failed.on_multirun_start(cfg)
    failed._close("FAILED")  # what the atexit hook does when the sweep raised
    assert client(mlflow_uri).get_run(failed.parent_run_id).info.status == "FAILED"
    assert failed.sweep_id != cb.sweep_id or failed.parent_run_id != cb.parent_run_id


# -- end to end --------------------------------------------------------------------------------------
def test_failed_sweep_closes_its_parent_failed(tmp_path, mlflow_uri):
    """Basic launcher; every job fails config validation (before any MLflow run opens)."""
    sweep_dir = tmp_path / "multirun"
    p = run_train(["-m", *SWEEP_TINY, "codebook.beta=-1,-2", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert p.returncode != 0 and "codebook.beta=-1" in p.stderr
    parent, children = sweep_runs(mlflow_uri, sweep_info(sweep_dir)["sweep_id"])
    assert parent.info.status == "FAILED" and children == []


def test_six_concurrent_jobs_lose_nothing(tmp_path, mlflow_uri):
    """6 submitit_local jobs at once write to one SQLite store: every run, param and metric arrives."""
    steps = 6
    sweep_dir = tmp_path / "multirun"
    check(run_train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=30", *SWEEP_TINY,
                     "codebook.n_embed=8,12,16,20,24,28", f"trainer.max_steps={steps}", "trainer.val_every=2",
                     "trainer.ckpt_every=3", "logger.log_checkpoint=false", f"hydra.sweep.dir={sweep_dir}"],
                    cwd=tmp_path, timeout=900))
    info = sweep_info(sweep_dir)
    parent, children = sweep_runs(mlflow_uri, info["sweep_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_id == info["parent_run_id"]
    assert [r.data.params["codebook.n_embed"] for r in children] == ["8", "12", "16", "20", "24", "28"]
    n_params = {len(r.data.params) for r in children}
    assert len(n_params) == 1 and n_params.pop() > 50
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        train_keys = [k for k in r.data.metrics if k.startswith("loss/")]
        assert train_keys, r.data.metrics
        for key in train_keys:
            assert metric_steps(mlflow_uri, r.info.run_id, key) == list(range(1, steps + 1)), key
        assert metric_steps(mlflow_uri, r.info.run_id, "val/l1") == [2, 4, 6]
        assert r.data.tags["vqt.checkpoint_step"] == str(steps)
    logs = job_log(sweep_dir, "*_log.*") + "".join(p.read_text() for p in sweep_dir.glob("*/train.log"))
    assert "failed after" not in logs  # no MLflow call gave up


@slurm
def test_slurm_codebook_sweep_parent_children_and_comparison(tmp_path, mlflow_uri):
    """`train.py -m experiment=codebook_ablation hydra/launcher=slurm_cpu`: a job array of 3, one sweep dir
    (resolved once on the submitter), 3 finished children of one parent, then `evaluate.py sweep_id=`."""
    steps = 20
    p = check(run_train(["-m", "experiment=codebook_ablation", "codebook=k256,k1024,k4096", *slurm_launcher(), *SWEEP_TINY,
                         f"trainer.max_steps={steps}", f"trainer.val_every={steps}", f"trainer.ckpt_every={steps}",
                         "trainer.log_every=5", "logger.log_checkpoint=false"], cwd=tmp_path, timeout=900))
    # the default sweep dir multirun/DATE/TIME-<unique>: every job wrote into the one the submitter printed
    sweep_dirs = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweep_dirs) == 1, sweep_dirs
    sweep_dir = sweep_dirs[0]
    assert re.fullmatch(r"\d\d-\d\d-\d\d-[0-9a-f]{6}", sweep_dir.name)
    info = sweep_info(sweep_dir)
    assert info["sweep_id"] == f"{sweep_dir.parent.name}_{sweep_dir.name}" and info["sweep_id"] in p.stdout
    for n, k in enumerate(("k256", "k1024", "k4096")):
        job = sweep_dir / str(n)
        assert (job / ".hydra" / "config.yaml").is_file() and (job / ".hydra" / "hydra.yaml").is_file()
        assert f"codebook={k}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "train.log").is_file()
    tasks = sorted(d.name for d in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", d.name))
    assert (sweep_dir / "multirun.yaml").is_file() and [t.split("_")[1] for t in tasks] == ["0", "1", "2"]
    assert len({t.split("_")[0] for t in tasks}) == 1 and (sweep_dir / ".submitit" / tasks[0] / f"{tasks[0]}_0_log.out").is_file()
    parent, children = sweep_runs(mlflow_uri, info["sweep_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["vqt.launcher"] == "slurm_cpu"
    assert parent.data.tags["vqt.sweep_dir"] == str(sweep_dir) and parent.data.params["sweep.codebook"]
    assert [r.data.params["codebook.n_embed"] for r in children] == ["256", "1024", "4096"]
    array_jobs = set()
    for n, r in enumerate(children):
        t = r.data.tags
        assert r.info.status == "FINISHED" and t["mlflow.parentRunId"] == parent.info.run_id
        assert t["vqt.job_num"] == str(n) and t["vqt.output_dir"] == str(sweep_dir / str(n))
        assert f"codebook={('k256', 'k1024', 'k4096')[n]}" in t["vqt.overrides"]
        array_jobs.add(t["vqt.slurm_job_id"].split("_")[0])
        assert t["vqt.slurm_job_id"].endswith(f"_{n}")
        assert metric_steps(mlflow_uri, r.info.run_id, "val/l1") == [steps]
        assert r.info.experiment_id == parent.info.experiment_id
    assert len(array_jobs) == 1  # one job array
    # the comparison table and plot of the sweep, on the parent run (evaluate.py's documented interface)
    ev = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"sweep_id={info['sweep_id']}", "device=cpu",
                         "eval.feature_network=standin", "eval.metrics=[rfid,psnr,codebook]", "eval.small_n=warn",
                         "eval.batch_size=32", "+eval.data.val_size=32"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "OMP_NUM_THREADS": "1", "VQT_OFFLINE": "1"})
    check(ev)
    arts = {a.path for a in client(mlflow_uri).list_artifacts(parent.info.run_id, "eval")}
    assert {"eval/comparison.csv", "eval/comparison.md"} <= arts and any(a.endswith(".png") for a in arts), arts
    md = Path(client(mlflow_uri).download_artifacts(parent.info.run_id, "eval/comparison.md")).read_text()
    assert "codebook.n_embed" in md and all(k in md for k in ("256", "1024", "4096"))
    for r in children:
        assert any(k.startswith("eval/") and k.endswith("rfid") for k in client(mlflow_uri).get_run(
            r.info.run_id).data.metrics)


@slurm
def test_slurm_two_task_job_trains_with_both_ranks_one_set_of_outputs(tmp_path, mlflow_uri):
    sweep_dir = tmp_path / "multirun"
    check(run_train(["-m", *slurm_launcher(tasks_per_node=2), *SWEEP_TINY, "codebook.n_embed=32",
                     "trainer.max_steps=6", "trainer.val_every=6", "trainer.ckpt_every=6",
                     "logger.log_checkpoint=false", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=900))
    job = sweep_dir / "0"
    err = {rank: job_log(sweep_dir, f"*_{rank}_log.err") for rank in (0, 1)}
    for rank in (0, 1):  # both tasks joined one gloo world and trained in rank 0's run directory
        assert f"rank {rank}/2: training in {job}" in err[rank], err[rank][-3000:]
        assert list(sweep_dir.glob(f".submitit/*/*_{rank}_result.pkl"))
    parent, children = sweep_runs(mlflow_uri, sweep_info(sweep_dir)["sweep_id"])
    assert len(children) == 1 and children[0].data.tags["vqt.world_size"] == "2"
    assert children[0].info.status == "FINISHED" and parent.info.status == "FINISHED"
    # one set of outputs: rank 1 wrote no .hydra/ of its own, no log lines, no checkpoint, no MLflow run
    assert sorted(p.name for p in job.iterdir()) == [".hydra", "checkpoints", "train.log"]
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["last.ckpt"]
    assert (job / "train.log").read_text().count("Job completed successfully") == 1  # rank 0's line only
    assert "finished 6 steps" in job_log(sweep_dir, "*_0_log.out")
    assert "finished 6 steps" not in job_log(sweep_dir, "*_1_log.out")


def _start_sweep(tmp_path: Path, steps: int, ckpt_every: int) -> tuple[subprocess.Popen, Path]:
    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *slurm_launcher(timeout_min=60), *SWEEP_TINY,
           "codebook.n_embed=32", f"trainer.max_steps={steps}", f"trainer.val_every={steps}",
           f"trainer.ckpt_every={ckpt_every}", "logger.log_checkpoint=false", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, sweep_dir


def _progress(sweep_dir: Path) -> int:
    """The last training step the job's progress bar reported (0 before training)."""
    found = re.findall(r"(\d+)/\d+ \[", job_log(sweep_dir, "*_0_log.err"))
    return int(found[-1]) if found else 0


def _job_id(sweep_dir: Path) -> str:
    """The Slurm job id of the sweep's only job (submitit's log folder: JOBID, or ARRAYJOB_0 in an array)."""
    ids = [p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+(_0)?", p.name)]
    assert len(ids) == 1, ids
    return ids[0]


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"sweep did not finish:\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-6000:]
    return out


@slurm
def test_slurm_preempted_job_resumes_at_the_same_step_in_the_same_run(tmp_path, mlflow_uri):
    """USR2 (Slurm's warning before the limit / preemption): checkpoint at the end of the step, submitit
    requeues, the job resumes in the same directory and MLflow run from that step: every step once."""
    steps = 150
    proc, sweep_dir = _start_sweep(tmp_path, steps, ckpt_every=1000)
    try:
        wait_for(lambda: _progress(sweep_dir) >= 3, 300, "training to start")
        subprocess.run(["scancel", "--signal=USR2", _job_id(sweep_dir)], check=True)
        out = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = job_log(sweep_dir, "*_0_log.*")
    assert "this job is preempted" in log and "Requeued job" in log, log[-4000:]
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert len(resumed) == 1 and 3 <= int(resumed[0][1]) < steps, log[-4000:]
    parent, (child,) = sweep_runs(mlflow_uri, sweep_info(sweep_dir)["sweep_id"])
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED", out[-3000:]
    assert child.data.tags["vqt.output_dir"] == str(sweep_dir / "0")
    assert child.data.tags["vqt.checkpoint_step"] == str(steps)
    # the same run before and after: each step logged exactly once, no gap at the preemption
    key = next(k for k in child.data.metrics if k.startswith("loss/"))
    assert metric_steps(mlflow_uri, child.info.run_id, key) == list(range(1, steps + 1))


@slurm
def test_slurm_killed_job_restarts_from_its_last_checkpoint(tmp_path, mlflow_uri):
    """A job requeued from outside (`scontrol requeue`, as after a node failure) starts again
    (SLURM_RESTART_COUNT > 0) from its last checkpoint, in the same MLflow run. Slurm sends SIGTERM
    5 s before SIGKILL: the loop checkpoints at the end of that step, so the job resumes there; had
    SIGKILL come first, it resumes from the last periodic checkpoint."""
    steps, every = 200, 10  # enough steps left for Slurm's 5 s between SIGTERM and SIGKILL
    proc, sweep_dir = _start_sweep(tmp_path, steps, ckpt_every=every)
    try:
        wait_for(lambda: _progress(sweep_dir) >= every + 2, 300, "the first checkpoint")
        subprocess.run(["scontrol", "requeue", _job_id(sweep_dir)], check=True)
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = job_log(sweep_dir, "*_0_log.*")
    resumed = re.findall(r"resumed from \S+ at step (\d+)", log)
    assert "SLURM_RESTART_COUNT=1" in log and len(resumed) == 1, log[-4000:]
    at = int(resumed[0])
    stopped = re.findall(r"stopped by SIGTERM at step (\d+) \(checkpoint: \S+, step (\d+)\)", log)
    if stopped:  # the SIGTERM checkpoint, written at the end of the step the signal arrived in
        assert len(stopped) == 1 and int(stopped[0][0]) == int(stopped[0][1]) == at, (stopped, at)
    else:  # killed before the end of that step: the last periodic checkpoint
        assert at % every == 0, log[-4000:]
    assert every <= at < steps, log[-4000:]
    parent, (child,) = sweep_runs(mlflow_uri, sweep_info(sweep_dir)["sweep_id"])
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"
    key = next(k for k in child.data.metrics if k.startswith("loss/"))
    logged = metric_steps(mlflow_uri, child.info.run_id, key)
    assert set(logged) == set(range(1, steps + 1))  # steps after the checkpoint ran (and were logged) again
