"""MLflow tracking: one experiment per study, a parent run per execution, nested runs below.

Everything is logged from the driver through `MlflowClient` with explicit run ids, so
nesting never depends on an "active run" and jobs stay free of tracking code.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
import tempfile
from pathlib import Path

from orchestrator.spec import flatten

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000
BATCH = 900  # log_batch accepts at most 1000 entries per call


def metric_key(name: str) -> str:
    """A metric name MLflow accepts: a model such as `sft+lisa` is logged as `sft_lisa`."""
    return re.sub(r"[^/\w.\- :]", "_", name)


@contextlib.contextmanager
def _sqlite_lock(uri: str):
    """An exclusive lock beside a SQLite tracking database while it is opened (and, the first
    time, migrated); other backends need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///")).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{Path(root).absolute() / 'mlflow.db'}"


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        with _sqlite_lock(uri):  # two studies starting at once must not both create the schema
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = (Path(artifact_root) / experiment).absolute().as_uri() if artifact_root else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id

    def start_run(self, name: str, parent: str | None = None, tags: dict | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent:
            tags[PARENT_TAG] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        flat = {}
        for k, v in flatten(metrics).items():
            if "_ci" in k and isinstance(v, (list, tuple)) and len(v) == 2:  # an interval: its two ends
                flat[f"{k}_lo"], flat[f"{k}_hi"] = v
            else:
                flat[k] = v
        items = [Metric(metric_key(k), float(v), 0, step) for k, v in flat.items() if _is_number(v)]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + BATCH])

    def log_series(self, run_id: str, key: str, values: list[float], steps: list[int] | None = None) -> None:
        """A curve over steps (loss), one metric entry per step (steps 0.. unless given)."""
        from mlflow.entities import Metric

        steps = range(len(values)) if steps is None else steps
        items = [Metric(metric_key(key), float(v), 0, step) for step, v in zip(steps, values, strict=True)
                 if _is_number(v)]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + BATCH])

    def log_json(self, run_id: str, obj, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(artifact_file).name
            path.write_text(json.dumps(obj, indent=2, default=str))
            self.client.log_artifact(run_id, str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_table(self, run_id: str, rows: list[dict], artifact_file: str) -> None:
        """A table as an MLflow table artifact (JSON, shown in the UI's artifact view)."""
        import pandas as pd

        self.client.log_table(run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    def log_dataset(self, run_id: str, rows: list[dict], name: str, source: str, context: str) -> None:
        """A dataset as a run input: schema, row count, digest and where it lives; not its rows."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=name)
        entity = dataset._to_mlflow_entity()  # the client API takes the entity; no active run needed
        self.client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])

    def log_file(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_dir)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
