"""Submission to a real Ray head (`ray start --head` on 127.0.0.1) through the Jobs API, with the
study tracked on a real MLflow server read back through its REST API. Tokens are set where a
cluster user has them (the submitting shell, the cluster's nodes, the tracking server) and must
reach none of the job's logs, Ray's own logs, the runs, the artifacts or the store."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, SMOKE, saferay, seeded_store
from servers import RayHead, TrackingServer
from test_security import SECRETS

pytestmark = pytest.mark.slow
# The smallest study that still trains, attacks and evaluates on the cluster.
TINY = ("--set", "vulnerability.enabled=false", "--set", "vaa.enabled=false", "--set", "attack.models=[sft]",
        "--set", "debias.enabled=false", "--set", "attack.ratios=[0.1]", "--set", "seeds=[0]")


@pytest.fixture(scope="module")
def head():
    h = RayHead(env=SECRETS)  # the job's driver and workers have them, as on a cluster that needs them
    yield h
    h.stop()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    server = TrackingServer(tmp_path_factory.mktemp("tracking"), env=SECRETS)
    yield server
    server.stop()


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **SECRETS})


def texts_under(root) -> list[str]:
    """Every file under `root`, as text (databases and weights included: a secret is bytes in them
    too), except the unpacked working dirs Ray keeps in runtime_resources: the project's own code,
    which has these tests and so the fake tokens."""
    return [open(os.path.join(d, f), "rb").read().decode("utf-8", "replace")
            for d, _, files in os.walk(root) if "runtime_resources" not in d
            for f in files if os.path.isfile(os.path.join(d, f))]


def job_id(out: str) -> str:
    return re.search(r"job (saferay-\S+)", out.replace("\n", " ")).group(1)


def rest(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def test_submit_follow_logs_and_read_runs_over_rest(head, tracking, smoke_store, tmp_path):
    store = seeded_store(smoke_store, tmp_path / "store")  # data and base adopted: the job trains from align_sft on
    sub = cli("submit", str(SMOKE), "--address", head.address, "--store", str(store), "--set", "study=on-cluster",
              "--set", f"tracking.uri={tracking.url}", *TINY)
    assert sub.returncode == 0, sub.stderr
    job = job_id(sub.stdout)
    follow = cli("logs", job, "-f", "--address", head.address)  # returns when the job ends
    assert follow.returncode == 0 and "evaluate" in follow.stdout, follow.stdout[-3000:]
    status = json.loads(cli("status", job, "--address", head.address, "--json").stdout)
    assert status["status"] == "SUCCEEDED" and status["study"] == "on-cluster", status
    shown = json.loads(saferay("show", "on-cluster", "--json", store=store).stdout)
    assert shown["status"] == "complete" and shown["mlflow"]["tracking_uri"] == tracking.url
    # The study's runs, read back from the tracking server's REST API.
    exp = rest(tracking.url, "experiments/get-by-name?experiment_name=on-cluster")["experiment"]
    runs = rest(tracking.url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
    names = {r["info"]["run_name"] for r in runs}
    assert {"data", "base", "align_sft", "attack", "evaluate"} <= names
    parent = next(r for r in runs if r["info"]["run_id"] == shown["mlflow"]["run_id"])
    assert parent["info"]["status"] == "FINISHED"
    artifacts = rest(tracking.url, f"artifacts/list?run_id={parent['info']['run_id']}")
    assert "summary.json" in {f["path"] for f in artifacts.get("files", [])}
    assert "evaluate" in cli("logs", job, "--address", head.address).stdout

    # No token in what the user sees, the job's and Ray's logs (the head's session: driver, workers,
    # job supervisor, raylet), the tracking server's database, artifacts and log, or the store.
    seen = [sub.stdout, sub.stderr, follow.stdout, follow.stderr, json.dumps(runs), json.dumps(status),
            *texts_under(head.temp_dir), *texts_under(tracking.root), *texts_under(store)]
    ray_logs = [f for _, _, files in os.walk(head.temp_dir) for f in files]
    assert any(f.startswith("worker-") for f in ray_logs) and any(f.startswith("job-driver-") for f in ray_logs), (
        "the search should have had Ray's worker and job driver logs", sorted(ray_logs)[:40])
    assert len(seen) > 200, ("the search should have had plenty to look through", len(seen))
    text = "\n".join(seen)
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} leaked"


def wait_job(head, job, timeout):
    end = time.monotonic() + timeout
    while (s := json.loads(cli("status", job, "--address", head.address, "--json").stdout)["status"]) not in (
            "STOPPED", "FAILED", "SUCCEEDED") and time.monotonic() < end:
        time.sleep(2)
    return s


def test_stop_a_running_study_then_submit_it_again_to_resume(head, tmp_path):
    store = tmp_path / "store"
    args = (str(SMOKE), "--address", head.address, "--store", str(store), "--set", "study=stopped", *TINY,
            "--until", "data")
    job = job_id(cli("submit", *args).stdout)
    state = store / "studies" / "stopped" / "state.json"
    end = time.monotonic() + 180
    while not state.exists() and time.monotonic() < end:  # stop it mid-way, once a stage has begun
        time.sleep(1)
    assert state.exists(), cli("logs", job, "--address", head.address).stdout
    assert cli("stop", job, "--address", head.address).returncode == 0
    assert wait_job(head, job, 120) == "STOPPED"
    stopped = json.loads(state.read_text())
    assert stopped["status"] != "partial"
    again = job_id(cli("submit", *args).stdout)
    assert wait_job(head, again, 600) == "SUCCEEDED", cli("logs", again, "--address", head.address).stdout[-3000:]
    resumed = json.loads(state.read_text())
    assert resumed["status"] == "partial" and resumed["resumes"] == 1, "the same study, resumed"
    assert resumed["mlflow"]["run_id"] == stopped["mlflow"]["run_id"], "into the stopped job's parent run"
    assert [r["status"] for r in resumed["stages"][:1]] == ["complete"]


def test_unreachable_cluster_exits_2(tmp_path):
    proc = cli("submit", str(SMOKE), "--address", "http://127.0.0.1:9", "--store", str(tmp_path))
    assert proc.returncode == 2 and "cluster http://127.0.0.1:9: cannot reach the Ray Jobs API" in proc.stderr
    assert not any(tmp_path.iterdir())
