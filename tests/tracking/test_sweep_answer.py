"""Sweeps a researcher can read: the callback records which config keys each swept axis changes, names
every child after its swept overrides (with a description), and `evaluate.py sweep_id=` with the offline
switch (eval.standin=true) puts the answer on the parent run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from omegaconf import flag_override

from tests.conftest import ROOT, run_train
from tests.test_sweeps import SWEEP_TINY, check, client, compose, sweep_info, sweep_runs


def _with_task(cfg, task: list[str]):
    with flag_override(cfg, ["readonly", "struct"], [False, False]):
        cfg.hydra.overrides.task = task
    return cfg


def test_varying_keys_per_axis_from_the_composed_jobs():
    from vqtransformer.tracking.sweep import job_overrides, varying_keys

    cfg = _with_task(compose(["experiment=codebook_ablation"]),
                     ["experiment=codebook_ablation", "codebook=k256,k1024,fsq_1k", "first_stage.ch=32,64"])
    assert len(job_overrides(cfg)) == 6  # the command line's codebook=... replaces the preset's list
    v = varying_keys(cfg)
    assert v["first_stage.ch"] == ["first_stage.ch"]
    # learned VQ sizes differ in n_embed only (one embed_dim for every preset); FSQ also changes kind and levels
    assert v["codebook"] == ["codebook.kind", "codebook.levels", "codebook.n_embed"]
    vq_only = _with_task(compose(["experiment=codebook_ablation"]), ["codebook=k256,k1024,k4096"])
    assert varying_keys(vq_only) == {"codebook": ["codebook.n_embed"]}


def test_child_run_name_and_description_from_the_swept_overrides():
    from vqtransformer.tracking.sweep import MLflowSweepCallback, run_name_for

    groups = {"codebook", "stage", "data"}
    assert run_name_for(["codebook=k1024", "trainer.max_steps=5"], ["codebook"], groups) == "k1024"
    assert run_name_for(["codebook=fsq_1k", "transformer.n_layer=4", "x=1"], ["codebook", "transformer.n_layer"],
                        groups) == "fsq_1k, n_layer=4"
    cb = MLflowSweepCallback()
    cb.sweep_id, cb.parent_run_id = "S", "P"
    cb.axes, cb.varying = ["codebook"], {"codebook": ["codebook.n_embed"]}
    job = compose(["codebook=k1024", "trainer.max_steps=5"])
    job = _with_task(job, ["codebook=k1024", "trainer.max_steps=5"])
    name, note = cb.job_name_and_note(job)
    assert name == "k1024"
    assert "`codebook=k1024`" in note and "`codebook.n_embed=1024`" in note and "`trainer.max_steps=5`" in note
    assert "python evaluate.py sweep_id=S" in note


def test_sweep_children_named_and_scored_offline_with_the_answer_on_the_parent(tmp_path, mlflow_uri):
    """A 2-job sweep (VQ vs FSQ), then `evaluate.py sweep_id=ID eval.standin=true` (docs/evaluation.md); the
    stand-in features instead of the shapes judge that the switch keeps on data=shapes (it trains for minutes)."""
    sweep_dir = tmp_path / "multirun"
    check(run_train(["-m", *SWEEP_TINY, "codebook=k256,fsq_1k", "trainer.max_steps=2", "trainer.val_every=2",
                     "trainer.ckpt_every=2", "logger.log_checkpoint=false", f"hydra.sweep.dir={sweep_dir}"],
                    cwd=tmp_path, timeout=600))
    info = sweep_info(sweep_dir)
    assert info["varying"] == {"codebook": ["codebook.kind", "codebook.levels", "codebook.n_embed"]}
    parent, children = sweep_runs(mlflow_uri, info["sweep_id"])
    assert json.loads(parent.data.tags["vqt.sweep_varying"]) == info["varying"]
    assert [r.info.run_name for r in children] == ["k256", "fsq_1k"]
    note = children[1].data.tags["mlflow.note.content"]
    assert "`codebook=fsq_1k`" in note and "`codebook.kind=fsq`" in note and info["sweep_id"] in note
    assert children[1].data.params["codebook.kind"] == "fsq"
    ev = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"sweep_id={info['sweep_id']}", "device=cpu",
                         "eval.standin=true", "eval.feature_network=standin", "eval.small_n=warn", "eval.batch_size=32", "+eval.data.val_size=32",
                         "eval.metrics=[rfid,psnr,l1,codebook]"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "OMP_NUM_THREADS": "1", "VQT_OFFLINE": "1",
                             "VQT_CACHE": str(tmp_path / "cache")})
    check(ev)
    p = client(mlflow_uri).get_run(parent.info.run_id)
    assert p.data.tags["best_run"] in ("k256", "fsq_1k") and p.data.tags["best_metric"] == "standin/rfid"
    assert p.data.tags["vqt.sweep_confounds"] == "none"
    assert {"best/standin/rfid", "best/psnr", "best/codebook_usage"} <= set(p.data.metrics)
    assert "Which is best?" in p.data.tags["mlflow.note.content"]
    for r in children:
        m = client(mlflow_uri).get_run(r.info.run_id).data.metrics
        assert "eval/standin/rfid" in m and 0 < m["eval/codebook_usage"] <= 1


def test_confound_warning_when_two_children_differ_in_two_keys():
    from vqtransformer.evaluation import compare

    recs = [{"run_id": "a", "run_name": "k256", "metrics": {"psnr": 20.0},
             "params": {"codebook.n_embed": "256", "codebook.embed_dim": "64", "data.name": "shapes"}},
            {"run_id": "b", "run_name": "k1024", "metrics": {"psnr": 21.0},
             "params": {"codebook.n_embed": "1024", "codebook.embed_dim": "256", "data.name": "shapes"}}]
    assert compare.confounds(recs, {"codebook.n_embed"}) == ["codebook.embed_dim"]
    assert compare.confounds(recs, {"codebook.n_embed", "codebook.embed_dim"}) == []
    # no record (an older parent): a swept key counts as itself, a swept group as all of its keys
    assert compare.confounds(recs, None, ["codebook.n_embed"]) == ["codebook.embed_dim"]
    assert compare.confounds(recs, None, ["codebook"]) == []
    # a second stage's first-stage record follows the swept first stage
    t = [{"params": {"first_stage.ckpt": c, "first_stage.codebook.size": k, "transformer.vocab_size": k}}
         for c, k in (("a.ckpt", "256"), ("b.ckpt", "1024"))]
    assert compare.confounds(t, {"first_stage.ckpt"}) == []
    best = compare.best_runs(recs)
    assert best["psnr"]["run_name"] == "k1024" and best["psnr"]["direction"] == "higher"
    assert [r["run_name"] for r in compare.sort_records(recs)] == ["k1024", "k256"]
