"""Real services for the reliability tests: an ``mlflow server`` on a free 127.0.0.1 port, ``train.py``
as a subprocess whose progress (the step) is read from its output, and direct reads of a SQLite store."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, TINY

# the tiny VQGAN, one metric point per step, validation/checkpoints rare unless a test asks
FAST = TINY + ["first_stage.loss.disc_start=100000", "trainer.val_every=100000", "trainer.ckpt_every=100000"]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` (one worker, no job runner) on 127.0.0.1:PORT over a SQLite store in ``root``."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> MlflowServer:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = open(self.root / f"server-{time.time():.0f}.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / self.log.name).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not come up")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (uvicorn and its workers): the store is unreachable."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None


class Train:
    """``python train.py ARGS`` in the background; ``step()`` is the last step its progress bar showed."""

    STEP = re.compile(r"(\d+)/(\d+) \[")

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        self._step = 0
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, stream, sink: list[str]) -> None:
        buf = b""
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            buf += chunk
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            for p in parts:
                line = p.decode("utf-8", "backslashreplace")
                sink.append(line)
                for m in self.STEP.finditer(line):
                    self._step = max(self._step, int(m.group(1)))
        if buf:
            sink.append(buf.decode("utf-8", "backslashreplace"))

    def step(self) -> int:
        return self._step

    def wait_step(self, n: int, timeout: float = 180.0) -> int:
        deadline = time.monotonic() + timeout
        while self._step < n:
            if self.proc.poll() is not None:
                raise AssertionError(f"train.py ended (rc {self.proc.returncode}) before step {n}:\n" + self.text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"step {n} not reached in {timeout}s (at {self._step})")
            time.sleep(0.05)
        return self._step

    def wait(self, timeout: float = 300.0) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(10)
        return rc

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(60)

    def text(self) -> str:
        return "\n".join(self.out + self.err)

    def stderr_lines(self) -> list[str]:
        """stderr without the progress bar's redraws."""
        return [ln for ln in self.err if ln.strip() and not self.STEP.search(ln)]


def metric_steps(db: Path, key: str = "loss/rec") -> list[int]:
    """The steps of ``key``'s points in a SQLite store (every run), in step order, duplicates kept."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return [r[0] for r in con.execute("SELECT step FROM metrics WHERE key = ? ORDER BY step", (key,))]
    finally:
        con.close()
