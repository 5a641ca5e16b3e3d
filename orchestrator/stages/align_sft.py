"""The align_sft stage: SFT of the base model on the alignment mix, once per seed, on Ray Train
through the one loop; and the alignment runs other stages train with its recipe (VAA, the
over-aligned model)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec import StudySpec
from orchestrator.stage import StageContext, model_dir, run_name, scaling, train_summary, training_shown

NAME = "align_sft"
VERSION = 2  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ("data", "base")


def alignment_frame(data_dir: Path, spec: StudySpec, lookalike: bool | None = None, seed: int | None = None):
    """The alignment mix of the spec, in the order of `seed` (default: the study's seed)."""
    from jobs.recipes import alignment_mix

    a = spec.align_sft
    return alignment_mix(data_dir, a.lookalike if lookalike is None else lookalike, a.benign_per_task,
                         spec.seed if seed is None else seed)


def fit_alignment(ctx: StageContext, run: str, rows, out: Path, seed: int, train: dict, step: str = "sft",
                  step_config: dict | None = None) -> dict:
    """One alignment run (`train`: align_sft's section, or VAA's recipe over it) on `rows`, its
    model exported to `out`.

    The run's name carries the stage's key, so a restarted stage resumes it from its last epoch."""
    from jobs.launch import fit, run_config, strategy_name
    from jobs.models import load_tokenizer

    spec = ctx.spec
    data_dir = ctx.input_dir("data")
    rows_file = ctx.out / "rows" / f"{run}.parquet"
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(rows_file)
    cfg = run_config(train, model_dir=model_dir(ctx.input_dir("base"), ctx.input_result("base")),
                     tokenizer_dir=str(data_dir / "tokenizer"), data=str(rows_file), seed=seed,
                     pad_id=load_tokenizer(data_dir / "tokenizer").pad_token_id, max_len=spec.model.tiny.max_len,
                     out_dir=str(out), step=step, step_config=step_config)
    ctx.progress(f"{run}: training on {cfg['num_workers']} Ray Train workers ({strategy_name(cfg)})")
    history = fit(cfg, run_name(ctx, run), str(ctx.ray_storage))
    return {**history, "config": cfg}


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


def shown(result: dict, stage_dir: Path) -> dict:
    return {"training": {NAME: training_shown(result)}} if "final_loss" in result else {}


def run(ctx: StageContext) -> dict:
    replicates, first = {}, None
    for i, seed in enumerate(ctx.spec.replicates):
        path = replicate_path("", seed, i == 0)
        result = train_sft(ctx, replicate_name("align_sft", seed, ctx.spec), ctx.out / path, seed=seed)
        ctx.tracker.log_series(ctx.run_id, "train/loss" if i == 0 else f"train/loss_seed{seed}", result.pop("losses"))
        replicates[str(seed)] = path
        first = first or result
    return {"model": "model", "replicates": replicates, **first}


def train_sft(ctx: StageContext, run: str, out: Path, epochs: int | None = None, lookalike: bool | None = None,
              seed: int | None = None) -> dict:
    """SFT of the base model on the alignment mix, exported to `out`; align_sft's recipe unless
    `epochs` or `lookalike` say otherwise (the over-aligned model of the debias stage), from `seed`
    (default: the study's seed)."""
    from jobs.launch import strategy_name

    seed = ctx.spec.seed if seed is None else seed
    mix = alignment_frame(ctx.input_dir("data"), ctx.spec, lookalike, seed)
    train = ctx.spec.align_sft.model_dump()
    history = fit_alignment(ctx, run, mix, out, seed, {**train, "epochs": epochs or train["epochs"]})
    return {"strategy": strategy_name(history["config"]), "rows": len(mix), "losses": history["loss"],
            "resumed_from_epoch": history["start_epoch"], **train_summary(history)}
