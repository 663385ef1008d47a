"""Score trained models under the fixed protocol (docs/evaluation.md).

    python evaluate.py run_id=ID            # one MLflow run (its checkpoint); metrics logged back as eval/...
    python evaluate.py ckpt=PATH            # one checkpoint file
    python evaluate.py sweep_id=ID          # every finished run of a sweep + comparison table and plots
    python evaluate.py experiment=NAME      # every finished run of an MLflow experiment

Everything is computed before anything is logged: a failure leaves MLflow untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import vqtransformer.config  # noqa: F401  (registers the config resolvers)
from vqtransformer.cli import is_user_error, run_or_exit

log = logging.getLogger("evaluate")



def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _eval_cfg(cfg: DictConfig) -> DictConfig:
    ev = cfg.eval.copy()
    if os.environ.get("VQT_OFFLINE", "0") == "1":
        ev.download = False
    return ev


def _run_dir(ckpt: Path, run=None) -> Path:
    """Where the run's outputs live: tag vqt.output_dir if it is here, else the checkpoint's run directory."""
    tagged = run.data.tags.get("vqt.output_dir") if run is not None else None
    if tagged and Path(tagged).is_dir():
        return Path(tagged)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _get_run(client, run_id: str):
    from vqtransformer.evaluation import EvaluationError

    try:
        return client.get_run(run_id)
    except Exception as e:  # noqa: BLE001
        raise EvaluationError(f"run_id={run_id}: no such MLflow run in {client.tracking_uri} "
                              "(check the id, or tracking_uri / $MLFLOW_TRACKING_URI)") from e


def _request_id(ev: DictConfig, ckpt: Path) -> str:
    """What an evaluation depends on besides the code: eval.* and the checkpoint file (path, size, mtime)."""
    keys = {k: v for k, v in OmegaConf.to_container(ev, resolve=True).items()
            if k not in ("batch_size", "sample_batch_size", "num_workers", "download", "reuse")}
    st = ckpt.stat()
    blob = json.dumps({"eval": keys, "ckpt": [str(ckpt.resolve()), st.st_size, st.st_mtime_ns]}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def score_checkpoint(ckpt: Path, ev: DictConfig, device, run=None, taming_yaml: str | None = None) -> dict:
    """Evaluate one checkpoint (``taming_yaml``: the project YAML of a taming-transformers file); returns a
    pending result (summary + files), nothing logged yet."""
    from vqtransformer.evaluation import evaluate_stage, format_table, write_summary
    from vqtransformer.loading import load_stage

    loaded = load_stage(ckpt, taming_yaml=taming_yaml)
    out_dir = _run_dir(ckpt, run) / "eval"
    summary = evaluate_stage(loaded.stage, loaded.config, ev, device, out_dir)
    summary.update(checkpoint=str(ckpt), step=loaded.step, run_id=run.info.run_id if run else loaded.mlflow_run_id,
                   request_id=_request_id(ev, ckpt))
    path = write_summary(summary, out_dir)
    print(format_table(summary, title=f"{ckpt}"), flush=True)
    print(f"summary: {path}", flush=True)
    return {"summary": summary, "files": [str(path), *summary["artifacts"]], "run_id": summary["run_id"]}


def log_result(client, result: dict) -> None:
    """One log_batch per run (metrics eval/..., tags eval.*), after its artifacts."""
    from mlflow.entities import Metric, RunTag

    s, run_id = result["summary"], result["run_id"]
    for f in result["files"]:
        client.log_artifact(run_id, f, "eval")
    ts = int(time.time() * 1000)
    metrics = [Metric(f"eval/{k}", float(v), ts, int(s["step"])) for k, v in s["metrics"].items()]
    tags = {"eval.feature_network": s["feature_network"] or "none",
            "eval.feature_network_identity": s["feature_network_identity"] or "none",
            "eval.comparable_to_published": str(s["comparable_to_published"]).lower(),
            "eval.protocol_id": s["protocol_id"], "eval.protocol": json.dumps(s["protocol"], sort_keys=True),
            "eval.request_id": s["request_id"], "eval.checkpoint": s["checkpoint"],
            "eval.notes": " | ".join(s["notes"]) or "-", "eval.metric_keys": ",".join(s["metrics"])}
    tags.update({f"eval.split.{k}": v for k, v in (s.get("split") or {}).items()})  # which images were scored
    client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    log.info("logged %d eval metrics to run %s", len(metrics), run_id)


def _reused(run, ev: DictConfig) -> dict | None:
    """A run's earlier eval/ metrics, if they were made for this checkpoint and protocol."""
    tags = run.data.tags
    ckpt = tags.get("vqt.checkpoint")
    if not ev.reuse or not ckpt or not Path(ckpt).is_file() or tags.get("eval.request_id") is None:
        return None
    if tags["eval.request_id"] != _request_id(ev, Path(ckpt)):
        return None
    keys = tags.get("eval.metric_keys", "").split(",")  # only this evaluation's keys, not older ones
    metrics = {k: run.data.metrics[f"eval/{k}"] for k in keys if f"eval/{k}" in run.data.metrics}
    return metrics or None


def evaluate_one(cfg: DictConfig, ev: DictConfig, device) -> int:
    from vqtransformer.loading import checkpoint_path
    from vqtransformer.tracking import get_client, resolve_tracking_uri

    run = _get_run(get_client(cfg.tracking_uri), cfg.run_id) if cfg.run_id else None
    ckpt = checkpoint_path(cfg.ckpt, cfg.run_id, cfg.tracking_uri)
    result = score_checkpoint(ckpt, ev, device, run, cfg.get("taming_config"))
    if not cfg.log_to_mlflow:
        return 0
    if not result["run_id"]:
        log.warning("no MLflow run for %s: results not logged (set run_id=...)", ckpt)
        return 0
    uri = resolve_tracking_uri(cfg.tracking_uri)
    if run is None and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        log.warning("checkpoint's MLflow run %s: no store at %s; results not logged (set run_id=...)",
                    result["run_id"], uri)
        return 0
    client = get_client(uri)
    if run is None:  # ckpt=PATH: the run recorded in the checkpoint must exist in this store
        try:
            client.get_run(result["run_id"])
        except Exception:  # noqa: BLE001
            log.warning("checkpoint's MLflow run %s is not in %s: results not logged (set run_id=...)",
                        result["run_id"], client.tracking_uri)
            return 0
    log_result(client, result)
    return 0


def _sweep_runs(client, cfg: DictConfig):
    """(parent run or None, finished child runs, skipped runs) of sweep_id / experiment."""
    from vqtransformer.evaluation import EvaluationError

    if cfg.sweep_id:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exp_ids, filter_string=f"tags.`vqt.sweep_id` = '{cfg.sweep_id}'", max_results=5000)
        what = f"sweep_id={cfg.sweep_id}"
    else:
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise EvaluationError(f"experiment={cfg.experiment}: no such MLflow experiment in {client.tracking_uri}")
        runs = client.search_runs([exp.experiment_id], max_results=5000)
        what = f"experiment={cfg.experiment}"
    parents = [r for r in runs if r.data.tags.get("vqt.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("vqt.role") != "parent"]
    finished = [r for r in children if r.info.status == "FINISHED"]
    skipped = [r for r in children if r.info.status != "FINISHED"]
    if not finished:
        raise EvaluationError(f"{what}: no FINISHED runs to evaluate in {client.tracking_uri} "
                              f"({len(children)} runs, {len(parents)} parent runs)")
    parent = parents[0] if len(parents) == 1 else None
    if parent is None and cfg.experiment:
        ids = {r.data.tags.get("vqt.parent_run_id") for r in finished}
        if len(ids) == 1 and None not in ids:
            parent = next((r for r in parents if r.info.run_id in ids), None)
    return parent, sorted(finished, key=lambda r: r.info.start_time or 0), skipped


def _output_dir() -> Path:
    """Hydra's run directory (outputs/eval/<date>/<time>); outputs/eval outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path("outputs/eval")


def evaluate_sweep(cfg: DictConfig, ev: DictConfig, device) -> int:
    from vqtransformer.evaluation import EvaluationError, compare
    from vqtransformer.loading import resolve_run_checkpoint
    from vqtransformer.tracking import get_client

    client = get_client(cfg.tracking_uri)
    parent, runs, skipped = _sweep_runs(client, cfg)
    log.info("%d finished runs to evaluate (%d not finished, skipped)", len(runs), len(skipped))
    pending, records, failed = [], [], []
    for i, run in enumerate(runs):
        rid, name = run.info.run_id, run.info.run_name
        log.info("[%d/%d] run %s (%s)", i + 1, len(runs), name, rid)
        metrics = _reused(run, ev)
        try:
            if metrics is None:
                result = score_checkpoint(resolve_run_checkpoint(rid, cfg.tracking_uri), ev, device, run)
                result["run_id"] = rid
                pending.append(result)
                metrics = result["summary"]["metrics"]
            else:
                log.info("run %s: eval metrics for this checkpoint and protocol exist; reused", rid)
        except Exception as e:
            if not cfg.sweep.skip_failed or not is_user_error(e):
                hint = ("every run needs these weights: put them in place as the message says, or score offline "
                        "with eval.standin=true (labelled stand-in networks)" if _missing_weights(e) else
                        "sweep.skip_failed=true skips runs that cannot be evaluated")
                raise EvaluationError(f"run {name} ({rid}): {e}\n(nothing was logged; {hint})") from e
            log.error("run %s (%s) skipped: %s", name, rid, e)
            failed.append(f"{name} ({rid}): {e}")
            continue
        records.append({"run_id": rid, "run_name": name, "params": dict(run.data.params), "metrics": metrics})

    label = cfg.sweep_id or cfg.experiment
    out_dir = _output_dir() / f"sweep-{label}"
    plots = OmegaConf.to_container(cfg.sweep.plots, resolve=True)
    files = compare.write_report(records, out_dir, title=f"evaluation of {label}", plots=plots)
    swept, axes = _swept_keys(parent)
    confounded = compare.confounds(records, swept, axes)
    if confounded:
        log.warning("the runs of %s differ in more than the swept keys: %s also differ (swept: %s). Their "
                    "comparison mixes these effects.", label, ", ".join(confounded),
                    ", ".join(sorted(swept)) if swept is not None else ", ".join(axes) or "nothing recorded")
    if failed or skipped:
        (out_dir / "skipped.txt").write_text("\n".join(
            [f"not finished: {r.info.run_name} ({r.info.run_id}, {r.info.status})" for r in skipped] +
            [f"failed: {f}" for f in failed]) + "\n")
        files.append(out_dir / "skipped.txt")
    print((out_dir / "comparison.md").read_text(), flush=True)
    print(f"report: {out_dir}", flush=True)
    if cfg.log_to_mlflow:  # everything computed: now log, children first, then the parent's report
        for result in pending:
            log_result(client, result)
        if parent is not None:
            for f in files:
                client.log_artifact(parent.info.run_id, str(f), "eval")
                client.log_artifact(parent.info.run_id, str(f))  # and at the artifact root: the run page shows them
            log_answer(client, parent, records, label, swept, axes, confounded, cfg.tracking_uri)
            log.info("comparison logged to the sweep's parent run %s", parent.info.run_id)
        else:
            log.warning("no single sweep parent run (tag vqt.role=parent): the comparison stays in %s", out_dir)
    return 0


def _missing_weights(e: BaseException) -> bool:
    from vqtransformer.weights import WeightsUnavailableError

    return isinstance(e, WeightsUnavailableError)


def _swept_keys(parent) -> tuple[set[str] | None, list[str]]:
    """(config keys the sweep varies, from the parent's ``vqt.sweep_varying`` record, or None without one;
    the swept axes: that record's keys, else the parent's ``sweep.<axis>`` params)."""
    if parent is None:
        return None, []
    record = parent.data.tags.get("vqt.sweep_varying")
    if record:
        try:
            varying = json.loads(record)
        except ValueError:
            varying = None
        if isinstance(varying, dict) and varying:
            return {k for keys in varying.values() for k in keys}, list(varying)
    return None, [k[len("sweep."):] for k in parent.data.params if k.startswith("sweep.")]


def ui_url(tracking_uri: str | None) -> str:
    """The MLflow UI's address: ``$VQT_UI_URL``, a server tracking URI itself, else ``make ui``'s."""
    from vqtransformer.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    return os.environ.get("VQT_UI_URL") or (uri.rstrip("/") if uri.startswith(("http://", "https://"))
                                            else "http://127.0.0.1:5000")


def runs_view_link(base: str, experiment_id: str, parent_id: str, sort_key: str | None, ascending: bool = True) -> str:
    """A deep link to the experiment's runs table filtered to the sweep's children and sorted by ``sort_key``
    (MLflow's runs-view URL parameters ``searchFilter``, ``orderByKey``, ``orderByAsc``)."""
    from urllib.parse import quote, urlencode

    q = {"searchFilter": f"tags.`vqt.parent_run_id` = '{parent_id}'", "compareRunsMode": "TABLE"}
    if sort_key:
        q.update(orderByKey=sort_key, orderByAsc=str(ascending).lower())
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(q, quote_via=quote)}"


#: swept keys with a metric of the same value, which the runs view sorts numerically (it sorts params as strings)
NUMERIC_SORT = {"codebook.n_embed": "codebook_size"}


def _sort_key(swept: set[str] | None, axes: list[str], parent, primary: str | None,
              records: list[dict] = ()) -> tuple[str | None, bool]:
    """The runs view's sort: the swept key (a group axis: the one key it changes), else (an axis that changes
    several keys together, e.g. quantizer kind and size) the primary metric, best first."""
    from vqtransformer.evaluation import compare

    record = {}
    try:
        record = json.loads(parent.data.tags.get("vqt.sweep_varying") or "{}")
    except ValueError:
        pass
    for axis in axes:
        keys = record.get(axis) or ([] if "." not in axis and swept is None else [axis.lstrip("+~")])
        if len(keys) == 1:  # an axis that changes one key (codebook=k256,k1024 -> codebook.n_embed)
            if keys[0] in NUMERIC_SORT and any(NUMERIC_SORT[keys[0]] in r.get("metrics", {}) for r in records):
                return f"metrics.`eval/{NUMERIC_SORT[keys[0]]}`", True  # params sort as strings: 1024 < 256
            return f"params.`{keys[0]}`", True
    if primary:
        return f"metrics.`eval/{primary}`", compare.direction(primary) == "lower"
    return None, True


def log_answer(client, parent, records: list[dict], label: str, swept, axes: list[str], confounded: list[str],
               tracking_uri: str | None) -> None:
    """The sweep's answer on its parent run: ``best/<metric>`` metrics, tags ``best_run`` / ``best_run_id`` /
    ``best_metric``, a description with the sorted table, the best run per metric, confounds and a deep link."""
    from mlflow.entities import Metric, RunTag

    from vqtransformer.evaluation import compare

    best = compare.best_runs(records)
    primary = next(iter(best), None)
    ts = int(time.time() * 1000)
    metrics = [Metric(f"best/{k}", float(b["value"]), ts, 0) for k, b in best.items()]
    sort_key, ascending = _sort_key(swept, axes, parent, primary, records)
    link = runs_view_link(ui_url(tracking_uri), parent.info.experiment_id, parent.info.run_id, sort_key, ascending)
    header, rows = compare.comparison_table(compare.sort_records(records, primary))
    keep = [i for i, h in enumerate(header) if h != "run_id"]
    table = compare.markdown_table([header[i] for i in keep], [[row[i] for i in keep] for row in rows])
    network_note = compare.network_note([m for r in records for m in r["metrics"]])
    lines = []
    if primary:  # the answer first: the UI shows the description's first lines without "Show more"
        b = best[primary]
        lines += [f"**Which is best? `{b['run_name']}`** by `{primary}` ({b['direction']} is better: "
                  f"{compare._fmt(b['value'])}; run `{b['run_id']}`). " + "; ".join(
                      f"`{k}` {'↓' if v['direction'] == 'lower' else '↑'} `{v['run_name']}`"
                      for k, v in list(best.items())[1:4]) + ".", ""]
    lines += [f"Sweep `{label}`: {len(records)} runs scored by `python evaluate.py sweep_id={label}`.", ""]
    if network_note:
        lines += [f"> {network_note}.", ""]
    if confounded:
        lines += [f"> **Warning: the runs differ in more than the swept keys.** Also different: "
                  f"{', '.join(f'`{k}`' for k in confounded)} (swept: "
                  f"{', '.join(f'`{k}`' for k in sorted(swept)) if swept is not None else ', '.join(axes) or '-'}). "
                  "The comparison mixes their effects.", ""]
    lines += [f"Sorted by `{primary}`, best first:" if primary else "Runs:", "", table, "",
              "Best run per metric: " + "; ".join(f"`{k}` {'↓' if b['direction'] == 'lower' else '↑'} "
                                                  f"`{b['run_name']}` ({compare._fmt(b['value'])})" for k, b in best.items()),
              "", f"[Open the sweep's runs in the runs view, sorted by {sort_key or 'start time'}]({link})", "",
              "Files (artifact root and `eval/`): `comparison.md`, `comparison.csv` and the plots."]
    note = "\n".join(lines)
    if len(note) > 7900:  # MLflow's tag value limit
        note = note[:7800] + "\n\n(truncated: see comparison.md)"
    tags = {"mlflow.note.content": note, "best_metric": primary or "-",
            "best_run": best[primary]["run_name"] if primary else "-",
            "best_run_id": best[primary]["run_id"] if primary else "-",
            "vqt.sweep_confounds": ",".join(confounded) or "none", "vqt.runs_view_url": link}
    client.log_batch(parent.info.run_id, metrics=metrics, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def run(cfg: DictConfig) -> int:
    from vqtransformer.evaluation import EvaluationError

    targets = [k for k in ("run_id", "ckpt", "sweep_id", "experiment") if cfg.get(k)]
    if not targets or (len(targets) > 1 and set(targets) != {"run_id", "ckpt"}):
        raise EvaluationError("give exactly one of run_id=ID, ckpt=PATH, sweep_id=ID, experiment=NAME "
                              "(run_id and ckpt together: score ckpt, log to run_id)")
    ev, device = _eval_cfg(cfg), _device(str(cfg.device))
    if cfg.sweep_id or cfg.experiment:
        return evaluate_sweep(cfg, ev, device)
    return evaluate_one(cfg, ev, device)


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg, name="evaluate")


if __name__ == "__main__":
    main()
