"""`ksleepctl bench --spawn`: a ksleepd of our own, started for one run and stopped after it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .client import Client
from .errors import Unavailable


class SpawnedDaemon:
    def __init__(self, model: str, device: str, pool_prefix: str = "ksleep-bench", *flags: str,
                 log_path: Path | None = None):
        """`flags` are more `ksleepd start` options (they win over the defaults here: idle timeout off)."""
        self.dir = Path(tempfile.mkdtemp(prefix="ksleep-bench-"))
        self.address = f"unix:{self.dir / 'ksleepd.sock'}"
        self.pool_prefix = pool_prefix
        self.log_path = log_path or self.dir / "ksleepd.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ksleep.supervisor", "start", "--model", model, "--device", device,
             "--listen", self.address, "--idle-timeout", "0", "--pool-prefix", pool_prefix, *flags],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "XDG_RUNTIME_DIR": str(self.dir)})

    def wait_ready(self, client: Client, timeout: float = 1800) -> None:
        """Until the daemon answers (its socket opens once the model is loaded); fails if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise Unavailable(f"ksleepd exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                client.wait_ready(timeout=1.0)
                return
            except Unavailable:
                if time.monotonic() > deadline:
                    raise

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.process.returncode
