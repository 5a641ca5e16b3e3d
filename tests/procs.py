"""Processes the tests start and stop: the CLI in a process group of its own, so that killing it
kills exactly what it started (and Ray's daemons, which it started in sessions of their own)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from conftest import ROOT


def start_cli(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env={**os.environ, **(env or {})})


def wait_for(predicate, timeout=300, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"no {what} within {timeout}s")


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI's process group and every process it started, as a crash would."""
    descendants = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for p in descendants:
        if p.is_running():
            p.kill()
