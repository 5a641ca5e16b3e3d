"""The align_sft stage: SFT of the base model on the alignment mix, once per seed, on Ray Train
through the one loop; and the alignment runs other stages train with its recipe (VAA, the
over-aligned model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from orchestrator.spec import StudySpec
from orchestrator.stage import StageContext, StageResult, TrainedModel, run_name, scaling, train_summary

NAME = "align_sft"
VERSION = 2  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ("data", "base")


def alignment_frame(data_dir: Path, spec: StudySpec, lookalike: bool | None = None, seed: int | None = None):
    """The alignment mix of the spec, in the order of `seed` (default: the study's seed)."""
    from jobs.recipes import alignment_mix

    a = spec.align_sft
    return alignment_mix(data_dir, a.lookalike if lookalike is None else lookalike, a.benign_per_task,
                         spec.seed if seed is None else seed)


@dataclass(kw_only=True)
class Result(StageResult, TrainedModel):
    """The SFT model, one replicate per seed, with the first seed's training summary."""

    strategy: str | None = None  # what ran (`jobs/launch.py::strategy_name`)
    rows: int | None = None  # the alignment mix's rows
    resumed_from_epoch: int | None = None

    def trained_models(self, location: str, seed: int | None = None) -> dict[str, str]:
        return {"sft": self.path(location, seed)}


@dataclass
class AlignmentRun:
    """One alignment run of a stage: `train` is align_sft's section or a recipe over it (VAA, a
    defence), `step` and `step_config` what the loop does per step; the model is exported to `out`."""
    name: str
    rows: pd.DataFrame
    out: str  # a location (`StageContext.output`)
    seed: int
    train: dict
    step: str = "sft"
    step_config: dict | None = None


def fit_alignments(ctx: StageContext, group: str, runs: list[AlignmentRun]) -> list[dict]:
    """A stage's alignment runs (seeds, variants, defences), in turn on one Ray Train worker group
    with align_sft's scaling; their histories, each with the loop's config.

    The runs went one after another anyway; as one group they pay the worker group's start-up
    (~20 s on 2 CPU cores) once, not once each. The group's name carries the stage's key, so a
    restarted stage resumes the run it was in from its last epoch and keeps the ones before."""
    from jobs.launch import fit_group, run_config, strategy_name
    from jobs.models import pad_token_id
    from jobs.storage import join, write_parquet

    if not runs:
        return []
    spec = ctx.spec
    pad_id = pad_token_id(ctx.input_dir("data") / "tokenizer")
    base = ctx.models()["base"]
    cfgs = []
    for run in runs:
        rows = ctx.output("rows", f"{run.name}.parquet")
        write_parquet(run.rows, rows)  # the run's workers read it, on any node
        cfgs.append(run_config(run.train, model_dir=base, tokenizer_dir=join(ctx.input_location("data"), "tokenizer"),
                               data=rows, seed=run.seed, pad_id=pad_id, max_len=spec.model.tiny.max_len,
                               out_dir=run.out, step=run.step, step_config=run.step_config))
    ctx.progress(f"{', '.join(r.name for r in runs)}: training in turn on {cfgs[0]['num_workers']} Ray Train "
                 f"workers ({strategy_name(cfgs[0])})")
    histories = fit_group(cfgs, run_name(ctx, group), str(ctx.ray_storage))
    return [{**history, "config": cfg} for history, cfg in zip(histories, cfgs)]


def config(spec: StudySpec) -> dict:
    return {"train": spec.align_sft.model_dump(), "seed": spec.seed, "seeds": spec.replicates,
            "max_len": spec.model.tiny.max_len}


def replicate_path(name: str, seed: int, first: bool) -> str:
    """Where one replicate of a trained model lives in its stage: the first seed's at `[name/]model`
    (what single-seed consumers read), the others beside it."""
    prefix = f"{name}/" if name else ""
    return f"{prefix}model" if first else f"{prefix}seed{seed}/model"


def replicate_name(run: str, seed: int, spec: StudySpec) -> str:
    """A Ray Train run name per replicate (a resumed stage finds each run's checkpoints)."""
    return run if len(spec.replicates) == 1 else f"{run}-s{seed}"


def resources(spec: StudySpec) -> str:
    return f"{len(spec.replicates)} run(s) of {scaling(spec.align_sft)}"


def shown(result: Result, location: str) -> dict:
    return {"training": {NAME: result.training()}} if result.final_loss is not None else {}


def run(ctx: StageContext) -> Result:
    spec = ctx.spec
    runs = [sft_run(ctx, replicate_name("align_sft", seed, spec), ctx.output(replicate_path("", seed, i == 0)), seed)
            for i, seed in enumerate(spec.replicates)]
    replicates, first = {}, None
    for i, (seed, run_, history) in enumerate(zip(spec.replicates, runs, fit_alignments(ctx, NAME, runs))):
        result = sft_summary(run_, history)
        ctx.tracker.log_series(ctx.run_id, "train/loss" if i == 0 else f"train/loss_seed{seed}", result.pop("losses"))
        replicates[str(seed)] = replicate_path("", seed, i == 0)
        first = first or result
    return Result(model="model", replicates=replicates, **first)


def sft_run(ctx: StageContext, name: str, out: str, seed: int, epochs: int | None = None,
            lookalike: bool | None = None) -> AlignmentRun:
    """SFT of the base model on the alignment mix in `seed`'s order; align_sft's recipe unless
    `epochs` or `lookalike` say otherwise (the over-aligned model of the debias stage)."""
    train = ctx.spec.align_sft.model_dump()
    return AlignmentRun(name, alignment_frame(ctx.input_dir("data"), ctx.spec, lookalike, seed), out, seed,
                        {**train, "epochs": epochs or train["epochs"]})


def sft_summary(run: AlignmentRun, history: dict) -> dict:
    from jobs.launch import strategy_name

    return {"strategy": strategy_name(history["config"]), "rows": len(run.rows), "losses": history["loss"],
            "resumed_from_epoch": history["start_epoch"], **train_summary(history)}


def train_sft(ctx: StageContext, name: str, out: str, epochs: int | None = None, lookalike: bool | None = None) -> dict:
    """One SFT run of the study's seed on a worker group of its own (the debias stage's over-aligned model)."""
    run = sft_run(ctx, name, out, ctx.spec.seed, epochs, lookalike)
    return sft_summary(run, fit_alignments(ctx, name, [run])[0])
