"""The align_defences stage: the alignment-stage baseline defences of SCIENCE.md §9 (Vaccine,
Booster, RepNoise), each once per seed on align_sft's alignment mix, recipe and scaling, on Ray
Train through the one loop. Booster and RepNoise also draw batches from `defences.harmful_rows`
rows of the harmful corpus (`jobs/recipes.py::defence_harmful`), which the attack's poison leaves out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.spec import StudySpec
from orchestrator.stage import StageContext, StageResult, TrainedModel, scaling, train_summary
from orchestrator.stages.align_sft import AlignmentRun, alignment_frame, fit_alignments, replicate_name, replicate_path
from orchestrator.stages.align_sft import config as align_config

NAME = "align_defences"
VERSION = 1  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ("data", "base")
USES_HARMFUL = ("booster", "repnoise")


@dataclass(kw_only=True)
class Defence(TrainedModel):
    knobs: dict = field(default_factory=dict)  # its section of `defences` in the spec


@dataclass(kw_only=True)
class Result(StageResult):
    defences: dict[str, Defence] = field(default_factory=dict)
    harmful_rows: int = 0  # of the harmful corpus, drawn by Booster and RepNoise (the attack leaves them out)

    def trained_models(self, location: str, seed: int | None = None) -> dict[str, str]:
        return {name: d.path(location, seed) for name, d in self.defences.items()}


def config(spec: StudySpec) -> dict:
    if not spec.defences.train:
        return {"train": []}
    return {"defences": spec.defences.model_dump(mode="json", exclude={"lisa"}), **align_config(spec)}


def resources(spec: StudySpec) -> str:
    if not spec.defences.train:
        return "none"
    return f"{len(spec.defences.train) * len(spec.replicates)} run(s) of {scaling(spec.align_sft)}"


def shown(result: Result, location: str) -> dict:
    if not result.defences:
        return {}
    return {"defences": {name: d.training() for name, d in result.defences.items()}}


def harmful_set(ctx: StageContext):
    """The harmful rows Booster and RepNoise draw batches from (stream `harmful`)."""
    from jobs.recipes import defence_harmful

    return defence_harmful(ctx.input_dir("data"), ctx.spec.defences.harmful_rows).assign(stream="harmful")


def defence_run(ctx: StageContext, defence: str, name: str, seed: int, out: str, knobs: dict,
                harmful=None) -> AlignmentRun:
    """One run of `defence` with `knobs`: align_sft's recipe on the alignment mix in `seed`'s
    order, plus the harmful set for the defences that train on one."""
    import pandas as pd

    rows = alignment_frame(ctx.input_dir("data"), ctx.spec, seed=seed)
    if defence in USES_HARMFUL:
        rows = pd.concat([rows.assign(stream=None), harmful], ignore_index=True)
    return AlignmentRun(name, rows, out, seed, ctx.spec.align_sft.model_dump(), step=defence, step_config=knobs)


def run(ctx: StageContext) -> Result:
    from jobs.corpora import read_split
    from jobs.records import InputError

    spec = ctx.spec
    data_dir = ctx.input_dir("data")
    pool = len(read_split(data_dir, "harmful", ["id"]))
    if spec.defences.harmful_rows >= pool:
        raise InputError(f"defences.harmful_rows: {spec.defences.harmful_rows} leaves no poison for the attack "
                         f"(the harmful corpus has {pool} rows after splitting)")
    harmful = harmful_set(ctx) if any(d in USES_HARMFUL for d in spec.defences.train) else None
    runs = [defence_run(ctx, name, replicate_name(name, seed, spec), seed, ctx.output(replicate_path(name, seed, k == 0)),
                        getattr(spec.defences, name).model_dump(), harmful)
            for name in spec.defences.train for k, seed in enumerate(spec.replicates)]
    histories = iter(fit_alignments(ctx, NAME, runs))
    trained = {}
    for name in spec.defences.train:
        knobs = getattr(spec.defences, name).model_dump()
        for k, seed in enumerate(spec.replicates):
            history, path = next(histories), replicate_path(name, seed, k == 0)
            run_id = track_defence(ctx, name if k == 0 else f"{name}-s{seed}", knobs, history)
            if k == 0:
                trained[name] = Defence(model=path, run_id=run_id, knobs=knobs, **train_summary(history))
            trained[name].replicates[str(seed)] = path
    return Result(defences=trained, harmful_rows=0 if harmful is None else len(harmful))


def track_defence(ctx: StageContext, run: str, knobs: dict, history: dict) -> str:
    """A nested MLflow run per defence and seed: its knobs, and every per-step value its step reports."""
    t, cfg = ctx.tracker, history["config"]
    run_id = t.start_run(run, parent=ctx.run_id, tags={"saferay.defence": run})
    t.log_params(run_id, {**knobs, **{k: cfg[k] for k in ("lr", "epochs", "strategy", "batch_size")}})
    for key, values in history.items():
        if isinstance(values, list) and values and isinstance(values[0], (int, float)):
            t.log_series(run_id, "train/loss" if key == "loss" else f"defence/{key}", values)
    t.end_run(run_id)
    return run_id
