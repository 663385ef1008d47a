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


def test_a_reopened_run_does_not_log_steps_that_are_already_recorded(tmp_path):
    """Resume after a kill: the interrupted process had logged past its checkpoint; the resumed one logs
    those steps again; the run keeps one point per step (issue 14, point 5)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    first = Tracker(uri, "exp")
    run_id = first.start("r", {"vqt.world_size": 1})  # a non-string tag is sent as a string
    for s in range(1, 11):
        first.log_metrics({"loss": float(s), "lr": 0.1}, s)
    first.log_metrics({"val": 1.0}, 10)
    assert first.flush(timeout=30)  # ... then killed: no finish
    again = Tracker(uri, "exp")
    assert again.start(run_id=run_id) == run_id
    for s in range(6, 16):  # resumed from the checkpoint at step 5
        again.log_metrics({"loss": float(s) + 100, "lr": 0.1}, s)
    assert again.finish()
    c = MlflowClient(uri)
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == list(range(1, 16))
    assert [m.step for m in c.get_metric_history(run_id, "lr")] == list(range(1, 16))
    assert c.get_run(run_id).data.tags["vqt.world_size"] == "1" and c.get_run(run_id).info.status == "FINISHED"


def test_points_a_checkpoint_carries_unsent_arrive_after_resume_once(tmp_path):
    """A kill -9 after a checkpoint and before the sender caught up: the checkpoint carries the unsent
    points (``unsent_metrics``), the resumed process sends them, those that did arrive are not doubled."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    first = Tracker(uri, "exp")
    run_id = first.start("r")
    for s in range(1, 7):
        first.log_metrics({"loss": float(s)}, s)
    assert first.flush(timeout=30) and first.unsent_metrics() == []
    first.client = MlflowClient("http://127.0.0.1:9")  # from here nothing arrives (the store is down)
    for s in (7, 8):
        first.log_metrics({"loss": float(s)}, s)
    carried = first.unsent_metrics()  # what the checkpoint at step 8 stores; then the process dies
    assert [(k, st) for k, _, _, st in carried] == [("loss", 7), ("loss", 8)]
    first._sender.stop()
    again = Tracker(uri, "exp")
    assert again.start(run_id=run_id) == run_id
    again.resend_metrics(carried + [("loss", 6.0, 0, 6)])  # step 6 did arrive: not logged twice
    for s in range(9, 12):  # resumed from the checkpoint at step 8
        again.log_metrics({"loss": float(s)}, s)
    assert again.finish()
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(1, 12)]


def test_logging_returns_at_once_while_the_store_is_unreachable(tmp_path, caplog):
    """A store that does not answer: logging and flushing return at once, one warning line (point 2)."""
    import time

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    t = Tracker(uri, "exp", flush_timeout=0.5, finish_timeout=1)
    t.start("r")
    t.client = MlflowClient("http://127.0.0.1:9")  # nothing listens there: every request fails
    with caplog.at_level(logging.WARNING):
        t0 = time.monotonic()
        for s in range(1, 2001):
            t.log_metrics({"loss": 1.0}, s)
            if s % 500 == 0:
                t.flush()
        elapsed = time.monotonic() - t0
        assert not t.finish()
    assert elapsed < 3.0, elapsed
    assert len([r for r in caplog.records if "tracking is behind" in r.getMessage()]) == 1
    assert "could not be sent" in caplog.text


def test_a_flush_stops_waiting_as_soon_as_the_store_is_found_down(tmp_path):
    """The first flush of an outage (a validation step) must not wait out ``logger.flush_timeout``
    once a request has failed: the backlog is sent when the store answers again (point 2)."""
    import time

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    t = Tracker(uri, "exp", flush_timeout=60, finish_timeout=1)
    t.start("r")
    t.client = MlflowClient("http://127.0.0.1:9")  # nothing listens there: every request fails
    t.log_metrics({"loss": 1.0}, 1)
    t0 = time.monotonic()
    assert not t.flush()
    assert time.monotonic() - t0 < 20, "flush waited for logger.flush_timeout although the store was down"
    assert t.pending()[0] == 1  # kept, to be sent later
    t.finish()
