"""Real servers for tests: a Ray head (`ray start --head`) and an MLflow tracking server, each
on 127.0.0.1 with ports and a temp dir of its own, stopped by the process ids it started."""

from __future__ import annotations

import contextlib
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


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:  # a child that has already exited
        return []


class RayNode:
    """A second Ray node on this machine (`ray start --address` the head's GCS, ports and a temp
    dir of its own), with `resources` to tell it apart; stopped by the process ids it started.

    Its own temp dir is what makes it a second machine's node: sharing the head's, its runtime-env
    agent unpacks a job's working_dir over the head's copy, deleting the driver's cwd under it."""

    def __init__(self, head: RayHead, num_cpus: int = 2, env: dict | None = None, resources: dict | None = None):
        ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port()}
        self.temp_dir = tempfile.mkdtemp(prefix="sr-node-", dir="/tmp")  # short: Unix socket paths
        cmd = [str(BIN / "ray"), "start", "--address", head.gcs, "--block", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--temp-dir", self.temp_dir, *[str(x) for kv in ports.items() for x in kv]]
        if resources:
            import json

            cmd += ["--resources", json.dumps(resources)]
        env = {**os.environ, **(env or {}), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started: list[psutil.Process] = []
        end = time.monotonic() + 90
        while time.monotonic() < end and not any("raylet" in " ".join(_cmdline(p)) for p in self.started):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --address exited with {self.proc.returncode}")
            time.sleep(1)
            self.started = psutil.Process(self.proc.pid).children(recursive=True)
        if not any("raylet" in " ".join(_cmdline(p)) for p in self.started):
            self.stop()  # a node that never joined would leave its runs waiting for its CPUs
            raise RuntimeError(f"ray start --address started no raylet in 90 s (log: {self.log.name})")

    def stop(self) -> None:
        procs = [psutil.Process(self.proc.pid), *self.started]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            p.kill()
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


class S3Server:
    """moto's S3 server on 127.0.0.1 and a free port, its own process, holding one bucket; `env`
    is what a client needs (the endpoint, a region, keys). With `auth`, it checks keys against its
    IAM from the first request after the set-up: `env` then holds a user's keys that may do
    anything, `read_only` a user's that may only read."""

    def __init__(self, root: Path, bucket: str = "saferay", auth: bool = False):
        import json

        self.port, self.bucket = free_port(), bucket
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        setup = 7  # the requests below, made before IAM starts checking
        env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": str(setup)} if auth else {})}
        with open(self.root / "moto.log", "a") as log:
            self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.url}/moto-api/", proc=self.proc)
        import boto3

        kw = {"endpoint_url": self.url, "region_name": "us-east-1", "aws_access_key_id": "setup",
              "aws_secret_access_key": "setup"}
        boto3.client("s3", **kw).create_bucket(Bucket=bucket)
        users = {name: {"AWS_ACCESS_KEY_ID": "saferay-test", "AWS_SECRET_ACCESS_KEY": "saferay-test-secret"}
                 for name in ("writer", "reader")}  # without auth any keys do
        if auth:
            iam = boto3.client("iam", **kw)
            for user, actions in (("writer", "s3:*"), ("reader", ["s3:GetObject", "s3:ListBucket"])):
                iam.create_user(UserName=user)
                iam.put_user_policy(UserName=user, PolicyName="store", PolicyDocument=json.dumps({
                    "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
                key = iam.create_access_key(UserName=user)["AccessKey"]
                users[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        keys, self.read_only = users["writer"], users["reader"]
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", **keys}

    def objects(self, prefix: str = "") -> dict[str, tuple[int, str]]:
        """key -> (size, etag) of every object under `prefix`."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                          aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out |= {o["Key"]: (o["Size"], o["ETag"]) for o in page.get("Contents", [])}
        return out

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
