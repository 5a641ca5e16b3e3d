"""A stage run's system metrics describe the stage, even one shorter than a sampling interval
(the smoke study's data stage takes ~8 s against the default 10 s interval)."""

import time

import psutil
from mlflow.tracking import MlflowClient

from orchestrator.system_metrics import _monitor_class


def test_a_stage_shorter_than_one_interval_logs_its_own_cpu_use(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sys", artifact_location=str(tmp_path / "a"))).info.run_id
    # psutil measures CPU since the calling thread's previous call. This thread's was 6 idle
    # seconds before the stage: a closing sample taken here would see a fifth of the stage's use.
    # (A sample taken as the stage starts, a new thread's first, covers almost no time: it mostly
    # reads 0.0, which fails here, but reads anything when a clock tick falls inside it.)
    psutil.cpu_percent()
    time.sleep(6)
    monitor = _monitor_class()(run_id, sampling_interval=10, resume_logging=True, tracking_uri=uri)
    monitor.start()
    busy_until = time.perf_counter() + 2.0
    while time.perf_counter() < busy_until:  # one core fully busy for the whole stage
        pass
    monitor.finish()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    # One busy core of this machine's; well above what an idle machine shows.
    assert [m.value >= 100 / psutil.cpu_count() / 2 for m in history] == [True], [m.value for m in history]
