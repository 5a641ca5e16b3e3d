"""The one shape every stage has, and what a stage's `run` receives."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from orchestrator.spec import StudySpec
from orchestrator.tracking import Tracker


@dataclass
class StageContext:
    """What a stage's `run` gets. Two kinds of places: directories on the driver (`out`, where
    the driver writes its own outputs, and `input_dir`) and locations (`output`, `input_location`,
    `beside`, `models`: strings that Ray workers on any node read and write through
    `jobs/storage.py`). On a local store a location is the directory's path; on an object store
    it is a URI, and `out` is published there when `run` returns (result.json last)."""

    spec: StudySpec
    key: str
    out: Path  # the driver's private directory of outputs
    inputs: dict[str, tuple[str, StageResult]]  # needed stage -> (its location, its result)
    tracker: Tracker
    run_id: str  # this stage's MLflow run
    ray_storage: Path | str  # a path, or an object-store URI Ray Train writes checkpoints to
    progress: Callable[[str], None] = field(default=lambda msg: None)
    input_runs: dict[str, str] = field(default_factory=dict)  # needed stage -> its MLflow run in this execution
    board: object = None  # a ProgressBoard actor that Ray workers report to
    out_location: str | None = None  # where workers write this stage's outputs (default: `out`)
    local_dir: Callable[[str], Path] = field(default=Path)  # an input's location -> a directory on the driver

    @property
    def key_dir(self) -> Path:
        """On a local store, where this stage's outputs will live once complete (`out` is moved there)."""
        return self.out.parent / self.key

    def final_location(self, *parts: str) -> str:
        """Where these outputs will be read from once the stage is complete."""
        from jobs.storage import is_remote, join

        return join(self.out_location, *parts) if is_remote(self.out_location or "") else join(self.key_dir, *parts)

    def output(self, *parts: str) -> str:
        """A location inside this stage's outputs, for workers to write to."""
        from jobs.storage import join

        return join(self.out_location or self.out, *parts)

    def beside(self, name: str) -> str:
        """A location beside this stage's outputs that outlives an attempt of the stage (a killed
        stage's proxy checkpoints, a sweep's trial models), named for the stage's key."""
        from jobs.storage import join, parent

        return join(parent(self.out_location or self.out), f"{name}-{self.key}")

    def input_location(self, name: str) -> str:
        return self.inputs[name][0]

    def input_dir(self, name: str) -> Path:
        """A needed stage's outputs as a directory on the driver (on an object store, a local copy)."""
        return self.local_dir(self.inputs[name][0])

    def input_result(self, name: str) -> StageResult:
        return self.inputs[name][1]

    def models(self, seed: int | None = None) -> dict[str, str]:
        """Every model the stages this one needs have trained (`StageResult.trained_models`), by
        name, as locations."""
        found: dict[str, str] = {}
        for name, (location, result) in self.inputs.items():
            found |= result.trained_models(location, seed)
        return found

    def trained_by(self, model: str) -> str:
        """The needed stage that trained `model`."""
        return next(name for name, (location, result) in self.inputs.items() if model in result.trained_models(location))


class JsonFields:
    """A dataclass stored as JSON, a key per field; a field typed `list[X]` or `dict[str, X]` of
    such dataclasses X reads back as X."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict):
        """From its JSON; keys this version does not have (an older one wrote them) are left out."""
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _typed(hints[f.name], data[f.name]) for f in fields(cls) if f.name in data})


def _typed(hint, value):
    """`value` read as `hint` where that is a list or str-keyed dict of JsonFields dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    kind = args[-1] if origin in (list, dict) and args else None
    if not (isinstance(kind, type) and issubclass(kind, JsonFields)):
        return value
    return [kind.from_json(v) for v in value] if origin is list else {k: kind.from_json(v) for k, v in value.items()}


@dataclass(kw_only=True)
class StageResult(JsonFields):
    """What a stage's `run` returns: stored as its result.json and logged to its MLflow run. Each
    stage module declares its own subclass, `Result`; `plan`, `show`, the report and other
    stages read it through that class (its fields, `trained_models`, the module's `shown`), never
    by parsing another stage's JSON. (Not `models`: the evaluate and debias results have a field of
    that name, their rates per model.)"""

    seconds: float | None = None  # the stage's own time, set by the runner
    peak_rss_mb: float | None = None

    def trained_models(self, location: str, seed: int | None = None) -> dict[str, str]:
        """The models this stage trained, {name: directory}, as trained from `seed` (default: the
        first seed's). A stage that trains none has none."""
        return {}


@dataclass(frozen=True)
class Stage:
    """What the runner, `plan` and `show` know of a stage; each comes from its module."""

    name: str
    version: int  # bump when the stage's algorithm changes, so cached outputs are redone
    needs: Callable[[StudySpec], tuple[str, ...]]  # the stages whose outputs it reads, for a spec
    config: Callable[[StudySpec], dict]
    run: Callable[[StageContext], StageResult]
    resources: Callable[[StudySpec], str]  # what it asks of the cluster, in words (`saferay plan`)
    shown: Callable[[StageResult, str], dict]  # its part of `saferay show --json`, from its result and location
    result: type[StageResult]  # what `run` returns, and reads back from result.json


TRAIN_KEYS = ("steps", "final_loss", "tokens_per_second", "train_seconds")


@dataclass(kw_only=True)
class TrainingSummary(JsonFields):
    """What a result keeps of a training run (`train_summary`)."""

    steps: int | None = None
    final_loss: float | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    parameters: int | None = None
    peak_rss_mb: float | None = None

    def training(self) -> dict:
        """What `show` prints of it."""
        return {k: getattr(self, k) for k in TRAIN_KEYS}


@dataclass(kw_only=True)
class TrainedModel(TrainingSummary):
    """One trained model of a stage: the first seed's at `model` (relative to the stage's
    directory), every seed's in `replicates`, and the first seed's training summary."""

    model: str
    replicates: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None  # its nested MLflow run, where it has one

    def path(self, location: str, seed: int | None = None) -> str:
        """Where the model trained from `seed` lives (default: the first seed's), inside its
        stage's location."""
        from jobs.storage import join

        return join(location, self.model if seed is None or not self.replicates else self.replicates[str(seed)])


def scaling(section) -> str:
    """A training section's Ray Train scaling, in words."""
    from jobs.launch import strategy_name

    where = "1 GPU" if section.use_gpu else f"{section.cpus_per_worker:g} CPU"
    return f"{section.num_workers} × {where} ({strategy_name(section.model_dump())}, Ray Train)"


def ray_progress(ctx: StageContext, label: str, what: str | None = None):
    """A callback jobs can call from a Ray worker; it reaches the driver's progress line of stage
    `label`, as "<what>: step k/n, loss x"."""
    from orchestrator.progress import RemoteReporter

    return RemoteReporter(ctx.board, label, what) if ctx.board is not None else None


def train_summary(history: dict) -> dict:
    """What a stage's result keeps of a training run's history (`jobs/train_loop.py`): the
    fields of `TrainingSummary`."""
    return {"steps": history["steps"], "final_loss": history["loss"][-1], "train_seconds": history["seconds"],
            "tokens_per_second": history["tokens"] / max(history["seconds"], 1e-9),
            **{k: history[k] for k in ("parameters", "peak_rss_mb") if k in history}}


def run_name(ctx: StageContext, name: str) -> str:
    """A Ray Train run's name: the same on every attempt of this stage (so a restarted stage resumes
    each run from its checkpoints), distinct across studies, stages (the key) and runs."""
    return f"{ctx.spec.study}-{name}-{ctx.key}"


def run_bounded(ctx: StageContext, jobs: dict, limit: int, noun: str):
    """Jobs {key: (function, args, kwargs)} as Ray tasks holding no CPU (each launches a Ray Train
    run whose workers hold the resources), at most `limit` at a time; results as they finish."""
    import ray

    queue, pending, done, remote = list(jobs.items()), {}, 0, {}
    while queue or pending:
        while queue and len(pending) < limit:
            key, (fn, args, kwargs) = queue.pop(0)
            task = remote.setdefault(fn, ray.remote(fn).options(num_cpus=0, max_retries=0))
            pending[task.remote(*args, **kwargs)] = key
        ctx.progress(f"{done}/{len(jobs)} {noun} ({len(pending)} running)")
        ready, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ready[0])
        done += 1
        yield key, ray.get(ready[0])


def wait_all(ctx: StageContext, refs: dict, noun: str):
    """Results of Ray tasks as they finish (any order), with a progress line per completion."""
    import ray

    pending, done = dict(refs), 0
    while pending:
        ctx.progress(f"{done}/{len(refs)} {noun}")
        ready, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ready[0])
        done += 1
        yield key, ray.get(ready[0])


def with_tuned(needs: tuple[str, ...], spec: StudySpec) -> tuple[str, ...]:
    """A stage's inputs plus the tune stage where it trains a model (`tune.apply`): only then does
    the stage read it, so only then does a new sweep redo the stage."""
    return needs + ("tune",) if spec.tune.apply else needs


SHARED_BY_SEEDS = ("base",)  # models no seed retrains: evaluated once
