"""The debias stage (SCIENCE.md §7): for every aligned model, the TSDI bias against the base
model, then evaluation with and without it and over a sweep of α and L."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.spec import StudySpec
from orchestrator.stage import StageContext, StageResult, scaling, wait_all
from orchestrator.stages.align_sft import train_sft

OVER_ALIGNED = "over-aligned"

NAME = "debias"
VERSION = 3  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ('data', 'base', 'align_sft', 'align_vaa', 'align_defences')


@dataclass(kw_only=True)
class Result(StageResult):
    """Per debiased model: its bias norms per position, its rates without and with TSDI at
    (α, L), and over the sweep of (α, L)."""

    enabled: bool = False
    alpha: float | None = None
    length: int | None = None
    reference: str | None = None
    models: dict[str, dict] = field(default_factory=dict)
    win_rate: float | None = None  # needs a judge that compares pairs; the world and prefix judges do not


def config(spec: StudySpec) -> dict:
    if not spec.debias.enabled:
        return {"enabled": False}
    return {"debias": spec.debias.model_dump(), "evaluate": spec.evaluate.model_dump(), "tasks": spec.attack.tasks,
            "template": spec.model.prompt_template, "seed": spec.seed, "align": spec.align_sft.model_dump()}


def debias_targets(ctx: StageContext, aligned: dict[str, str]) -> dict[str, str]:
    """The aligned models to debias: those the spec names that this study has (VAA variants only
    if trained), plus the over-aligned model, trained here."""
    d = ctx.spec.debias
    targets = {name: aligned[name] for name in d.models if name in aligned and name != "base"}
    if OVER_ALIGNED in d.models and d.over_aligned.enabled:
        out = ctx.output(OVER_ALIGNED, "model")
        trained = train_sft(ctx, OVER_ALIGNED, out, d.over_aligned.epochs, d.over_aligned.lookalike)
        ctx.tracker.log_series(ctx.run_id, f"{OVER_ALIGNED}/train/loss", trained["losses"])
        targets[OVER_ALIGNED] = out
    return targets


def resources(spec: StudySpec) -> str:
    if not spec.debias.enabled:
        return "none"
    over = f" + 1 run of {scaling(spec.align_sft)}" if spec.debias.over_aligned.enabled else ""
    cpus, gpus = bias_task(spec)
    return (f"one bias-estimation task per model ({cpus} CPU{f', {gpus} GPU' if gpus else ''}){over}; "
            f"the decode-and-judge pipeline: {spec.decoding.words()}")


def bias_task(spec: StudySpec) -> tuple[int, int]:
    """A bias-estimation task's CPUs and GPUs: two models' forward passes, on a GPU where the
    generation actors have GPUs (a whole one: it holds twice an actor's weights), and at least
    one whole CPU, a torch thread for each."""
    pool = spec.decoding.generation()
    return max(1, int(pool.cpus_per_actor)), 1 if pool.gpus_per_actor else 0


def shown(result: Result, location: str) -> dict:
    if not result.enabled:
        return {}
    return {"debias": {"alpha": result.alpha, "length": result.length, "reference": result.reference,
                       "win_rate": result.win_rate,
                       "models": {name: {k: m[k] for k in ("without", "with", "sweep", "bias_norms")}
                                  for name, m in result.models.items()}}}


def run(ctx: StageContext) -> Result:
    import ray

    from jobs.evaluate import Evaluation, evaluate_all
    from jobs.tsdi import estimate_model_bias

    spec, d = ctx.spec, ctx.spec.debias
    if not d.enabled:
        return Result(enabled=False)
    data_dir = ctx.input_location("data")
    aligned = ctx.models()
    targets = debias_targets(ctx, aligned)
    cfg = d.model_dump(include={"prompts", "length", "pool", "continuation"})
    cpus, gpus = bias_task(spec)
    estimate = ray.remote(estimate_model_bias).options(num_cpus=cpus, num_gpus=gpus)
    refs = {estimate.remote(path, aligned["base"], data_dir, cfg, spec.model.prompt_template, spec.seed,
                            ctx.output("bias", f"{name}.safetensors"), cpus): name for name, path in targets.items()}
    biases = {name: r for name, r in wait_all(ctx, refs, "biases estimated")}

    settings = [(None, None)] + [(a, n) for a in d.sweep_alpha for n in d.sweep_length]
    if (d.alpha, d.length) not in settings:
        settings.append((d.alpha, d.length))
    # Every setting on the spec's engine, the one without TSDI included (both engines take TSDI's
    # processor): "without against with" changes nothing but the bias.
    evaluations = {(name, alpha, length): Evaluation(path, spec.attack.tasks, None if alpha is None else {
        "bias": ctx.output("bias", f"{name}.safetensors"), "alpha": alpha, "length": length})
        for name, path in targets.items() for alpha, length in settings}
    evals = evaluate_all(evaluations, data_dir, spec.decode_cfg(), progress=ctx.progress)

    models = {}
    for name in targets:
        without, with_ = evals[(name, None, None)], evals[(name, d.alpha, d.length)]
        models[name] = {
            "bias_norms": biases[name]["bias_norms"], "top_tokens": biases[name]["top_tokens"],
            "bias_file": f"bias/{name}.safetensors",
            "without": _metrics(without), "with": _metrics(with_),
            "sweep": [{"alpha": a, "length": n, **_metrics(evals[(name, a, n)])} for a, n in settings if a is not None],
        }
    result = Result(enabled=True, alpha=d.alpha, length=d.length, reference="base", models=models,
                    peak_rss_mb=max(r["peak_rss_mb"] for r in evals.values()))
    _track(ctx, result)
    return result


def _metrics(r: dict) -> dict:
    from jobs.metrics import mean_measured

    fa = r["fa"]
    return {"hs": r["hs"], "hs_by_category": r["hs_by_category"], "over_refusal": r["over_refusal"], "fa": fa,
            "helpfulness": mean_measured(list(fa.values()))}


def _track(ctx: StageContext, result: Result) -> None:
    from dashboards.plots import safety_helpfulness
    from jobs.storage import local

    t = ctx.tracker
    for name, m in result.models.items():
        t.log_series(ctx.run_id, f"{name}/bias_norm", m["bias_norms"], steps=list(range(1, len(m["bias_norms"]) + 1)))
        for when in ("without", "with"):
            t.log_metrics(ctx.run_id, {f"{name}/{when}/{k}": v for k, v in m[when].items()})
        for row in m["sweep"]:
            t.log_metrics(ctx.run_id, {f"{name}/alpha{row['alpha']:g}_L{row['length']}/{k}": row[k]
                                       for k in ("hs", "over_refusal", "helpfulness")})
        t.log_file(ctx.run_id, local(ctx.output(m["bias_file"])), "bias")  # written by a worker: fetched here
    t.log_table(ctx.run_id, [{"model": name, "tsdi": when, **{k: v for k, v in m[when].items() if k != "hs_by_category"}}
                             for name, m in result.models.items() for when in ("without", "with")],
                "debias_results.json")
    t.log_file(ctx.run_id, safety_helpfulness(result.models, ctx.out / "safety_helpfulness.png"), "plots")
