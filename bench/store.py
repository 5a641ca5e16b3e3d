"""The study store in a bucket against a local one: the smoke study on a local store, then on an
S3-compatible server on 127.0.0.1 (moto, its own process), one after the other in one run; each
stage's seconds side by side, and the whole study's.

The bucket here is on this machine, so the ratio is what the store's code costs (uploads of every
output, a probe, state written through the object store, a copy of each input per process),
not a cloud's latency or bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import record

ROOT = Path(__file__).resolve().parent.parent
SPEC = "studies/smoke.yaml"


def s3_server() -> tuple[subprocess.Popen, dict]:
    """moto's S3 server on a free port, with a bucket; (the process, a client's environment)."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(60):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            break
        except OSError:
            time.sleep(1)
    env = {"AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="bench")
    return proc, env


def run(store: str, env: dict) -> tuple[float, dict[str, float]]:
    """The smoke study into `store`: wall seconds, and each stage's seconds from its state."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", SPEC, "--store", store], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, **env})
    wall = time.perf_counter() - began
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "show", "smoke", "--json", "--store", store],
                         cwd=ROOT, check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout
    return wall, {s["name"]: s["seconds"] for s in json.loads(out)["stages"]}


def main(argv=None):
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    proc, env = s3_server()
    work = tempfile.mkdtemp(prefix="saferay-bench-store-")
    try:
        local_wall, local = run(f"{work}/local", {"SAFERAY_CACHE": f"{work}/cache-local"})
        bucket_wall, bucket = run("s3://bench/smoke", {**env, "SAFERAY_CACHE": f"{work}/cache-s3"})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    rows = [{"name": "store/smoke_study_s3", "value": bucket_wall, "unit": "s", "baseline": local_wall,
             "ratio": bucket_wall / local_wall, "note": "the smoke study, store in a local S3 server against a local path"}]
    rows += [{"name": f"store/{stage}_s3", "value": bucket[stage], "unit": "s", "baseline": local[stage],
              "ratio": bucket[stage] / local[stage] if local[stage] else None}
             for stage in local if local[stage] and local[stage] > 1]
    record(rows)


if __name__ == "__main__":
    main()
