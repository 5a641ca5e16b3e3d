"""Real servers for tests: a Ray head (`ray start --head`) and an MLflow tracking server, each
on 127.0.0.1 with ports and a temp dir of its own, stopped by the process ids it started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token is an answer)
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"nothing answered at {url} within {timeout:.0f}s")


def _stop(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM the process group we started, then any process whose command line names our own
    temp dir (Ray daemonizes its raylet and GCS into sessions of their own)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    ours = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for p in ours:
        p.terminate()
    _, alive = psutil.wait_procs(ours, timeout=20)
    for p in alive:
        p.kill()


class RayHead:
    """`ray start --head --block` on 127.0.0.1; `address` is its Jobs API (dashboard) URL."""

    def __init__(self, num_cpus: int = 4, env: dict | None = None):
        # Unix socket paths are short-limited: keep the temp dir near the root.
        self.temp_dir = tempfile.mkdtemp(prefix="sr-ray-", dir="/tmp")
        self.dashboard_port = free_port()
        ports = {"--port": free_port(), "--dashboard-port": self.dashboard_port,
                 "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
        self.gcs = f"127.0.0.1:{ports['--port']}"
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", str(num_cpus),
               "--temp-dir", self.temp_dir, *[str(x) for kv in ports.items() for x in kv]]
        # Job drivers run `python`: the cluster's Python is this virtual environment's.
        env = {**os.environ, **(env or {}), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        wait_http(f"{self.address}/api/version", proc=self.proc)

    def stop(self) -> None:
        _stop(self.proc, self.temp_dir)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class TrackingServer:
    """`saferay tracking-server` (MLflow, SQLite backend) on 127.0.0.1 and a free port."""

    def __init__(self, root: Path, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()  # a given port: the same server back after a stop
        self.root = Path(root)
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "orchestrator.cli", "tracking-server", "--store", str(root), "--port", str(self.port)]
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "server.log"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **(env or {})},
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.url}/health", proc=self.proc)

    def stop(self) -> None:
        _stop(self.proc, str(self.root))
