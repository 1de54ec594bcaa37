"""ServerProcess: `moe-offload serve` in a subprocess on a free loopback port, for scripts and tests
that need a real server (the load benchmark, the server tests). Standard library only."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on now, chosen by the OS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name' or 'name{labels}': value}."""
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


MOE_OFFLOAD_SERVE = (sys.executable, "-m", "moe_offload", "serve")


class ServerProcess:
    """``python -m moe_offload serve --port P <flags>`` (or another OpenAI server's ``command`` that takes
    ``--port``) with its output in ``log``; ``stop()`` ends it."""

    def __init__(self, flags: list[str], log: Path, api_key: str | None = None,
                 command: tuple[str, ...] = MOE_OFFLOAD_SERVE, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        self.api_key = api_key
        argv = [*command, "--port", str(self.port), *flags]
        argv += ["--api-key", api_key] if api_key else []
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def get(self, path: str, timeout: float = 10) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=timeout) as r:
            return r.read().decode()

    def wait_ready(self, timeout: float) -> None:
        """Wait until /health answers; RuntimeError (with the log) if the server exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                self.get("/health", timeout=1)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise RuntimeError(f"no /health answer in {timeout} s:\n{self.log.read_text()}")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics"))

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down, the engine stops, the model closes); SIGKILL after 20 s."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
