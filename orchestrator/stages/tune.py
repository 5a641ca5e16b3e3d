"""The tune stage: Ray Tune over one aligned model's knobs (VAA's forgetting threshold and DRO
knobs, or a defence's: `tune.model`), the Pareto front of (HS ↓, FA ↑) on validation, and the
configuration the spec's selection rule picks; with `tune.apply`, that configuration trained once
per seed as `<model>-tuned`, which the attack and evaluate stages treat like every other model.

It runs before the attack stage (which attacks the tuned model), so it attacks its own baselines
(SFT, and the searched model with the spec's knobs) on the tuning tasks at p: the same cells, from
the same draws, as the attack stage's first seed.

A sweep interrupted with its driver resumes with Tune's own restore (the run name carries the
stage key), so finished trials are not re-run; MLflow runs of trials are created by the driver
once per trial id, so a resumed sweep adds none twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from jobs.storage import join
from orchestrator.spec import StudySpec
from orchestrator.stage import StageContext, StageResult, TrainedModel, run_bounded, run_name, scaling, train_summary
from orchestrator.stages.align_sft import alignment_frame, fit_alignments, replicate_name, replicate_path
from orchestrator.stages.attack import SCHEDULING, cell_job

NAME = "tune"
VERSION = 5  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ('data', 'base', 'vulnerability', 'align_sft', 'align_vaa', 'align_defences')


@dataclass(kw_only=True)
class Result(StageResult):
    """The sweep on validation: every finished trial, the Pareto front of (HS ↓, FA ↑), the
    baselines, and the configuration the selection rule picks (with its test numbers)."""

    enabled: bool = False
    model: str | None = None  # the aligned model whose knobs were searched
    p: float | None = None
    tasks: list[str] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)
    pareto: list[dict] = field(default_factory=list)
    selected: dict | None = None
    baselines: dict[str, dict | None] = field(default_factory=dict)
    selection: dict | None = None  # on which split, by which rule
    failed_trials: int = 0
    tuned: dict[str, TrainedModel] = field(default_factory=dict)  # tune.apply's model, once per seed

    def trained_models(self, location: str, seed: int | None = None) -> dict[str, str]:
        return {name: m.path(location, seed) for name, m in self.tuned.items()}


def config(spec: StudySpec) -> dict:
    if not spec.tune.enabled:
        return {"enabled": False}
    defences = {} if spec.tune.model == "vaa" else {"defences": spec.defences.model_dump()}
    # The attack's recipe, not its grid: trials and baselines attack on tune.tasks at tune.p.
    return {"tune": spec.tune.model_dump(), "vaa": spec.vaa.model_dump(mode="json"), **defences,
            "align": spec.align_sft.model_dump(),
            "attack": spec.attack.model_dump(exclude={"models", "tasks", "ratios", *SCHEDULING}),
            "harmful_aside": spec.defences.harmful_rows, "evaluate": spec.evaluate.model_dump(), "seed": spec.seed,
            "seeds": spec.replicates if spec.tune.apply else spec.replicates[:1], "max_len": spec.model.tiny.max_len}


def search_space(spec: StudySpec) -> dict:
    from ray import tune

    domains = {"grid": lambda d: tune.grid_search(d.values), "choice": lambda d: tune.choice(d.values),
               "uniform": lambda d: tune.uniform(d.low, d.high), "loguniform": lambda d: tune.loguniform(d.low, d.high)}
    return {key: domains[d.type](d) for key, d in spec.tune.space.items()}


def _searcher(spec: StudySpec):
    from ray.tune.search import ConcurrencyLimiter

    t = spec.tune
    if t.search != "optuna":
        return None  # grid and random: Tune's variant generator
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(metric=["hs", "fa"], mode=["min", "max"], seed=spec.seed),
                              max_concurrent=t.max_concurrent_trials)


def _scheduler(spec: StudySpec):
    if spec.tune.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(metric="score", mode="max")


def pareto_front(rows: list[dict]) -> list[dict]:
    """Trials no other trial beats on both objectives (HS lower or equal, FA higher or equal, one strictly)."""
    def dominated(r):
        return any(o["hs"] <= r["hs"] and o["fa"] >= r["fa"] and (o["hs"] < r["hs"] or o["fa"] > r["fa"])
                   for o in rows)

    return sorted((r for r in rows if not dominated(r)), key=lambda r: r["hs"])


def select(rows: list[dict], baseline_fa: float, delta: float) -> dict | None:
    """The lowest HS among trials whose FA is at most δ below the baseline's (ties: higher FA)."""
    eligible = [r for r in rows if r["fa"] >= baseline_fa - delta]
    return min(eligible, key=lambda r: (r["hs"], -r["fa"])) if eligible else None


def _evaluate_cells(ctx: StageContext, models: dict[str, dict[str, str]], split: str) -> dict[str, dict | None]:
    """HS and FA averaged over tasks for each model's attack cells {model: {task: model dir}}, on
    one side of the splits, in one pipeline run (each run starts its actor pools); None for a model
    without a cell on every tuning task."""
    from jobs.evaluate import Evaluation, evaluate_all
    from jobs.metrics import judge_warnings

    tasks = ctx.spec.tune.tasks
    complete = {m: cells for m, cells in models.items() if len(cells) == len(tasks)}
    evaluations = {f"{m}/{task}": Evaluation(path, [task]) for m, cells in complete.items() for task, path in cells.items()}
    results = evaluate_all(evaluations, ctx.input_location("data"), ctx.spec.decode_cfg(), split,
                           ctx.progress) if evaluations else {}
    judge_warnings(ctx.spec.evaluate.judge, results)  # no HS at all: one clear stop
    return {m: {"hs": sum(results[f"{m}/{task}"]["hs"] for task in tasks) / len(tasks),
                "fa": sum(results[f"{m}/{task}"]["fa"][task] for task in tasks) / len(tasks), "split": split}
            if m in complete else None for m in models}


def _baselines(ctx: StageContext) -> dict[str, dict | None]:
    """SFT, and the searched model with the spec's knobs where a stage trained it, attacked on the
    tuning tasks at p from the first seed (trials train from it too) and evaluated on validation
    like the trials. The cells are the attack stage's, drawn the same way: it runs after this stage."""
    from jobs.recipes import attack_cells

    spec, t = ctx.spec, ctx.spec.tune
    first, data_dir = spec.replicates[0], ctx.input_location("data")
    models = ctx.models(first)
    attacked = [m for m in ("sft", t.model) if m in models]
    out = {(m, task): ctx.output("baselines", f"{m}-{task}") for m in attacked for task in t.tasks}
    jobs = [cell_job(spec, models[m], data_dir, task, t.p, first, run_dir) for (m, task), run_dir in out.items()]
    group = {0: (attack_cells, (jobs, run_name(ctx, "tune-baselines"), str(ctx.ray_storage)), {})}
    for _ in run_bounded(ctx, group, 1, f"baseline cells fine-tuned ({', '.join(attacked)})"):
        pass
    cells = {m: {task: join(out[(m, task)], "model") for task in t.tasks} if m in attacked else {}
             for m in ("sft", t.model)}
    return _evaluate_cells(ctx, cells, "validation")


def _apply(ctx: StageContext, config: dict, mix: pd.DataFrame) -> dict[str, TrainedModel]:
    """The selected `config` trained once per seed as `<model>-tuned`, the way its own stage trains
    the model (align_vaa's groups, here re-cut at the configuration's τ; or the defence's rows),
    on one worker group."""
    from jobs.tune_trial import defence_knobs, vaa_knobs, vulnerable_at
    from jobs.vaa import recipe, step_config
    from orchestrator.stages.align_defences import USES_HARMFUL, defence_run, harmful_set, track_defence
    from orchestrator.stages.align_vaa import track_variant, vaa_run

    spec, t, name = ctx.spec, ctx.spec.tune, ctx.spec.tune.tuned

    if t.model == "vaa":
        vaa, threshold = vaa_knobs(config, spec.vaa.model_dump(mode="json"), spec.vulnerability.threshold)
        rows = vulnerable_at(mix, threshold)
        vulnerable = set(mix.loc[rows, "id"])
        train, knobs = recipe(vaa, spec.align_sft.model_dump()), step_config(vaa, "dro", int(rows.sum()), len(mix))
    else:
        knobs = defence_knobs(config, t.model, getattr(spec.defences, t.model).model_dump())
        harmful = harmful_set(ctx) if t.model in USES_HARMFUL else None
    runs = []
    for k, seed in enumerate(spec.replicates):
        run, out = replicate_name(name, seed, spec), ctx.output(replicate_path(name, seed, k == 0))
        runs.append(vaa_run(ctx, run, seed, out, vulnerable, train, knobs) if t.model == "vaa"
                    else defence_run(ctx, t.model, run, seed, out, knobs, harmful))
    ctx.progress(f"{name}: the selected configuration, once per seed")
    tuned = None
    for k, (seed, history) in enumerate(zip(spec.replicates, fit_alignments(ctx, "tune-apply", runs))):
        run = name if k == 0 else f"{name}-s{seed}"
        run_id = track_variant(ctx, run, history) if t.model == "vaa" else track_defence(ctx, run, knobs, history)
        if k == 0:
            tuned = TrainedModel(model=replicate_path(name, seed, True), run_id=run_id, **train_summary(history))
        tuned.replicates[str(seed)] = replicate_path(name, seed, k == 0)
    return {name: tuned}


def _mix_with_forgetting(ctx: StageContext) -> pd.DataFrame:
    """The alignment mix VAA trains on, with each row's aggregate ForgotNum (none for rows
    without an estimate; imported groups count 1 for vulnerable, 0 otherwise)."""
    spec = ctx.spec
    mix = alignment_frame(ctx.input_dir("data"), spec)
    groups = ctx.input_result("vulnerability").groups(ctx.input_dir("vulnerability"))
    if "forgot_total" not in groups:
        groups["forgot_total"] = (groups["group"] == "vulnerable").astype(float)
    return mix.merge(groups[["id", "forgot_total"]], on="id", how="left")


def resources(spec: StudySpec) -> str:
    t = spec.tune
    if not t.enabled:
        return "none"
    applied = f"; then {t.tuned}: {len(spec.replicates)} run(s) of {scaling(spec.align_sft)}" if t.apply else ""
    return (f"{t.max_concurrent_trials} trials at a time, each {t.cpus_per_trial:g} CPU driving a run of "
            f"{scaling(spec.align_sft)} and runs of {scaling(spec.attack)}{applied}")


def shown(result: Result, location: str) -> dict:
    if not result.enabled:
        return {}
    return {"tune": {"model": result.model, "selected": result.selected, "pareto": result.pareto,
                     "baselines": result.baselines, "p": result.p, "tasks": result.tasks,
                     "failed_trials": result.failed_trials, "trials": len(result.trials),
                     "applied": {name: m.training() for name, m in result.tuned.items()}},
            "selection": result.selection}


def run(ctx: StageContext) -> Result:
    from ray import tune

    from jobs.models import pad_token_id
    from jobs.storage import write_parquet
    from jobs.tune_trial import trial

    spec, t = ctx.spec, ctx.spec.tune
    if not t.enabled:
        return Result(enabled=False)
    mix = _mix_with_forgetting(ctx)
    write_parquet(mix, ctx.output("mix.parquet"))  # every trial reads it, on any node
    data = ctx.input_location("data")
    fixed = {"mix": ctx.output("mix.parquet"), "base": ctx.models()["base"], "tokenizer": join(data, "tokenizer"),
             "pad_id": pad_token_id(ctx.input_dir("data") / "tokenizer"), "data": data, "align": spec.align_sft.model_dump(), "vaa": spec.vaa.model_dump(mode="json"),
             "threshold": spec.vulnerability.threshold, "tasks": t.tasks, "p": t.p, "seed": spec.replicates[0],
             "max_len": spec.model.tiny.max_len,
             "attack": {"n": spec.attack.n, "train": spec.attack.model_dump(exclude={"models", "tasks", "ratios", "n"})},
             "evaluate": spec.decode_cfg(), "storage": str(ctx.ray_storage), "run_prefix": run_name(ctx, "tune"),
             # Beside the stage's directory, not in its private one: a resumed sweep keeps finished trials' models.
             "trials_dir": ctx.beside("trials"),
             "model": t.model, "knobs": getattr(spec.defences, t.model).model_dump() if t.model != "vaa" else {},
             # The attack's poison leaves out the defences' harmful set, in trials as in the attack stage.
             "harmful_rows": spec.defences.harmful_rows}
    trainable = tune.with_resources(tune.with_parameters(trial, fixed=fixed), {"cpu": t.cpus_per_trial})
    name = f"{spec.study}-tune-{ctx.key}"
    path = f"{ctx.ray_storage}/{name}"
    if tune.Tuner.can_restore(path):  # an interrupted sweep of this very stage: finished trials stay finished
        ctx.progress("resuming the sweep")
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=search_space(spec),
                           tune_config=tune.TuneConfig(num_samples=t.num_samples, search_alg=_searcher(spec),
                                                       scheduler=_scheduler(spec),
                                                       max_concurrent_trials=t.max_concurrent_trials),
                           # Tune's own trial table would interleave with the study's progress view.
                           run_config=tune.RunConfig(name=name, storage_path=str(ctx.ray_storage), verbose=0))
    ctx.progress(f"sweep: {t.search} search, {t.max_concurrent_trials} trials at a time")
    # Tune's own SIGINT handler ends the sweep early and returns normally, which would record a partial
    # sweep as complete; without it a Ctrl-C interrupts the study as in every other stage, and the
    # next `saferay run` restores the sweep.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    grid = tuner.fit()
    rows = []
    for r in grid:
        if r.metrics and "hs" in r.metrics and not r.metrics.get("error"):
            rows.append({"trial_id": r.metrics["trial_id"], "config": r.config, "hs": r.metrics["hs"],
                         "fa": r.metrics["fa"], "q_final": r.metrics.get("q_final"),
                         "trial_seconds": r.metrics.get("trial_seconds"), "trial_dir": r.metrics.get("trial_dir")})
    if not rows:
        raise RuntimeError(f"no trial of the sweep finished ({len(grid)} trials; see {path})")
    ctx.progress("baselines on the validation prompts")
    baselines = _baselines(ctx)
    sft = baselines["sft"]
    selected = select(rows, sft["fa"] if sft else max(r["fa"] for r in rows), t.delta)
    if selected:  # chosen on validation; its attack cells are evaluated on test once, and both are reported
        ctx.progress("the selected configuration on the test prompts")
        cells = {task: f"{selected['trial_dir']}/attack-{task}/model" for task in t.tasks}
        selected = {**selected, "test": _evaluate_cells(ctx, {"selected": cells}, "test")["selected"]}
    elif t.apply:
        raise RuntimeError(f"tune.apply: no trial's FA is within tune.delta = {t.delta:g} of SFT's "
                           f"({sft['fa']:.3f} on validation), so there is no configuration to apply "
                           "(widen tune.space or raise tune.delta)")
    result = Result(enabled=True, trials=sorted(rows, key=lambda r: r["trial_id"]), pareto=pareto_front(rows),
                    selected=selected, baselines=baselines, model=t.model, p=t.p, tasks=t.tasks,
                    selection={"split": "validation", "rule": f"lowest HS with FA at most {t.delta:g} below SFT's",
                               "reported_on_test": ["selected"] + ([t.tuned] if t.apply else [])},
                    failed_trials=len(grid) - len(rows),
                    tuned=_apply(ctx, selected["config"], mix) if t.apply else {})
    _track(ctx, result)
    return result


def _track(ctx: StageContext, result: Result) -> None:
    """A run per trial, nested under this stage's run (created here: Ray's MLflow integration does
    not nest), skipped for trial ids that already have one (a resumed sweep)."""
    from dashboards.plots import pareto_plot

    t = ctx.tracker
    existing = t.children(ctx.run_id, "saferay.trial")
    for row in result.trials:
        if row["trial_id"] in existing:
            continue
        run = t.start_run(f"trial-{row['trial_id']}", parent=ctx.run_id, tags={"saferay.trial": row["trial_id"]})
        t.log_params(run, row["config"])
        t.log_metrics(run, {k: row[k] for k in ("hs", "fa", "q_final", "trial_seconds") if row[k] is not None})
        t.end_run(run)
    t.log_table(ctx.run_id, [{"trial_id": r["trial_id"], **r["config"], "hs": r["hs"], "fa": r["fa"]}
                             for r in result.trials], "trials.json")
    t.log_json(ctx.run_id, {"selected": result.selected, "pareto": result.pareto, "baselines": result.baselines},
               "selected.json")
    if result.selected:
        t.log_metrics(ctx.run_id, {"selected/hs": result.selected["hs"], "selected/fa": result.selected["fa"]})
    t.log_file(ctx.run_id, pareto_plot(result.to_json(), ctx.out / "pareto.png"), "plots")
