"""The evaluate stage: every aligned model (per seed) and every attack cell on the test prompts; rates
averaged over seeds with 95% intervals, the paired differences against SFT, the attack table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.spec import StudySpec
from orchestrator.stage import SHARED_BY_SEEDS, StageContext, StageResult, with_tuned
from orchestrator.store import write_json

NAME = "evaluate"
VERSION = 2  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ('data', 'base', 'align_sft', 'align_vaa', 'align_defences', 'attack')


def needs(spec: StudySpec) -> tuple[str, ...]:
    return with_tuned(NEEDS, spec)  # the model tune.apply trains


@dataclass(kw_only=True)
class Result(StageResult):
    """Rates (fractions in [0, 1]) over seeds with their 95% intervals: per aligned model, per
    attack cell, the paper's table, and the paired differences against SFT."""

    judge: str
    judge_warnings: list[str] = field(default_factory=list)
    models: dict[str, dict] = field(default_factory=dict)  # model -> hs, hs_ci, over_refusal, fa, ...
    attack: list[dict] = field(default_factory=list)  # one row per (model, task, p)
    attack_table: list[dict] = field(default_factory=list)  # one row per (model, p)
    comparisons: list[dict] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    intervals: dict | None = None  # level, what was resampled, method


def config(spec: StudySpec) -> dict:
    return {"evaluate": spec.evaluate.model_dump(), "tasks": spec.attack.tasks,
            **spec.tracking.model_dump(include={"log_texts", "log_models", "register_models"})}


def resources(spec: StudySpec) -> str:
    return f"the decode-and-judge pipeline: {spec.decoding.words()}"


def shown(result: Result, location: str) -> dict:
    return {
        "judge": result.judge, "models": result.models,
        "attack": [{k: row.get(k) for k in ("model", "task", "p", "hs", "hs_ci", "fa", "fa_ci", "hs_by_seed",
                                            "fa_by_seed", "hs_by_category", "over_refusal", "attack_run_id")}
                   for row in result.attack],
        "seeds": result.seeds, "attack_table": result.attack_table, "comparisons": result.comparisons,
        "intervals": result.intervals, "judge_warnings": result.judge_warnings}


def run(ctx: StageContext) -> Result:
    """Every aligned model (per seed) and every attack cell on the test prompts; rates averaged over
    seeds, with 95% intervals over seeds then prompts, and the paired differences against SFT."""
    from jobs.evaluate import Evaluation, evaluate_all
    from jobs.intervals import levels, mean_ci, model_intervals, stack_seeds, table_intervals
    from jobs.metrics import attack_table, average_over_seeds, judge_warnings

    spec = ctx.spec
    data_dir = ctx.input_location("data")
    targets = {}  # (model or cell, seed) -> (path, tasks)
    for seed in spec.replicates:
        for name, path in ctx.models(seed).items():
            if name not in SHARED_BY_SEEDS or seed == spec.replicates[0]:
                targets[(name, seed)] = Evaluation(path, spec.attack.tasks)
    cells = ctx.input_result("attack").cells
    replicates: dict[tuple, list[tuple]] = {}  # (model, task, p) -> its cells' targets, one per seed
    for cell in cells:
        target = (cell.name, cell.seed)
        targets[target] = Evaluation(cell.path(ctx.input_location("attack")), [cell.task])
        replicates.setdefault((cell.model, cell.task, cell.p), []).append(target)
    ctx.progress(f"{len(targets)} models and cells to decode and judge")
    results = evaluate_all(targets, data_dir, spec.decode_cfg(), progress=ctx.progress)
    warnings = judge_warnings(spec.evaluate.judge, {f"{n} (seed {s})": r for (n, s), r in results.items()})
    for line in warnings:
        ctx.progress(line)
    outcomes = {target: r.pop("outcomes") for target, r in results.items()}
    # Per prompt and seed: what every interval is computed from.
    write_json(ctx.out / "outcomes.json", {f"{n}@seed{s}": o for (n, s), o in outcomes.items()})

    def over_seeds(seeded: list[tuple]) -> tuple[dict, dict, list[dict]]:
        """Rates averaged over a model's (or cell's) seeds, its stacked outcomes, and each seed's rates."""
        per_seed = [results[t] for t in seeded]
        return average_over_seeds(per_seed), stack_seeds([outcomes[t] for t in seeded]), per_seed

    models = {}
    for name in ctx.models():
        r, o, per_seed = over_seeds([(name, s) for s in spec.replicates if (name, s) in results])
        models[name] = {**_model_metrics(r), **model_intervals(o), "hs_by_seed": [x["hs"] for x in per_seed]}
    attack, paired = [], {}
    first_cells = {(c.model, c.task, c.p): c for c in reversed(cells)}  # each key's first seed's cell
    for (model, task_name, p), seeded in replicates.items():
        r, o, per_seed = over_seeds(seeded)
        paired[(model, task_name, p)] = o
        attack.append({"model": model, "task": task_name, "p": p, "hs": r["hs"],
                       "hs_ci": mean_ci(o["hs"]), "fa": r["fa"][task_name], "fa_ci": mean_ci(o["fa"][task_name]),
                       "hs_by_seed": [x["hs"] for x in per_seed], "fa_by_seed": [x["fa"][task_name] for x in per_seed],
                       "hs_by_category": r["hs_by_category"], "over_refusal": r["over_refusal"],
                       "attack_run_id": first_cells[(model, task_name, p)].run_id})
    table = attack_table(attack, spec.attack.tasks)
    comparisons = table_intervals(table, paired, spec.attack.tasks)
    for name, m in models.items():
        ctx.tracker.log_metrics(ctx.run_id, {f"{name}/{k}": v for k, v in m.items()})
    log_models(ctx, {t: results[t] for t in results if t[0] in models}, models)
    for row in attack:
        ctx.tracker.log_metrics(ctx.run_id, {f"attack/{row['model']}/{row['task']}/p{row['p']:g}/{k}": row[k]
                                             for k in ("hs", "fa", "hs_ci", "fa_ci")})
    for c in comparisons:
        ctx.tracker.log_metrics(ctx.run_id, {f"diff/{c['a']}-{c['b']}/p{c['p']:g}/{c['metric']}": c["diff"],
                                             f"diff/{c['a']}-{c['b']}/p{c['p']:g}/{c['metric']}_ci": c["ci"]})
    ctx.tracker.log_table(ctx.run_id, [{k: v for k, v in r.items() if k != "hs_by_category"} for r in attack],
                          "attack_results.json")
    ctx.tracker.log_table(ctx.run_id, comparisons, "comparisons.json")
    ctx.tracker.log_table(ctx.run_id, table, "attack_table.json")
    if attack:
        from dashboards.plots import hs_against_ratio

        ctx.tracker.log_file(ctx.run_id, hs_against_ratio(table, ctx.out / "hs_against_p.png"), "plots")
    if spec.tracking.log_texts:  # harmful text stays out of MLflow unless the spec asks for it
        ctx.tracker.log_json(ctx.run_id, {f"{n}@seed{s}": r["samples"] for (n, s), r in results.items()},
                             "samples.json")
    return Result(judge=spec.evaluate.judge, judge_warnings=warnings, models=models, attack=attack,
                  attack_table=table, comparisons=comparisons, seeds=spec.replicates,
                  intervals={"level": 0.95, "resampled": levels(len(spec.replicates)), "method": "percentile bootstrap"},
                  peak_rss_mb=max(r["peak_rss_mb"] for r in results.values()))


def log_models(ctx: StageContext, per_seed: dict[tuple, dict], models: dict[str, dict]) -> None:
    """Each aligned model, per seed, as an MLflow LoggedModel of the stage run that trained it, with
    what this stage measured linked to it: its own rates (`<model>-seed<k>/hs`, ...), and its
    recipe's over every seed with their 95% intervals (`<model>-seed<k>/over_seeds/...`). The
    weights stay in the store (tag `saferay.weights`) unless `tracking.log_models: copy`;
    `tracking.register_models` adds a version of `<study>-<model>`."""
    from jobs.storage import local

    spec, t = ctx.spec, ctx.tracker
    paths = {(name, seed): path for seed in spec.replicates for name, path in ctx.models(seed).items()}
    for (name, seed), r in per_seed.items():
        source = ctx.input_runs.get(ctx.trained_by(name), ctx.run_id)
        own = f"{name}-seed{seed}"
        model_id = t.start_model(source, own, tags={
            "saferay.study": spec.study, "saferay.model": name, "saferay.seed": seed, "saferay.key": ctx.key,
            "saferay.weights": paths[(name, seed)]})
        # MLflow writes a model's metrics to the run as well: keys that say whose they are.
        t.log_model_metrics(ctx.run_id, model_id, {
            **{f"{own}/{k}": r[k] for k in ("hs", "over_refusal", "fa")},
            **{f"{own}/over_seeds/{k}": models[name][k] for k in ("hs", "hs_ci", "over_refusal", "over_refusal_ci",
                                                                   "fa", "fa_ci")}})
        t.finish_model(model_id, source, copy_from=local(paths[(name, seed)]) if spec.tracking.log_models == "copy" else None,
                       register_as=f"{spec.study}-{name}" if spec.tracking.register_models else None)


def _model_metrics(r: dict) -> dict:
    return {"hs": r["hs"], "hs_by_category": r["hs_by_category"], "over_refusal": r["over_refusal"], "fa": r["fa"],
            "unparsed": r["unparsed"]}
