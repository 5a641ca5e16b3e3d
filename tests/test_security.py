"""Care with secrets and shared stores: two studies run at once into the same store and MLflow
database, with tokens in the environment; no token reaches params, tags, artifacts or logs,
and neither study disturbs the other."""

import contextlib
import os
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, SMOKE, seeded_store

pytestmark = pytest.mark.slow
SECRETS = {"HF_TOKEN": "hf_zz9SecretHubToken0001", "MLFLOW_TRACKING_PASSWORD": "zz9-secret-tracking-pass-0002",
           "WANDB_API_KEY": "zz9secretapikey0003"}
TINY = ("--set", "vulnerability.enabled=false", "--set", "vaa.enabled=false", "--set", "attack.models=[sft]",
        "--set", "debias.enabled=false", "--set", "attack.ratios=[0.1]", "--set", "seeds=[0]")


@pytest.fixture(scope="module")
def two_studies(smoke_store, tmp_path_factory):
    # Both adopt the smoke study's data and base, then train, attack and evaluate at the same time.
    store = seeded_store(smoke_store, tmp_path_factory.mktemp("shared"))
    env = {**os.environ, **SECRETS}
    procs = {name: subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(SMOKE), "--set",
                                     f"study={name}", *TINY, "--store", str(store)],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("first", "second")}
    try:  # both run at once: one deadline for the two
        end = time.monotonic() + 900
        outputs = {name: p.communicate(timeout=max(1, end - time.monotonic()))[0] for name, p in procs.items()}
    finally:  # a study still running (a timeout, an interrupt) must not go on beside the next tests
        for p in procs.values():
            tree = []
            if p.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):  # it may end meanwhile
                    tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]  # its local Ray
                for proc in tree:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
                psutil.wait_procs(tree, timeout=30)
    for name, p in procs.items():
        assert p.returncode == 0, outputs[name][-3000:]
    return store, outputs


def test_two_studies_at_once_do_not_interfere(two_studies):
    import json

    store, _ = two_studies
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    for name in ("first", "second"):
        state = json.loads((store / "studies" / name / "state.json").read_text())
        assert state["status"] == "complete"
        assert {s["name"]: s["status"] for s in state["stages"] if s["status"] != "complete"} == {
            "data": "cached", "base": "cached"}
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert [r.info.run_id for r in parents] == [state["mlflow"]["run_id"]]
        assert all(r.info.status == "FINISHED" for r in runs)


def test_no_secret_in_params_tags_artifacts_or_logs(two_studies, tmp_path):
    store, outputs = two_studies
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    seen = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            seen += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
            seen += list(run.data.metrics)
            local = client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id))
            for path in filter(os.path.isfile, (os.path.join(d, f) for d, _, fs in os.walk(local) for f in fs)):
                seen.append(open(path, "rb").read().decode("utf-8", "replace"))
    for d, _, files in os.walk(store):  # logs, state, results and everything else in the store
        for f in files:
            if not f.endswith((".db", ".safetensors", ".parquet", ".pt")):
                seen.append(open(os.path.join(d, f), "rb").read().decode("utf-8", "replace"))
    seen += outputs.values()
    assert len(seen) > 100, "the grep should have had plenty to look through"
    text = "\n".join(seen)
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} leaked"
