"""MLflow tracking: one experiment per study, a parent run per execution, nested runs below.

Everything is logged from the driver through `MlflowClient` with explicit run ids, so
nesting never depends on an "active run" and jobs stay free of tracking code.

A tracking server that stops answering mid-study does not stop the study: from the failed call
on, every call is written to the study's journal (`tracking_journal.py`) and sent when the server
answers again, at the next stage boundary or the next `saferay run`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import re
import tempfile
import urllib.request
from pathlib import Path

from orchestrator.spec import flatten
from orchestrator.tracking_journal import Journal

PARENT_TAG = "mlflow.parentRunId"
# A study's experiment is model training, and says so. MLflow 3.17's UI still opens every
# experiment on its GenAI overview ("Traces: 0") until the user flips its "Model training" switch:
# the view follows the `workflowType` of the link (or the switch), not this tag, so every link
# saferay prints carries it (`ui_url`).
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def ui_url(ui: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """A link into the MLflow UI that opens on runs (the model-training view), not on traces."""
    page = "/experiments" + (f"/{experiment_id}" if experiment_id else "") + (f"/runs/{run_id}" if run_id else "")
    return f"{ui.rstrip('/')}/#{page}?workflowType=machine_learning"
MAX_PARAM_CHARS = 6000
BATCH = 900  # log_batch accepts at most 1000 entries per call
log = logging.getLogger("saferay")


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


# How MLflow's REST client reports a server it could not reach after its own retries (refused or
# reset connections, timeouts, a gateway answering 502/503/504 for it), as opposed to a request
# the server answered with an error (a 500 included: a bug, which must still raise).
_FAILED = re.compile(r"API request to .* failed with (timeout exception|exception)")
_ANSWERED = re.compile(r"ResponseError\('too many (?!50[234] )\d+ error responses")
# A SQLite store that another process holds locked for longer than MLflow waits (its busy
# timeout, 20 s: a `sqlite3` shell left in a transaction, a long query of the UI) is away for now
# in the same sense: the call is kept and sent later, rather than failing the stage.
_LOCKED = "(sqlite3.OperationalError) database is locked"


def unreachable(e: BaseException) -> bool:
    """Whether the tracking store could not take the call now (as opposed to refusing it)."""
    import requests

    if isinstance(e, requests.exceptions.ConnectionError):
        return True
    message = str(e)
    return _LOCKED in message or (bool(_FAILED.search(message)) and not _ANSWERED.search(message))


class MlflowWriter:
    """The calls a study makes, each on explicit run ids; every argument is JSON (the journal
    records them as they are)."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        with _sqlite_lock(uri):  # two studies starting at once must not both create the schema
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = (Path(artifact_root) / experiment).absolute().as_uri() if artifact_root else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location,
                                                                   tags={KIND_TAG: MODEL_TRAINING})
            else:
                self.experiment_id = found.experiment_id
                if found.tags.get(KIND_TAG) != MODEL_TRAINING:
                    self.client.set_experiment_tag(self.experiment_id, KIND_TAG, MODEL_TRAINING)

    def answers(self, timeout: float = 3.0) -> bool:
        """Whether the tracking server is back (always, for a local store)."""
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            urllib.request.urlopen(f"{self.uri.rstrip('/')}/health", timeout=timeout)
            return True
        except urllib.error.HTTPError:
            return True  # it answers (an auth proxy may refuse /health)
        except OSError:
            return False

    def start_run(self, name: str, parent: str | None = None, tags: dict | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent:
            tags[PARENT_TAG] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        items = [Metric(metric_key(k), float(v), 0, step) for k, v in metrics.items()]
        self._log_metric_batches(run_id, items)

    def log_series(self, run_id: str, key: str, values: list[float], steps: list[int]) -> None:
        from mlflow.entities import Metric

        items = [Metric(metric_key(key), float(v), 0, step) for step, v in zip(steps, values, strict=True)]
        self._log_metric_batches(run_id, items)

    def _log_metric_batches(self, run_id: str, items: list) -> None:
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + BATCH])

    def log_json(self, run_id: str, obj, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(artifact_file).name
            path.write_text(json.dumps(obj, indent=2, default=str))
            self.client.log_artifact(run_id, str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_table(self, run_id: str, table: dict, artifact_file: str) -> None:
        import pandas as pd

        self.client.log_table(run_id, data=pd.DataFrame(table["data"], columns=table["columns"]),
                              artifact_file=artifact_file)

    def log_dataset(self, run_id: str, dataset: dict, context: str) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self.client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**dataset),
                                                              tags=[InputTag("mlflow.data.context", context)])])

    def log_file(self, run_id: str, path: str, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_dir)

    def start_model(self, run_id: str, name: str, tags: dict, params: dict) -> str:
        """An MLflow LoggedModel that run `run_id` produced (its weights stay where they are); the
        one already there when a restarted stage makes it again (same name, study and stage key)."""
        from mlflow.entities import LoggedModelOutput

        found = self.client.search_logged_models(
            experiment_ids=[self.experiment_id], max_results=1,
            filter_string=f"name = '{name}' AND tags.`saferay.key` = '{tags['saferay.key']}' "
                          f"AND tags.`saferay.study` = '{tags['saferay.study']}'")
        if found:
            return found[0].model_id  # `finish_model` then leaves it as it is
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id, tags=tags,
                                                params=params, model_type="saferay")
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
        return model.model_id

    def log_model_metrics(self, run_id: str, model_id: str, metrics: dict) -> None:
        """Metrics of a model, measured by run `run_id`. MLflow writes them to the run too, under the
        same keys: give keys that name the model."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, 0, model_id=model_id, run_id=run_id) for k, v in metrics.items()]
        self._log_metric_batches(run_id, items)

    def finish_model(self, model_id: str, run_id: str, copy_from: str | None, register_as: str | None) -> None:
        """Ready; with `copy_from`, the weights copied into MLflow; with `register_as`, a new version
        of that registered model. A model already READY (a restarted stage's) is left as it is."""
        if self.client.get_logged_model(model_id).status == "READY":
            return
        if copy_from:
            self.client.log_model_artifacts(model_id, copy_from)
        self.client.finalize_logged_model(model_id, "READY")
        if register_as:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(register_as)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            # The model's own location, not `models:/<id>`: the client resolves that through the
            # process-wide tracking URI, not its own.
            location = self.client.get_logged_model(model_id).artifact_location
            self.client.create_model_version(register_as, source=location, run_id=run_id, model_id=model_id)

    def children(self, parent: str, tag: str) -> set[str]:
        """The values of tag `tag` over the runs nested under `parent`."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent}'",
                                       max_results=1000)
        return {r.data.tags.get(tag) for r in runs}


class Tracker:
    """What stages and the runner call. Each call goes to MLflow; once the server has failed to
    answer, calls go to the journal instead, until `reconnect` finds the server back and sends
    them (in order, each once)."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None, journal: Journal):
        self.writer = MlflowWriter(uri, experiment, artifact_root)
        self.journal = journal
        self.uri, self.experiment_id = uri, self.writer.experiment_id
        self.offline = self.journal.pending() > 0  # an earlier execution left calls unsent
        self.notify = log.warning  # how the user hears the server went away or came back

    def reconnect(self) -> bool:
        """Send what the journal holds if the server answers; True once nothing waits."""
        if not self.offline:
            return True
        if not self.writer.answers():
            return False
        try:
            refused = self.journal.replay(self.writer, unreachable)
        except Exception as e:
            if not unreachable(e):
                raise
            return False
        for call, error in refused:
            self.notify(f"MLflow at {self.uri} refused a kept tracking call ({call['op']}: {error[:200]}); "
                        f"it is kept in {self.journal.rejected}")
        self.offline = False
        self.notify(f"MLflow at {self.uri} answers again: sent the tracking calls kept in {self.journal.dir}")
        return True

    def resolve(self, run_id: str | None) -> str | None:
        """The MLflow id of a run started while the server was away, once it has been sent."""
        return self.journal.resolve(run_id)

    def _call(self, op: str, *args, files: tuple[str, ...] = ()):
        if not self.offline:
            try:
                return getattr(self.writer, op)(*[self.resolve(a) if isinstance(a, str) else a for a in args])
            except Exception as e:
                if not unreachable(e):
                    raise
                self.offline = True
                self.notify(f"MLflow at {self.uri} does not answer ({str(e)[:200]}); the study goes on and keeps "
                            f"its tracking calls in {self.journal.dir} until it answers again")
        return self.journal.append(op, list(args), files)

    def start_run(self, name: str, parent: str | None = None, tags: dict | None = None) -> str:
        return self._call("start_run", name, parent, {k: str(v) for k, v in (tags or {}).items()})

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("end_run", run_id, status)

    def reopen_run(self, run_id: str) -> None:
        self._call("reopen_run", run_id)

    def set_tag(self, run_id: str, key: str, value) -> None:
        self._call("set_tag", run_id, key, str(value))

    def log_params(self, run_id: str, params: dict) -> None:
        self._call("log_params", run_id, {k: str(v) for k, v in flatten(params).items()})

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        self._call("log_metrics", run_id, _finite(metrics), step)

    def log_series(self, run_id: str, key: str, values: list[float], steps: list[int] | None = None) -> None:
        """A curve over steps (loss), one metric entry per step (steps 0.. unless given)."""
        steps = list(range(len(values))) if steps is None else list(steps)
        kept = [(int(s), float(v)) for s, v in zip(steps, values, strict=True) if _is_number(v)]
        self._call("log_series", run_id, key, [v for _, v in kept], [s for s, _ in kept])

    def log_json(self, run_id: str, obj, artifact_file: str) -> None:
        self._call("log_json", run_id, json.loads(json.dumps(obj, default=str)), artifact_file)

    def log_table(self, run_id: str, rows: list[dict], artifact_file: str) -> None:
        """A table as an MLflow table artifact (JSON, shown in the UI's artifact view)."""
        import pandas as pd

        table = json.loads(pd.DataFrame(rows).to_json(orient="split", index=False, default_handler=str))
        self._call("log_table", run_id, table, artifact_file)

    def log_dataset(self, run_id: str, rows: list[dict], name: str, source: str, context: str) -> None:
        """A dataset as a run input: schema, row count, digest and where it lives; not its rows."""
        import mlflow.data
        import pandas as pd

        entity = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=name)._to_mlflow_entity()
        fields = {k: getattr(entity, k) for k in ("name", "digest", "source_type", "source", "schema", "profile")}
        self._call("log_dataset", run_id, fields, context)

    def log_file(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        self._call("log_file", run_id, str(path), artifact_dir, files=(str(path),))

    def start_model(self, run_id: str, name: str, tags: dict | None = None, params: dict | None = None) -> str:
        return self._call("start_model", run_id, name, {k: str(v) for k, v in (tags or {}).items()},
                          {k: str(v) for k, v in flatten(params or {}).items()})

    def log_model_metrics(self, run_id: str, model_id: str, metrics: dict) -> None:
        self._call("log_model_metrics", run_id, model_id, _finite(metrics))

    def finish_model(self, model_id: str, run_id: str, copy_from: Path | None = None,
                     register_as: str | None = None) -> None:
        self._call("finish_model", model_id, run_id, str(copy_from) if copy_from else None, register_as)

    def children(self, parent: str, tag: str) -> set[str]:
        """Tag `tag` of each run nested under `parent`, sent or waiting in the journal."""
        waiting = self.journal.children(parent, tag)
        if self.offline:
            return waiting
        try:
            return self.writer.children(self.resolve(parent), tag) | waiting
        except Exception as e:
            if not unreachable(e):
                raise
            self.offline = True
            return waiting


def _finite(metrics: dict) -> dict[str, float]:
    """Flattened numeric metrics; an interval `x_ci: [lo, hi]` as its two ends."""
    flat = {}
    for k, v in flatten(metrics).items():
        if "_ci" in k and isinstance(v, (list, tuple)) and len(v) == 2:
            flat[f"{k}_lo"], flat[f"{k}_hi"] = v
        else:
            flat[k] = v
    return {k: float(v) for k, v in flat.items() if _is_number(v)}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
