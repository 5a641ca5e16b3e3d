"""The align_vaa stage: VAA (group DRO over the vulnerability stage's groups, SCIENCE.md §5) and its
ablations, once per seed, with align_sft's recipe and scaling, on Ray Train through the one loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.spec import StudySpec
from orchestrator.stage import StageContext, StageResult, TrainedModel, scaling, train_summary
from orchestrator.stages.align_sft import AlignmentRun, alignment_frame, fit_alignments, replicate_name, replicate_path
from orchestrator.stages.align_sft import config as align_config

NAME = "align_vaa"
VERSION = 3  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ("data", "base", "vulnerability")


@dataclass(kw_only=True)
class Variant(TrainedModel):
    """One VAA variant (its sampler `mode`) and what its first seed's run did."""

    mode: str
    q0: float | None = None  # the vulnerable group's weight at the start
    q_final: float | None = None
    perturbed_fraction: float | None = None  # of steps, where λ_t > 0 and ε was applied
    vulnerable_draw_fraction: float | None = None  # of steps that drew the vulnerable group


@dataclass(kw_only=True)
class Result(StageResult):
    enabled: bool = False
    strategy: str | None = None
    groups: dict[str, int] = field(default_factory=dict)  # rows per group
    variants: dict[str, Variant] = field(default_factory=dict)

    def trained_models(self, location: str, seed: int | None = None) -> dict[str, str]:
        return {name: v.path(location, seed) for name, v in self.variants.items()}


def config(spec: StudySpec) -> dict:
    if not spec.vaa.enabled:
        return {"enabled": False}
    return {"vaa": spec.vaa.model_dump(mode="json"), **align_config(spec)}


def vaa_groups(ctx: StageContext, mix):
    """Each row's group: vulnerable if the vulnerability stage says so; look-alikes and task
    examples have no forgetting estimate and join the invulnerable group."""
    groups = ctx.input_result("vulnerability").groups(ctx.input_dir("vulnerability"))
    vulnerable = set(groups.loc[groups["group"] == "vulnerable", "id"])
    return mix["id"].isin(vulnerable)


def resources(spec: StudySpec) -> str:
    if not spec.vaa.enabled:
        return "none"
    return f"{len(spec.vaa.variants) * len(spec.replicates)} run(s) of {scaling(spec.align_sft)}"


def shown(result: Result, location: str) -> dict:
    if not result.enabled:
        return {}
    return {"vaa": {"strategy": result.strategy, "groups": result.groups, "variants": {
        name: {"mode": v.mode, "q0": v.q0, "q_final": v.q_final, "perturbed_fraction": v.perturbed_fraction,
               "vulnerable_draw_fraction": v.vulnerable_draw_fraction, **v.training()}
        for name, v in result.variants.items()}}}


def run(ctx: StageContext) -> Result:
    from jobs.launch import strategy_name
    from jobs.records import InputError
    from jobs.vaa import SAMPLER_MODES, recipe, step_config

    spec, vaa = ctx.spec, ctx.spec.vaa
    if not vaa.enabled:
        return Result(enabled=False)
    data_dir = ctx.input_dir("data")
    mix = alignment_frame(data_dir, spec)
    is_vulnerable = vaa_groups(ctx, mix)
    sizes = {"vulnerable": int(is_vulnerable.sum()), "invulnerable": int((~is_vulnerable).sum())}
    for name, n in sizes.items():
        if n < spec.align_sft.batch_size and any(SAMPLER_MODES[v] in ("dro", "importance", name) for v in vaa.variants):
            raise InputError(f"vaa: the {name} group has {n} rows, fewer than one batch of {spec.align_sft.batch_size}"
                             " (change vulnerability.threshold or align_sft.batch_size)")
    vulnerable_ids = set(mix.loc[is_vulnerable, "id"])
    train = recipe(vaa.model_dump(mode="json"), spec.align_sft.model_dump())
    runs, knobs = [], {}
    for variant in vaa.variants:
        knobs[variant] = step_config(vaa.model_dump(mode="json"), SAMPLER_MODES[variant], sizes["vulnerable"], len(mix))
        for k, seed in enumerate(spec.replicates):
            runs.append(vaa_run(ctx, replicate_name(variant, seed, spec), seed,
                                ctx.output(replicate_path(variant, seed, k == 0)), vulnerable_ids, train, knobs[variant]))
    histories = iter(fit_alignments(ctx, NAME, runs))
    variants = {}
    for variant in vaa.variants:
        for k, seed in enumerate(spec.replicates):
            history, path = next(histories), replicate_path(variant, seed, k == 0)
            run_id = track_variant(ctx, variant if k == 0 else f"{variant}-s{seed}", history)
            if k == 0:
                variants[variant] = Variant(
                    model=path, mode=SAMPLER_MODES[variant], run_id=run_id, q0=knobs[variant]["q0"],
                    q_final=history["q"][-1],
                    perturbed_fraction=sum(e > 0 for e in history["eps_norm"]) / len(history["q"]),
                    vulnerable_draw_fraction=sum(history["group"]) / len(history["group"]), **train_summary(history))
            variants[variant].replicates[str(seed)] = path
    return Result(enabled=True, strategy=strategy_name(spec.align_sft.model_dump()), groups=sizes, variants=variants)


def vaa_run(ctx: StageContext, name: str, seed: int, out: str, vulnerable_ids: set, train: dict,
            knobs: dict) -> AlignmentRun:
    """One VAA run: the alignment mix in `seed`'s order and draws, each row in its group (the
    groups are the study's, the same for every seed)."""
    order = alignment_frame(ctx.input_dir("data"), ctx.spec, seed=seed)
    rows = order.assign(group=["vulnerable" if x in vulnerable_ids else "invulnerable" for x in order["id"]])
    return AlignmentRun(name, rows, out, seed, train, step="vaa", step_config=knobs)


def track_variant(ctx: StageContext, variant: str, history: dict) -> str:
    """q, λ_t, ‖ε‖, the step's gradient norm and the per-group losses as MLflow metrics over steps, in a run per variant."""
    t, cfg = ctx.tracker, history["config"]
    run_id = t.start_run(variant, parent=ctx.run_id, tags={"saferay.variant": variant})
    t.log_params(run_id, {**{k: cfg["step_config"][k] for k in ("mode", "rho", "lam", "eta", "q_init", "q0")},
                          **{k: cfg[k] for k in ("lr", "epochs", "strategy", "batch_size")},
                          "steps_per_epoch": history["steps"] // cfg["epochs"]})
    t.log_series(run_id, "train/loss", history["loss"])
    for key in ("q", "lambda", "eps_norm", "grad_norm"):
        t.log_series(run_id, f"vaa/{key}", history[key])
    for g, name in ((1, "vulnerable"), (0, "invulnerable")):
        steps = [s for s, drawn in enumerate(history["group"]) if drawn == g]
        t.log_series(run_id, f"vaa/loss_{name}", [history["loss"][s] for s in steps], steps=steps)
    t.end_run(run_id)
    return run_id
