"""evaluate.py end to end on a tiny VQGAN checkpoint and a throwaway MLflow store (stand-in features),
its bad-input paths (clear error, nothing logged), sweeps, and generators through evaluate_stage."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import vqtransformer.config  # noqa: F401  (resolvers)
from vqtransformer.cli import is_user_error
from vqtransformer.evaluation import EvaluationError, evaluate_stage
from vqtransformer.stages.base import Stage

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


def _load_evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ev_script = _load_evaluate()


def train_cfg(n_embed: int):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["stage=vqgan", "logger=none", "data=shapes", "data.val_size=80",
                                            "first_stage.ch=32", f"codebook.n_embed={n_embed}"])


def eval_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("evaluate", overrides=["device=cpu", "eval.feature_network=standin", "eval.batch_size=40",
                                              "eval.metrics=[rfid,psnr,ssim,ms_ssim,l1,codebook]", *overrides])


def save_checkpoint(cfg, path: Path, step: int = 7, run_id: str | None = None) -> Path:
    from vqtransformer.loading import build_stage
    from vqtransformer.training.checkpoint import FORMAT, atomic_save

    torch.manual_seed(0)
    stage = build_stage(cfg, for_inference=True)
    return atomic_save({"format": FORMAT, "stage": "vqgan", "config": OmegaConf.to_container(cfg, resolve=True),
                        "model": stage.state_dict(), "step": step, "mlflow_run_id": run_id}, path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store with: a run with a checkpoint, a run without, and a sweep (parent, 2 finished, 1 running)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from vqtransformer.tracking.mlflow_tracker import flatten

    root = tmp_path_factory.mktemp("eval_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("vqgan", artifact_location=(root / "artifacts").as_uri())

    def new_run(name, n_embed=None, tags=None, status="FINISHED"):
        run = client.create_run(exp, run_name=name, tags=tags or {})
        rid = run.info.run_id
        if n_embed is not None:
            cfg = train_cfg(n_embed)
            ckpt = save_checkpoint(cfg, root / name / "checkpoints" / "last.ckpt", run_id=rid)
            params = flatten(OmegaConf.to_container(cfg, resolve=True))
            client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
            client.set_tag(rid, "vqt.checkpoint", str(ckpt))
        client.set_terminated(rid, status=status)
        return rid

    ids = {"good": new_run("good", 64), "nockpt": new_run("nockpt")}
    parent = new_run("sweep-parent", tags={"vqt.sweep_id": "S1", "vqt.role": "parent"}, status="RUNNING")
    child = {"vqt.sweep_id": "S1", "vqt.parent_run_id": parent, "mlflow.parentRunId": parent}
    ids.update(parent=parent, c32=new_run("c32", 32, child), c128=new_run("c128", 128, child),
               running=new_run("c-running", 16, child, status="RUNNING"))
    return {"uri": uri, "client": client, "ids": ids, "root": root}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def eval_logged(store, rid):
    return {k: v for k, v in store["client"].get_run(rid).data.metrics.items() if k.startswith("eval/")}


def test_scores_a_run_and_logs_metrics_tags_and_summary(store):
    rid = store["ids"]["good"]
    ev_script.run(eval_cfg(f"run_id={rid}", f"tracking_uri={store['uri']}"))
    client = store["client"]
    run = client.get_run(rid)
    m = eval_logged(store, rid)
    assert {"eval/standin/rfid", "eval/psnr", "eval/ssim", "eval/l1", "eval/codebook_usage", "eval/perplexity",
            "eval/dead_codes", "eval/codebook_size"} <= set(m)
    assert "eval/rfid" not in m  # stand-in numbers never under the Inception name
    assert m["eval/codebook_size"] == 64 and 0 < m["eval/codebook_usage"] <= 100 and m["eval/standin/rfid"] > 0
    assert run.data.tags["eval.feature_network"] == "standin"
    assert run.data.tags["eval.comparable_to_published"] == "false"
    assert "ms_ssim skipped" in run.data.tags["eval.notes"]
    hist = client.get_metric_history(rid, "eval/psnr")
    assert hist[0].step == 7  # the checkpoint's step
    arts = {a.path for a in client.list_artifacts(rid, "eval")}
    assert arts == {"eval/summary-standin.json", "eval/code_histogram.png"}
    summary = json.loads((store["root"] / "good" / "eval" / "summary-standin.json").read_text())
    assert summary["metrics"]["psnr"] == pytest.approx(m["eval/psnr"])
    assert summary["protocol"]["num_real"] == 80 and summary["real_stats"]["hit"] is False
    # which real images were scored: the shapes validation split, 80 items, with its per-class counts
    split = summary["split"]
    assert split["name"] == "val" and split["size"] == 80 and split["rule"].startswith("procedural")
    assert sum(int(kv.split(":")[1]) for kv in split["per_class"].split(",")) == 80
    assert run.data.tags["eval.split.size"] == "80" and run.data.tags["eval.split.per_class"] == split["per_class"]
    # a second evaluation reads the cached real statistics and gives the same numbers
    ev_script.run(eval_cfg(f"run_id={rid}", f"tracking_uri={store['uri']}", "eval.metrics=[rfid]"))
    again = json.loads((store["root"] / "good" / "eval" / "summary-standin.json").read_text())
    assert again["real_stats"]["hit"] is True and again["metrics"] == {"standin/rfid": m["eval/standin/rfid"]}


def test_ckpt_path_logs_to_the_run_recorded_in_the_checkpoint(store):
    rid = store["ids"]["c32"]
    ckpt = store["root"] / "c32" / "checkpoints" / "last.ckpt"
    ev_script.run(eval_cfg(f"ckpt={ckpt}", f"tracking_uri={store['uri']}", "eval.metrics=[psnr]"))
    assert set(eval_logged(store, rid)) >= {"eval/psnr"}


def _assert_error_and_nothing_logged(store, rid, match, *overrides):
    before = eval_logged(store, rid) if rid else None
    with pytest.raises(Exception, match=match) as e:
        ev_script.run(eval_cfg(*overrides, f"tracking_uri={store['uri']}"))
    assert is_user_error(e.value)
    if rid:
        assert eval_logged(store, rid) == before


def test_run_that_does_not_exist(store):
    _assert_error_and_nothing_logged(store, None, "no such MLflow run", "run_id=0123456789abcdef")


def test_run_without_checkpoint(store):
    rid = store["ids"]["nockpt"]
    _assert_error_and_nothing_logged(store, rid, "has no checkpoint", f"run_id={rid}")


def test_generator_metric_of_a_vqgan(store):
    rid = store["ids"]["c128"]
    _assert_error_and_nothing_logged(store, rid, "'is'.*first stage", f"run_id={rid}", "eval.metrics=[psnr,is]")


def test_too_few_images_for_the_feature_covariance(store):
    rid = store["ids"]["c128"]
    _assert_error_and_nothing_logged(store, rid, "at least 65", f"run_id={rid}", "eval.num_real=30")


def test_weights_with_wrong_hash(store, tmp_path):
    rid = store["ids"]["c128"]
    bad = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    bad.write_bytes(b"\0" * 100)
    _assert_error_and_nothing_logged(store, rid, "expected prefix 6726825d", f"run_id={rid}",
                                     "eval.feature_network=inception", f"eval.feature_weights={bad}")


def test_cli_exits_nonzero_with_a_clear_message(store):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "run_id=feedbeef", f"tracking_uri={store['uri']}",
                        "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "run_id=feedbeef: no such MLflow run" in p.stderr and "Traceback" not in p.stderr


def test_sweep_scores_finished_children_and_reports_to_the_parent(store, monkeypatch):
    ids, client = store["ids"], store["client"]
    ev_script.run(eval_cfg("sweep_id=S1", f"tracking_uri={store['uri']}"))
    for c in ("c32", "c128"):
        assert "eval/standin/rfid" in eval_logged(store, ids[c])
    assert eval_logged(store, ids["running"]) == {}
    arts = {a.path for a in client.list_artifacts(ids["parent"], "eval")}
    assert {"eval/comparison.csv", "eval/comparison.md", "eval/codebook_size.png", "eval/skipped.txt"} <= arts
    md = Path(client.download_artifacts(ids["parent"], "eval/comparison.md")).read_text()
    assert "codebook.n_embed" in md and "c32" in md and "c128" in md and "c-running" not in md
    # a second pass reuses the logged numbers: nothing is recomputed
    monkeypatch.setattr(ev_script, "score_checkpoint", lambda *a, **k: pytest.fail("recomputed"))
    ev_script.run(eval_cfg("sweep_id=S1", f"tracking_uri={store['uri']}"))
    rows = {r["run_name"]: r for r in csv.DictReader(open("outputs/eval/sweep-S1/comparison.csv"))}
    assert set(rows) == {"c32", "c128"} and all(float(r["standin/rfid"]) > 0 for r in rows.values())
    assert {r["codebook.n_embed"] for r in rows.values()} == {"32", "128"}


def test_sweep_answer_on_the_parent_run(store):
    """After `evaluate.py sweep_id=`: best/... metrics, a best_run tag, a description with the sorted table and a
    deep link to the runs view, the comparison files at the artifact root; a confound is warned about there."""
    from urllib.parse import parse_qs, urlsplit

    ids, client = store["ids"], store["client"]
    client.set_tag(ids["parent"], "vqt.sweep_varying", json.dumps({"first_stage.ch": ["first_stage.ch"]}))
    ev_script.run(eval_cfg("sweep_id=S1", f"tracking_uri={store['uri']}"))
    p = client.get_run(ids["parent"])
    # children differ in codebook.n_embed, but the record says the sweep varied first_stage.ch only
    assert p.data.tags["vqt.sweep_confounds"] == "codebook.n_embed"
    assert "differ in more than the swept keys" in p.data.tags["mlflow.note.content"]
    client.set_tag(ids["parent"], "vqt.sweep_varying", json.dumps({"codebook": ["codebook.n_embed"]}))
    ev_script.run(eval_cfg("sweep_id=S1", f"tracking_uri={store['uri']}"))
    p = client.get_run(ids["parent"])
    t, m = p.data.tags, p.data.metrics
    assert t["vqt.sweep_confounds"] == "none"
    children = {ids["c32"]: "c32", ids["c128"]: "c128"}
    rfid = {name: client.get_run(rid).data.metrics["eval/standin/rfid"] for rid, name in children.items()}
    psnr = {name: client.get_run(rid).data.metrics["eval/psnr"] for rid, name in children.items()}
    assert t["best_metric"] == "standin/rfid" and t["best_run"] == min(rfid, key=rfid.get)
    assert children[t["best_run_id"]] == t["best_run"]
    assert m["best/standin/rfid"] == pytest.approx(min(rfid.values()))
    assert m["best/psnr"] == pytest.approx(max(psnr.values()))
    note = t["mlflow.note.content"]
    assert f"`{t['best_run']}`" in note and "lower is better" in note and "not comparable to published" in note
    first, second = sorted(rfid, key=rfid.get)
    assert note.index(f"| {first} |") < note.index(f"| {second} |")  # the table, best first
    q = parse_qs(urlsplit(t["vqt.runs_view_url"]).fragment.split("?", 1)[1])
    assert q["searchFilter"] == [f"tags.`vqt.parent_run_id` = '{ids['parent']}'"]
    # the swept key, codebook.n_embed, through its numeric twin (the runs view sorts params as strings)
    assert q["orderByKey"] == ["metrics.`eval/codebook_size`"] and q["orderByAsc"] == ["true"]
    assert f"/#/experiments/{p.info.experiment_id}/runs?" in t["vqt.runs_view_url"] and t["vqt.runs_view_url"] in note
    root = {a.path for a in client.list_artifacts(ids["parent"])}
    assert {"comparison.csv", "comparison.md", "codebook_size.png", "eval"} <= root
    md = Path(client.download_artifacts(ids["parent"], "comparison.md")).read_text()
    assert "(stand-in numbers)" in md.splitlines()[0] and "↓ lower is better" in md


def test_exactly_one_target():
    with pytest.raises(EvaluationError, match="exactly one of"):
        ev_script.run(eval_cfg())
    with pytest.raises(EvaluationError, match="exactly one of"):
        ev_script.run(eval_cfg("run_id=a", "sweep_id=b"))


# -- generators through evaluate_stage (a stand-in generator stage) -------------
class FakeGenerator(Stage):
    """Returns seeded random images; records the class labels and seeds it was asked for."""

    name = "vitgan"
    capabilities = frozenset({"sample"})
    condition_type = "class"  # declared, as the Stage interface has it (the config is not read)
    num_classes = 6

    def __init__(self, cfg, nll=False):
        super().__init__(cfg)
        self.asked: list[torch.Tensor] = []
        self.seeds: list[int] = []
        self.net = torch.nn.Conv2d(3, 3, 1)
        if nll:
            self.capabilities = frozenset({"sample", "nll"})
            self.nll = lambda batch: torch.full((batch["image"].shape[0], 16), 2.0)

    def setup(self, accelerator):
        return []

    def training_step(self, batch, step, opt_idx):
        raise NotImplementedError

    def trainable_modules(self):
        return {"net": self.net}

    def validate(self, batch):
        return {}

    sampling_options = ("cfg_scale",)

    def sample(self, n, condition=None, seed=0, **kwargs):
        if condition is not None:
            self.asked.append(condition.clone())
        self.seeds.append(seed)
        self.options = kwargs
        return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen_cfg(stage_name: str):
    cfg = train_cfg(64)
    OmegaConf.set_struct(cfg, False)
    return OmegaConf.merge(cfg, {"stage": {"name": stage_name}, "conditioning": {"type": "class", "num_classes": 6}})


def test_class_conditional_generator_is_sampled_class_balanced(tmp_path):
    cfg = gen_cfg("vitgan")
    stage = FakeGenerator(cfg)
    ev = eval_cfg("eval.metrics=null", "eval.num_samples=90", "eval.kid_subset_size=50", "eval.kid_subsets=5",
                  "eval.is_splits=3").eval
    s = evaluate_stage(stage, cfg, ev, torch.device("cpu"), tmp_path)
    counts = torch.bincount(torch.cat(stage.asked), minlength=6)
    assert counts.tolist() == [15] * 6
    assert len(stage.seeds) == 3 and len(set(stage.seeds)) == 3  # batches of 40: each its own seed
    assert set(s["metrics"]) == {"standin/fid", "standin/is_mean", "standin/is_std", "standin/kid_mean",
                                 "standin/kid_std"}
    assert s["metrics"]["standin/fid"] > 0 and s["protocol"]["num_samples"] == 90
    assert any("KID subset size reduced" in n for n in s["notes"]) is False  # 50 <= 80 and 90


def test_eval_sampling_replaces_the_runs_sampling_options_and_is_noted(tmp_path):
    cfg = gen_cfg("vitgan")
    stage = FakeGenerator(cfg)
    ev = eval_cfg("eval.metrics=[fid]", "eval.num_samples=90", "eval.sampling={cfg_scale:3}").eval
    s = evaluate_stage(stage, cfg, ev, torch.device("cpu"), tmp_path)
    assert stage.options == {"cfg_scale": 3} and any("cfg_scale=3 (eval.sampling)" in n for n in s["notes"])
    stage = FakeGenerator(cfg)
    evaluate_stage(stage, cfg, eval_cfg("eval.metrics=[fid]", "eval.num_samples=90").eval, torch.device("cpu"),
                   tmp_path)
    assert stage.options == {}  # by default the run's own options
    with pytest.raises(EvaluationError, match="eval.sampling.steps: stage 'vitgan' takes sampling options cfg_scale"):
        evaluate_stage(FakeGenerator(cfg), cfg, eval_cfg("eval.metrics=[fid]", "eval.sampling={steps:5}").eval,
                       torch.device("cpu"), tmp_path)


def test_transformer_reports_nll_and_bits_per_dim(tmp_path):
    cfg = gen_cfg("transformer")
    stage = FakeGenerator(cfg, nll=True)
    stage.name = "transformer"
    ev = eval_cfg("eval.metrics=[nll]").eval
    s = evaluate_stage(stage, cfg, ev, torch.device("cpu"), tmp_path)
    assert s["metrics"]["nll"] == pytest.approx(2.0)
    assert s["metrics"]["bpd"] == pytest.approx(2.0 * 16 / (3 * 32 * 32 * 0.6931471805599453))
    with pytest.raises(EvaluationError, match="'nll' needs a likelihood"):
        evaluate_stage(FakeGenerator(cfg), cfg, ev, torch.device("cpu"), tmp_path)
