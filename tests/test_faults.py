"""Nothing is lost when a process dies: a Ray Train worker killed by PID mid-training, the
study's driver killed mid-study, and Ctrl-C mid-study, all through the real CLI; and a second run
of a study that is running is refused."""

import json
import os
import signal

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import SMOKE, saferay, seeded_store
from procs import kill_all, start_cli, wait_for
from servers import TrackingServer

pytestmark = pytest.mark.slow
SFT_ONLY = ("--set", "vulnerability.enabled=false", "--set", "vaa.enabled=false", "--set", "attack.models=[sft]",
            "--set", "attack.ratios=[0.1]", "--set", "debias.enabled=false", "--set", "seeds=[0]")


def start(store, *args, env=None):
    return start_cli("run", str(SMOKE), *args, "--store", str(store), env=env)


def stage_row(store, study, name):
    path = store / "studies" / study / "state.json"
    if not path.exists():
        return None
    return next((r for r in json.loads(path.read_text())["stages"] if r["name"] == name), None)


def registered_checkpoints(store, run_prefix) -> int:
    """Checkpoints Ray Train has committed (a directory alone may still be uploading)."""
    snapshots = list((store / "ray").glob(f"{run_prefix}*/checkpoint_manager_snapshot.json"))
    return len(json.loads(snapshots[0].read_text())["checkpoint_results"]) if snapshots else 0


def test_killed_train_worker_resumes_from_its_checkpoint(smoke_store, tmp_path):
    store = seeded_store(smoke_store, tmp_path / "store")
    # Small batches make epochs of a few seconds, so the kill lands mid-training.
    proc = start(store, "--set", "study=worker-kill", "--set", "align_sft.epochs=4", "--set", "align_sft.batch_size=2",
                 *SFT_ONLY, "--until", "align_sft")  # the stage whose worker it kills is the last
    try:
        # Wait for the first committed epoch checkpoint, then kill one Ray Train worker by its PID.
        wait_for(lambda: registered_checkpoints(store, "worker-kill-align_sft-") >= 1, what="epoch checkpoint")
        workers = wait_for(lambda: [p for p in psutil.Process(proc.pid).children(recursive=True)
                                    if "RayTrainWorker" in " ".join(p.cmdline())], what="train worker")
        workers[0].kill()
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            kill_all(proc)
    assert proc.returncode == 0, out[-3000:]
    key = stage_row(store, "worker-kill", "align_sft")["key"]
    result = json.loads((store / "studies/worker-kill/stages/align_sft" / key / "result.json").read_text())
    assert result["resumed_from_epoch"] >= 1, "the restarted worker group should resume, not start over"
    assert result["steps"] == 4 * (result["rows"] // 2)


def test_killed_driver_resumes_without_recomputing_or_duplicate_runs(smoke_store, tmp_path):
    store = seeded_store(smoke_store, tmp_path / "store")
    args = ("--set", "study=driver-kill", *SFT_ONLY)
    proc = start(store, *args)
    try:
        wait_for(lambda: (stage_row(store, "driver-kill", "align_sft") or {}).get("status") == "running",
                 what="align_sft running")
    finally:
        kill_all(proc)  # the driver, its process group and the Ray daemons it started
    done = {r["name"]: r for r in json.loads((store / "studies/driver-kill/state.json").read_text())["stages"]
            if r["status"] in ("complete", "cached")}
    assert {"data", "base"} <= set(done)
    stamps = {n: (store / "studies/driver-kill/stages" / n / done[n]["key"] / "result.json").stat().st_mtime
              for n in done}
    saferay("run", str(SMOKE), *args, store=store)
    state = json.loads((store / "studies/driver-kill/state.json").read_text())
    assert state["status"] == "complete" and state["resumes"] == 1
    for n, stamp in stamps.items():  # finished stages were not recomputed
        assert (store / "studies/driver-kill/stages" / n / done[n]["key"] / "result.json").stat().st_mtime == stamp
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    runs = client.search_runs([state["mlflow"]["experiment_id"]], max_results=1000)
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state["mlflow"]["run_id"]]
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1, "one parent run"
    assert sorted(r.info.run_name for r in stage_runs) == sorted(s["name"] for s in state["stages"])
    assert {r.info.status for r in stage_runs} == {"FINISHED"}


def finished_stamps(store, study) -> dict:
    done = {r["name"]: r["key"] for r in json.loads((store / "studies" / study / "state.json").read_text())["stages"]
            if r["status"] in ("complete", "cached")}
    return {n: (store / "studies" / study / "stages" / n / k / "result.json").stat().st_mtime_ns for n, k in done.items()}


def test_ctrl_c_stops_what_it_started_and_the_next_run_resumes(smoke_store, tmp_path):
    store = seeded_store(smoke_store, tmp_path / "store")
    args = ("--set", "study=ctrl-c", *SFT_ONLY, "--until", "align_sft")  # the stage it interrupts is the last
    proc = start(store, *args)
    try:
        wait_for(lambda: (stage_row(store, "ctrl-c", "align_sft") or {}).get("status") == "running",
                 what="align_sft running")
        started = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground group
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            kill_all(proc)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted; finished stages are kept, `saferay run` again resumes" in " ".join(out.split())
    # Nothing it started outlives it (Ray's workers included).
    wait_for(lambda: not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
             timeout=60, what="the interrupted run's processes gone")
    assert stage_row(store, "ctrl-c", "align_sft")["status"] == "interrupted"
    stamps = finished_stamps(store, "ctrl-c")
    assert {"data", "base"} <= set(stamps) and "align_sft" not in stamps
    saferay("run", str(SMOKE), *args, store=store)
    state = json.loads((store / "studies/ctrl-c/state.json").read_text())
    assert state["status"] == "partial" and stage_row(store, "ctrl-c", "align_sft")["status"] == "complete"
    after = finished_stamps(store, "ctrl-c")
    assert {n: after[n] for n in stamps} == stamps, "finished stages were recomputed"
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    runs = client.search_runs([state["mlflow"]["experiment_id"]], max_results=1000)
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1, "one parent run"
    stage_runs = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == state["mlflow"]["run_id"]]
    ran = [s["name"] for s in state["stages"] if s["status"] in ("complete", "cached")]
    assert sorted(stage_runs) == sorted(ran), "one MLflow run per stage"


def test_a_second_run_of_a_running_study_exits_2_and_disturbs_nothing(tmp_path):
    """Two `saferay run` of one study into one store (another terminal, a submitted copy) would
    compute the same stages and overwrite each other's state: the second is refused."""
    store = tmp_path / "store"
    args = ("--set", "study=busy", *SFT_ONLY, "--until", "data")
    first = start(store, *args)
    try:
        wait_for(lambda: (stage_row(store, "busy", "data") or {}).get("status") == "running", what="data running")
        owner = json.loads((store / "studies/busy/state.json").read_text())["mlflow"]["run_id"]
        second = saferay("run", str(SMOKE), *args, store=store, check=False, timeout=300)
        assert first.poll() is None, "the first run should still be running when the second is refused"
        out, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            kill_all(first)
    said = " ".join((second.stdout + second.stderr).split())
    assert second.returncode == 2, said[-3000:]
    assert f"study 'busy' is already running in {store} (pid {first.pid} on" in said, said[-3000:]
    assert first.returncode == 0, out[-3000:]
    state = json.loads((store / "studies/busy/state.json").read_text())
    assert state["status"] == "partial" and state["mlflow"]["run_id"] == owner and not state.get("resumes")
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    runs = client.search_runs([state["mlflow"]["experiment_id"]], max_results=1000)
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [owner], "one parent run"


def test_tracking_server_gone_mid_study_loses_nothing(smoke_store, tmp_path):
    """The MLflow server stopped (by its PID) while align_sft trains: the study finishes, keeps
    what it could not send, and the next run, with the server back on its port, sends it all into
    the runs it belongs to, without computing anything again."""
    store = seeded_store(smoke_store, tmp_path / "store")
    server = TrackingServer(tmp_path / "server")
    args = ("--set", "study=outage", "--set", f"tracking.uri={server.url}", *SFT_ONLY, "--until", "align_sft")
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # MLflow's own retries would wait ~4 min
    proc = start(store, *args, env=quick)
    try:
        wait_for(lambda: (stage_row(store, "outage", "align_sft") or {}).get("status") == "running",
                 what="align_sft running")
        server.stop()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            kill_all(proc)
    said = " ".join(out.split())
    assert proc.returncode == 0, out[-3000:]
    assert f"MLflow at {server.url} does not answer" in said and "still does not answer" in said, said[-3000:]
    first = json.loads((store / "studies/outage/state.json").read_text())
    assert first["status"] == "partial" and first["mlflow"]["unsent"] > 0
    sft = stage_row(store, "outage", "align_sft")
    assert sft["status"] == "complete"
    stamps = finished_stamps(store, "outage")

    server = TrackingServer(tmp_path / "server", port=server.port)
    try:
        again = saferay("run", str(SMOKE), *args, store=store)
        assert f"MLflow at {server.url} answers again" in " ".join(again.stdout.split()), again.stdout[-3000:]
        assert finished_stamps(store, "outage") == stamps, "nothing is computed again"
        assert not (store / "studies/outage/tracking-journal/calls.jsonl").exists()
        client = MlflowClient(tracking_uri=server.url)
        runs = client.search_runs([first["mlflow"]["experiment_id"]], max_results=1000)
        of_first = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first["mlflow"]["run_id"]]
        assert sorted(r.info.run_name for r in of_first) == ["align_sft", "base", "data"], "one run per stage"
        result = json.loads((store / "studies/outage/stages/align_sft" / sft["key"] / "result.json").read_text())
        run = client.get_run(sft["run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["final_loss"] == pytest.approx(result["final_loss"])
        assert len(client.get_metric_history(sft["run_id"], "train/loss")) == result["steps"]
        assert "result.json" in {a.path for a in client.list_artifacts(sft["run_id"])}
        parent = client.get_run(first["mlflow"]["run_id"])
        assert parent.info.status == "FINISHED" and "study_seconds" in parent.data.metrics
        assert "unsent" not in json.loads((store / "studies/outage/state.json").read_text())["mlflow"]
    finally:
        server.stop()
