"""The study store on an object store: a real S3-compatible server (moto, its own process on its
own port, stopped by its PID). The smoke study runs end to end with its store in a bucket, is
killed mid-study and resumes, and gives the numbers of the same study on a local store; bad
stores (unreachable, no bucket, no credentials, wrong or read-only credentials) exit 2 before
anything is written, in one line that names the store and no credential."""

import contextlib
import json
import os

import pytest
from mlflow.tracking import MlflowClient

from conftest import SMOKE, saferay
from orchestrator.runner import plan
from orchestrator.spec import load_spec
from orchestrator.stages.evaluate import Result
from orchestrator.store import StudyStore
from procs import kill_all, start_cli, wait_for
from servers import S3Server, free_port

pytestmark = pytest.mark.slow
PREFIX = "studies-here"
NODES_OF_JOB = """
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_tasks
address, job = sys.argv[1], sys.argv[2]
ray_job = JobSubmissionClient(address).get_job_info(job).job_id
found = [t.node_id for t in list_tasks(address=address, filters=[("job_id", "=", ray_job)], limit=10000,
                                       raise_on_missing_output=False)]
found += [a.node_id for a in list_actors(address=address, filters=[("job_id", "=", ray_job)], limit=10000,
                                         raise_on_missing_output=False)]
print(json.dumps(sorted({n for n in found if n})))
"""

# Joins the cluster at argv[1] and checks a study of 8 GPU workers against it before and after a
# node type of 8 GPUs, none started, is reported to Ray's GCS as an autoscaler may report it.
AUTOSCALED = """
import json, sys
import ray
from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig
from ray.experimental.internal_kv import _internal_kv_put
from orchestrator.capacity import check_capacity, cluster_capacity
from orchestrator.spec import StudySpec
ray.init(address=sys.argv[1], logging_level="ERROR")
spec = StudySpec(cluster={"address": "auto"}, align_sft={"use_gpu": True, "num_workers": 8, "batch_size": 8})
def verdict():
    try:
        check_capacity(spec, cluster_capacity("auto"))
        return "fits"
    except Exception as e:
        return str(e)
before = verdict()
group = NodeGroupConfig(name="gpu8", resources={"CPU": 32, "GPU": 8}, min_count=0, max_count=1)
_internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ClusterConfig(node_group_configs=[group]).SerializeToString(),
                 namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
print(json.dumps([before, verdict()]))
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"), auth=True)
    yield server
    server.stop()


@contextlib.contextmanager
def environment(env: dict):
    """This process with the store's endpoint and keys, as the CLI has them."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def stage_state(s3, env, study="smoke") -> dict:
    """The study's state.json, read from the bucket as `saferay show` reads it."""
    with environment(env):
        return StudyStore(f"s3://{s3.bucket}/{PREFIX}", study).load_state() or {}


def test_locations_in_a_bucket(s3, tmp_path):
    """jobs/storage.py against the server: a directory put and listed, fetched once into the
    node's cache and fetched again when the bucket changed, files written and read, removed."""
    import pandas as pd

    from jobs import storage

    source = tmp_path / "made"
    (source / "model").mkdir(parents=True)
    (source / "model" / "weights.bin").write_bytes(b"w" * 100)
    (source / "result.json").write_text("{}")
    where = f"s3://{s3.bucket}/unit/stage"
    with environment({**s3.env, "SAFERAY_CACHE": str(tmp_path / "cache")}):
        storage.publish(source, where)
        assert storage.names(where) == ["model", "result.json"] and storage.exists(f"{where}/model/weights.bin")
        copy = storage.local(where)
        assert copy.startswith(str(tmp_path / "cache")) and (tmp_path / "cache").is_dir()
        assert open(f"{copy}/model/weights.bin", "rb").read() == b"w" * 100
        stamp = os.stat(f"{copy}/model/weights.bin").st_mtime_ns
        assert storage.local(where) == copy and os.stat(f"{copy}/model/weights.bin").st_mtime_ns == stamp, \
            "an unchanged location is not fetched again"
        with storage.writing(f"{where}/model") as d:  # a worker writing its output
            open(f"{d}/weights.bin", "wb").write(b"v" * 101)
        assert open(f"{storage.local(where)}/model/weights.bin", "rb").read() == b"v" * 101, "a stale copy was used"
        storage.write_parquet(pd.DataFrame({"a": [1, 2]}), f"{where}/rows.parquet")
        assert pd.read_parquet(storage.local(f"{where}/rows.parquet"))["a"].tolist() == [1, 2]
        storage.write_text(f"{where}/state.json", '{"x": 1}')
        assert json.loads(storage.read_text(f"{where}/state.json")) == {"x": 1}
        storage.remove(f"{where}/state.json")
        assert not storage.exists(f"{where}/state.json") and storage.exists(where)
        storage.remove(where)
        assert not storage.exists(where) and not [k for k in s3.objects("unit/") if not k.endswith("/")]


def test_the_smoke_study_on_an_object_store_killed_and_resumed(s3, smoke_store, tmp_path):
    """Killed (SIGKILL of the whole process group) while align_sft trains, then run again up to
    evaluate: the study gets there, nothing finished before the kill is written again, one MLflow
    run per stage, and every number equals the smoke study's on a local store (same seeds, same
    machine). The bucket starts with the local smoke study's data and base (the data stage writing
    to a bucket is the two-node test's), and debias, after evaluate, is left out: ~75 s less."""
    from jobs import storage

    env = {**s3.env, "SAFERAY_CACHE": str(tmp_path / "cache")}
    store = f"s3://{s3.bucket}/{PREFIX}"
    with environment(env):
        for name in ("data", "base"):
            storage.publish(smoke_store / "studies/smoke/stages" / name, f"{store}/studies/smoke/stages/{name}")
    proc = start_cli("run", str(SMOKE), "--store", store, "--until", "evaluate", env=env)
    try:
        wait_for(lambda: any(r["name"] == "align_sft" and r["status"] == "running"
                             for r in stage_state(s3, env).get("stages", [])), timeout=600, what="align_sft running")
    finally:
        kill_all(proc)
    before = s3.objects(f"{PREFIX}/studies/smoke/stages/")
    done = {k: v for k, v in before.items() if "/data/" in k or "/base/" in k}
    assert [k for k in done if k.endswith("/result.json")], "data and base finished before the kill"

    saferay("run", str(SMOKE), "--until", "evaluate", store=store, env=env)
    after = s3.objects(f"{PREFIX}/studies/smoke/stages/")
    assert {k: after[k] for k in done} == done, "what was finished before the kill was written again"
    assert [k for k in s3.objects(f"{PREFIX}/ray/") if "checkpoint" in k], "Ray Train checkpointed into the bucket"

    state = stage_state(s3, env)
    assert state["status"] == "partial" and state["resumes"] == 1
    assert [r["name"] for r in state["stages"] if r["status"] == "pending"] == ["debias"]
    key = dict((st.name, k) for st, k in plan(load_spec(SMOKE)))["evaluate"]
    with environment(env):
        here = Result.from_json(StudyStore(store, "smoke").result("evaluate", key))
    local = Result.from_json(StudyStore(smoke_store, "smoke").result("evaluate", key))
    for field in ("models", "attack_table", "comparisons"):
        assert getattr(here, field) == getattr(local, field), field
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    runs = client.search_runs([state["mlflow"]["experiment_id"]], max_results=1000)
    stage_runs = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == state["mlflow"]["run_id"]]
    assert sorted(stage_runs) == sorted(r["name"] for r in state["stages"] if r["status"] != "pending"), \
        "one MLflow run per stage"
    shown = json.loads(saferay("show", "smoke", "--json", store=store, env=env).stdout)
    assert shown["status"] == "partial" and shown["vulnerability"]["groups_file"].startswith(f"{store}/")


@pytest.mark.parametrize("case", ["unreachable", "no bucket", "no credentials", "wrong credentials", "read-only"])
def test_a_store_that_cannot_be_written_exits_2_before_anything_is_written(s3, case, tmp_path):
    env = {**s3.env, "SAFERAY_CACHE": str(tmp_path / "cache")}
    store, cause = f"s3://{s3.bucket}/bad-{case.replace(' ', '-')}", None
    if case == "unreachable":
        env["AWS_ENDPOINT_URL"], cause = f"http://127.0.0.1:{free_port()}", "cannot reach the object store"
    elif case == "no bucket":
        store, cause = "s3://no-such-bucket/x", "the bucket does not exist"
    elif case == "no credentials":
        env = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
        env.update(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
        cause = "no credentials in the environment"
    elif case == "wrong credentials":
        env.update(AWS_ACCESS_KEY_ID="AKIANOTAREALKEY00000", AWS_SECRET_ACCESS_KEY="not-the-secret")
        cause = "the credentials in the environment are not known to the store"
    else:
        env.update(s3.read_only)
        cause = "the credentials in the environment may not write there"
    before = s3.objects()
    proc = saferay("run", str(SMOKE), store=store, env=env, check=False, timeout=120)
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, said[-2000:]
    assert f"--store {store}: {cause}" in said, said[-2000:]
    assert said.count("error:") == 1 and "Traceback" not in said
    for secret in {env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_ACCESS_KEY_ID"), s3.env["AWS_SECRET_ACCESS_KEY"]} - {None, ""}:
        assert secret not in said, "a credential in the message"
    assert s3.objects() == before and not (tmp_path / "cache").exists(), "something was written"


def test_a_study_on_two_ray_nodes_with_its_store_in_the_bucket(s3, smoke_store, tmp_path):
    """A head and a second node (`ray start --address`, ports of its own), the study submitted
    with its store in the bucket and no filesystem shared on purpose (each node its own cache):
    the job's tasks and actors ran on both nodes (Ray's state API), and what they made equals the
    single-node, local-store smoke study of the same seeds: the data stage's rows, the base and
    SFT models bit for bit. On the same cluster, a worker that no one node holds fails its job as
    the driver joins, naming the field, and a node type an autoscaler reports to Ray counts."""
    import subprocess
    import sys

    import pandas as pd

    from conftest import ROOT
    from servers import RayHead, RayNode

    env = {**s3.env, "RAY_AUTH_MODE": "token"}
    head = RayHead(num_cpus=1, env={**env, "SAFERAY_CACHE": str(tmp_path / "head-cache")})
    node = None
    try:
        node = RayNode(head, num_cpus=2, env={**env, "SAFERAY_CACHE": str(tmp_path / "node-cache")})
        store = f"s3://{s3.bucket}/two-nodes"
        ray_env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the cluster's token, as the CLI sends it

        def cli(*args, **extra_env):
            return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, capture_output=True,
                                  text=True, timeout=300, env={**ray_env, **extra_env})

        def submit(*args) -> str:
            sub = cli("submit", str(SMOKE), "--address", head.address, "--store", store, "--until", "align_sft", *args,
                      **env, SAFERAY_CACHE=str(tmp_path / "cli-cache"))
            assert sub.returncode == 0, sub.stderr
            return next(w for w in sub.stdout.split() if w.startswith("saferay-"))

        def job_status(job: str) -> str:
            out = cli("status", job, "--address", head.address, "--json").stdout
            return json.loads(out)["status"] if out.strip() else ""

        def ended(job: str, timeout: float = 900) -> str:
            wait_for(lambda: job_status(job) in ("SUCCEEDED", "FAILED", "STOPPED"), timeout=timeout, what="the job's end")
            return job_status(job)

        def logs(job: str) -> str:
            return cli("logs", job, "--address", head.address).stdout

        job = submit()
        assert ended(job) == "SUCCEEDED", logs(job)[-3000:]
        # Where the job's tasks and actors ran, from Ray's state API (in a process of its own: the
        # token mode is read when Ray is first imported).
        nodes = subprocess.run([sys.executable, "-c", NODES_OF_JOB, head.address, job], capture_output=True, text=True,
                               env=ray_env, timeout=120)
        ran = set(json.loads(nodes.stdout or "[]"))
        assert len(ran) == 2, f"the job ran on {ran}: {nodes.stderr[-2000:]}"

        # A worker that no one node holds, though the two together have its CPUs (1 + 2): Ray Train
        # would wait for it forever; the job ends as it joins the cluster, naming the field.
        big = submit("--set", "study=too-big", "--set", "align_sft.num_workers=1", "--set", "align_sft.cpus_per_worker=2.5")
        assert ended(big, timeout=300) == "FAILED", logs(big)[-3000:]
        assert ("align_sft.cpus_per_worker: a worker asks for 2.5 CPU on one node; no node of the cluster at auto has "
                "that much (the most any node has: 2 CPU)") in logs(big), logs(big)[-3000:]
        # Node types an autoscaler can add count where the cluster reports them to Ray.
        seen = subprocess.run([sys.executable, "-c", AUTOSCALED, head.gcs], cwd=ROOT, capture_output=True, text=True,
                              env=ray_env, timeout=120)
        assert json.loads(seen.stdout or "[]") == [
            "align_sft.use_gpu: the cluster at auto has no GPU (set it to false / 0, or add GPU nodes)", "fits"], seen.stderr
    finally:
        if node is not None:
            node.stop()
        head.stop()

    keys = dict((st.name, k) for st, k in plan(load_spec(SMOKE)))
    local = StudyStore(smoke_store, "smoke")
    with environment({**env, "SAFERAY_CACHE": str(tmp_path / "check-cache")}):
        there = StudyStore(store, "smoke")
        assert there.load_state()["status"] == "partial"
        for split in ("align_train", "harmful_eval", "task_sentiment_test"):
            a = pd.read_parquet(there.stage_dir("data", keys["data"]) / split).sort_values("id", ignore_index=True)
            b = pd.read_parquet(local.stage_dir("data", keys["data"]) / split).sort_values("id", ignore_index=True)
            pd.testing.assert_frame_equal(a, b)
        for stage, model in (("base", "model"), ("align_sft", "model"), ("align_sft", "seed1/model")):
            assert (there.stage_dir(stage, keys[stage]) / model / "model.safetensors").read_bytes() == \
                (local.stage_dir(stage, keys[stage]) / model / "model.safetensors").read_bytes(), f"{stage}/{model}"
