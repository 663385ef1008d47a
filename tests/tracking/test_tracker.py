import logging

from mlflow import MlflowClient

from tests.conftest import TINY, run_train
from vqtransformer.tracking import Tracker, flatten
from vqtransformer.tracking.mlflow_tracker import with_retries


def test_flatten_joins_nested_keys_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_retries_then_warns_instead_of_raising(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("database is locked")
        return "ok"

    assert with_retries(flaky, "x", retries=3, delay=0.001) == "ok" and len(calls) == 3
    with caplog.at_level(logging.WARNING):
        assert with_retries(lambda: 1 / 0, "logging metrics", retries=2, delay=0.001) is None
    assert "logging metrics failed after 2 tries" in caplog.text


def test_tracker_writes_params_metrics_tags_and_images(tmp_path):
    import torch

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    t = Tracker(uri, "exp")
    run_id = t.start("r", {"k": "v"})
    t.log_params({"codebook.n_embed": 1024, "long": "x" * 10000})
    for s in range(1, 251):  # more than one buffered batch
        t.log_metrics({"loss": 1.0 / s}, s)
    t.log_image(torch.rand(3, 8, 8), "grid.png")
    t.finish()
    c = MlflowClient(uri)
    run = c.get_run(run_id)
    assert run.data.params["codebook.n_embed"] == "1024" and len(run.data.params["long"]) == 6000
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == list(range(1, 251))
    assert run.data.tags["k"] == "v" and run.info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(run_id, "images")] == ["images/grid.png"]
    # artifacts of the SQLite store live next to it, not in the cwd
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_training_survives_a_tracking_server_that_is_down(tmp_path):
    r = run_train(TINY + ["trainer.max_steps=3", "trainer.val_every=3", "logger.tracking_uri=http://127.0.0.1:9",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                  env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MLflow: creating run failed after 3 tries" in r.stderr + r.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
