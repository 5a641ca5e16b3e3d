"""The one shape every stage has, and what a stage's `run` receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator.spec import StudySpec
from orchestrator.tracking import Tracker


@dataclass
class StageContext:
    spec: StudySpec
    key: str
    out: Path  # private directory; moved into the store when `run` returns
    inputs: dict[str, tuple[Path, dict]]  # needed stage -> (its directory, its result)
    tracker: Tracker
    run_id: str  # this stage's MLflow run
    ray_storage: Path | str  # a path, or an object-store URI Ray Train writes checkpoints to
    progress: Callable[[str], None] = field(default=lambda msg: None)
    input_runs: dict[str, str] = field(default_factory=dict)  # needed stage -> its MLflow run in this execution
    board: object = None  # a ProgressBoard actor that Ray workers report to

    @property
    def key_dir(self) -> Path:
        """Where this stage's outputs will live once complete (`out` is moved there)."""
        return self.out.parent / self.key

    def input_dir(self, name: str) -> Path:
        return self.inputs[name][0]

    def input_result(self, name: str) -> dict:
        return self.inputs[name][1]


@dataclass(frozen=True)
class Stage:
    """What the runner, `plan` and `show` know of a stage; each comes from its module."""

    name: str
    version: int  # bump when the stage's algorithm changes, so cached outputs are redone
    needs: tuple[str, ...]
    config: Callable[[StudySpec], dict]
    run: Callable[[StageContext], dict]
    resources: Callable[[StudySpec], str]  # what it asks of the cluster, in words (`saferay plan`)
    shown: Callable[[dict, Path], dict]  # its part of `saferay show --json`, from its result and directory


TRAIN_KEYS = ("steps", "final_loss", "tokens_per_second", "train_seconds")


def training_shown(result: dict) -> dict:
    """What `show` prints of a training run's summary (`train_summary`)."""
    return {k: result.get(k) for k in TRAIN_KEYS}


def scaling(section) -> str:
    """A training section's Ray Train scaling, in words."""
    from jobs.launch import strategy_name

    where = "1 GPU" if section.use_gpu else f"{section.cpus_per_worker:g} CPU"
    return f"{section.num_workers} × {where} ({strategy_name(section.model_dump())}, Ray Train)"


def model_dir(stage_dir: Path, result: dict) -> str:
    """Where a stage's model lives: inside the stage, or (a pretrained source) elsewhere."""
    return str(stage_dir / result["model"]) if result.get("model_in_stage", True) else result["model"]


def replicate_dir(stage_dir: Path, result: dict, seed: int | None) -> str:
    """One seed's replicate of a trained model (the first seed's, which `model_dir` gives, by default)."""
    if seed is None or "replicates" not in result:
        return model_dir(stage_dir, result)
    return str(stage_dir / result["replicates"][str(seed)])


def ray_progress(ctx: StageContext, label: str, what: str | None = None):
    """A callback jobs can call from a Ray worker; it reaches the driver's progress line of stage
    `label`, as "<what>: step k/n, loss x"."""
    from orchestrator.progress import RemoteReporter

    return RemoteReporter(ctx.board, label, what) if ctx.board is not None else None


def train_summary(history: dict) -> dict:
    """What a stage's result keeps of a training run's history (`jobs/train_loop.py`)."""
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


def aligned_models(ctx: StageContext, seed: int | None = None) -> dict[str, str]:
    """Every model the attack and evaluation can name: base, sft, each trained VAA variant and each
    trained defence, as trained from `seed` (the base is shared by every seed; default: the first
    seed's models)."""
    models = {"base": model_dir(ctx.input_dir("base"), ctx.input_result("base")),
              "sft": replicate_dir(ctx.input_dir("align_sft"), ctx.input_result("align_sft"), seed)}
    for stage, key in (("align_vaa", "variants"), ("align_defences", "defences")):
        if stage in ctx.inputs:
            for name, v in ctx.input_result(stage).get(key, {}).items():
                models[name] = replicate_dir(ctx.input_dir(stage), v, seed)
    return models


SHARED_BY_SEEDS = ("base",)  # models no seed retrains: evaluated once
