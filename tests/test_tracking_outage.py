"""A tracking server that goes away mid-study loses nothing: calls made while it is away are kept
in the study's journal and reach the same server, once each and in order, when it is back."""

import json
import os
import signal

import psutil
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.tracking import MlflowWriter, Tracker, default_tracking_uri, unreachable
from orchestrator.tracking_journal import Journal
from procs import kill_all, start_cli
from servers import TrackingServer, free_port, wait_http


class StopsAnsweringAfter:
    """The real writer, until `n` calls have gone through; then the server 'goes away' again."""

    def __init__(self, writer: MlflowWriter, n: int):
        self.writer, self.n = writer, n

    def __getattr__(self, op):
        def call(*args):
            if self.n == 0:
                raise MlflowException("API request to http://127.0.0.1:1/api failed with exception refused")
            self.n -= 1
            return getattr(self.writer, op)(*args)
        return call


@pytest.fixture
def quick_failures(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries for ~4 min
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def test_calls_made_while_the_server_is_away_reach_it_once_it_is_back(tmp_path, quick_failures):
    server = TrackingServer(tmp_path / "server")
    journal_dir = tmp_path / "journal"
    try:
        tracker = Tracker(server.url, "outage", None, Journal(journal_dir))
        parent = tracker.start_run("study")
        stage = tracker.start_run("attack", parent=parent, tags={"saferay.stage": "attack"})
        with pytest.raises(MlflowException):  # a refused request is a bug, not an outage: it raises
            tracker.log_metrics("0" * 32, {"hs": 1.0})
        assert not tracker.offline
        server.stop()

        tracker.log_metrics(stage, {"hs": 0.25, "hs_ci": [0.1, 0.4], "note": "text"})
        assert tracker.offline, "the first call the server did not answer switches to the journal"
        cell = tracker.start_run("cell-0", parent=stage, tags={"saferay.cell": "cell-0"})
        assert cell.startswith("pending-")
        tracker.log_params(cell, {"model": "sft", "train": {"lr": 1e-3}})
        tracker.log_series(cell, "train/loss", [3.0, 2.0, float("nan"), 1.0])
        plot = tmp_path / "plot.png"
        plot.write_bytes(b"not really a png")
        tracker.log_file(cell, plot, "plots")
        plot.unlink()  # the stage's copy may be gone by the time the server is back
        tracker.end_run(cell)
        model = tracker.start_model(stage, "sft-seed0", tags={"saferay.study": "outage", "saferay.key": "k"})
        tracker.log_model_metrics(stage, model, {"hs": 0.25, "hs_ci": [0.1, 0.4]})
        tracker.finish_model(model, stage)
        tracker.log_table(stage, [{"model": "sft", "hs": 0.25}], "attack_table.json")
        tracker.log_dataset(stage, [{"prompt": "a", "response": "b"}], "harmful_eval", "/store/data/x", "eval")
        tracker.log_json(stage, {"hs": 0.25}, "result.json")
        tracker.set_tag(stage, "saferay.cached", "false")
        tracker.set_tag("0" * 32, "saferay.cached", "false")  # a run that is not there: refused when sent
        tracker.end_run(stage)
        tracker.end_run(parent)
        assert tracker.children(stage, "saferay.cell") == {"cell-0"}, "a resumed sweep must see unsent runs"
        assert not tracker.reconnect(), "nothing answers yet"
        waiting = tracker.journal.pending()

        server = TrackingServer(tmp_path / "server", port=server.port)
        # The next `saferay run` finds the journal; its first replay is cut short by another outage.
        again = Tracker(server.url, "outage", None, Journal(journal_dir))
        assert again.offline
        with pytest.raises(MlflowException):
            again.journal.replay(StopsAnsweringAfter(again.writer, 3), unreachable)
        assert again.journal.pending() == waiting - 3
        assert again.reconnect() and not again.offline and again.journal.pending() == 0
        assert not (journal_dir / "files").exists() and not (journal_dir / "calls.jsonl").exists()
        rejected = [json.loads(line) for line in (journal_dir / "rejected.jsonl").read_text().splitlines()]
        assert [(c["op"], c["args"][0]) for c in rejected] == [("set_tag", "0" * 32)], "set aside, not blocking"

        client = MlflowClient(server.url)
        runs = client.search_runs([again.experiment_id], max_results=100)
        assert sorted(r.info.run_name for r in runs) == ["attack", "cell-0", "study"], "each run sent once"
        assert {r.info.status for r in runs} == {"FINISHED"}
        real_cell = again.resolve(cell)
        assert real_cell != cell and json.loads((journal_dir / "ids.json").read_text())[cell] == real_cell
        run = client.get_run(real_cell)
        assert run.data.tags["mlflow.parentRunId"] == stage and run.data.params["train.lr"] == "0.001"
        assert [(m.step, m.value) for m in client.get_metric_history(real_cell, "train/loss")] == \
            [(0, 3.0), (1, 2.0), (3, 1.0)]
        assert [a.path for a in client.list_artifacts(real_cell, "plots")] == ["plots/plot.png"]
        fetched = client.download_artifacts(real_cell, "plots/plot.png", str(tmp_path / "fetched"))
        assert open(fetched, "rb").read() == b"not really a png"
        staged = client.get_run(stage)
        assert staged.data.metrics == {"hs": 0.25, "hs_ci_lo": 0.1, "hs_ci_hi": 0.4}
        assert staged.data.tags["saferay.cached"] == "false"
        assert {a.path for a in client.list_artifacts(stage)} >= {"attack_table.json", "result.json"}
        assert [d.dataset.name for d in staged.inputs.dataset_inputs] == ["harmful_eval"]
        assert again.children(stage, "saferay.cell") == {"cell-0"}
        logged = client.get_logged_model(again.resolve(model))
        assert model.startswith("pending-") and logged.status == "READY" and logged.source_run_id == stage
        assert {m.key: m.value for m in logged.metrics} == {"hs": 0.25, "hs_ci_lo": 0.1, "hs_ci_hi": 0.4}
    finally:
        server.stop()


def test_a_sqlite_store_held_locked_past_mlflows_wait_delays_calls_and_loses_none(tmp_path):
    """Another process holds the embedded store's database in a write transaction for longer than
    MLflow waits for it (its busy timeout, 20 s): the calls made meanwhile are kept in the journal
    instead of failing the stage, and reach the database once it is free, in order, once each."""
    import sqlite3
    import threading
    import time

    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri, "locked", tmp_path / "mlartifacts", Journal(tmp_path / "journal"))
    parent = tracker.start_run("study")
    stage = tracker.start_run("attack", parent=parent)
    holding, release = threading.Event(), threading.Event()

    def hold_the_database():
        con = sqlite3.connect(uri.removeprefix("sqlite:///"), isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        holding.set()
        release.wait(120)
        con.execute("COMMIT")
        con.close()

    holder = threading.Thread(target=hold_the_database, daemon=True)
    holder.start()
    assert holding.wait(30)
    try:
        began = time.monotonic()
        tracker.log_metrics(stage, {"hs": 0.5})  # waits MLflow's 20 s, then keeps the call
        assert tracker.offline and time.monotonic() - began >= 15
        cell = tracker.start_run("cell-0", parent=stage)  # kept at once: no second wait
        tracker.log_params(cell, {"model": "sft"})
        tracker.end_run(cell)
        assert cell.startswith("pending-") and tracker.journal.pending() == 4
    finally:
        release.set()
        holder.join(30)
    assert tracker.reconnect() and tracker.journal.pending() == 0
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(stage).data.metrics == {"hs": 0.5}
    kept = client.get_run(tracker.resolve(cell))
    assert kept.data.params == {"model": "sft"} and kept.info.status == "FINISHED"
    assert kept.data.tags["mlflow.parentRunId"] == stage
    assert len(client.search_runs([tracker.experiment_id])) == 3


@pytest.mark.parametrize("message, away", [
    ("API request to http://h:5000/api/2.0/mlflow/runs/get failed with exception HTTPConnectionPool(host='h', "
     "port=5000): Max retries exceeded with url: /x (Caused by NewConnectionError('Connection refused'))", True),
    ("API request to http://h:5000/api/2.0/mlflow/runs/get failed with timeout exception Read timed out.", True),
    ("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with exception HTTPConnectionPool(host='h', "
     "port=5000): Max retries exceeded with url: /x (Caused by ResponseError('too many 503 error responses'))", True),
    ("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with exception HTTPConnectionPool(host='h', "
     "port=5000): Max retries exceeded with url: /x (Caused by ResponseError('too many 500 error responses'))", False),
    ("RESOURCE_DOES_NOT_EXIST: Run with id=0000 not found", False),
    ("(sqlite3.OperationalError) database is locked\n[SQL: SELECT runs.run_uuid]", True),
    ("(sqlite3.OperationalError) no such table: runs", False),
])
def test_an_outage_is_told_from_a_refused_request(message, away):
    """Only a server that is not there is waited for; one that answers with an error (a 500 after
    MLflow's retries included) is a bug that must surface, not a call to keep forever."""
    assert unreachable(MlflowException(message)) is away


@pytest.mark.parametrize("command", ["ui", "tracking-server"])
def test_sigterm_to_saferay_stops_the_mlflow_server_it_started(command, tmp_path):
    """`saferay ui` and `saferay tracking-server` start MLflow, which starts a uvicorn worker; a
    SIGTERM to saferay (a service manager, `kill`) must not leave either running."""
    MlflowClient(default_tracking_uri(tmp_path)).search_experiments()  # the store `ui` serves
    port = free_port()
    proc = start_cli(command, "--store", str(tmp_path), "--port", str(port))
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "MLflow runs in processes of its own"
        os.kill(proc.pid, signal.SIGTERM)  # saferay alone, not its process group
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"left running: {[' '.join(p.cmdline())[:120] for p in alive]}"
    finally:
        if proc.poll() is None:
            kill_all(proc)
