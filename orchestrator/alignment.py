"""The two alignment stages, both on Ray Train through the one loop: plain SFT, and VAA (group DRO
over the vulnerability stage's groups, SCIENCE.md §5) with its ablations."""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec import StudySpec
from orchestrator.stage import StageContext, model_dir, run_name, train_summary


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


# --- align_sft -------------------------------------------------------------------------


def align_config(spec: StudySpec) -> dict:
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


def run_align_sft(ctx: StageContext) -> dict:
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


# --- align_vaa -------------------------------------------------------------------------


def vaa_config(spec: StudySpec) -> dict:
    if not spec.vaa.enabled:
        return {"enabled": False}
    return {"vaa": spec.vaa.model_dump(mode="json"), **align_config(spec)}


def vaa_groups(ctx: StageContext, mix):
    """Each row's group: vulnerable if the vulnerability stage says so; look-alikes and task
    examples have no forgetting estimate and join the invulnerable group."""
    import pandas as pd

    groups = pd.read_csv(ctx.input_dir("vulnerability") / ctx.input_result("vulnerability")["groups_file"])
    vulnerable = set(groups.loc[groups["group"] == "vulnerable", "id"])
    return mix["id"].isin(vulnerable)


def run_align_vaa(ctx: StageContext) -> dict:
    from jobs.launch import strategy_name
    from jobs.records import InputError
    from jobs.vaa import SAMPLER_MODES, recipe, step_config

    spec, vaa = ctx.spec, ctx.spec.vaa
    if not vaa.enabled:
        return {"enabled": False, "variants": {}}
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
    variants = {}
    for i, variant in enumerate(vaa.variants):
        mode = SAMPLER_MODES[variant]
        knobs = step_config(vaa.model_dump(mode="json"), mode, sizes["vulnerable"], len(mix))
        for k, seed in enumerate(spec.replicates):  # the groups are the study's; order and draws are the seed's
            order = alignment_frame(data_dir, spec, seed=seed)
            rows = order.assign(group=["vulnerable" if x in vulnerable_ids else "invulnerable" for x in order["id"]])
            ctx.progress(f"{variant} ({i + 1}/{len(vaa.variants)})"
                         + (f", seed {seed} ({k + 1}/{len(spec.replicates)})" if len(spec.replicates) > 1 else ""))
            path = replicate_path(variant, seed, k == 0)
            history = fit_alignment(ctx, replicate_name(variant, seed, spec), rows, ctx.out / path, seed,
                                    train, step="vaa", step_config=knobs)
            run_id = _track_variant(ctx, variant if k == 0 else f"{variant}-s{seed}", history)
            if k == 0:
                variants[variant] = {
                    "model": path, "mode": mode, "run_id": run_id, "q0": knobs["q0"], "q_final": history["q"][-1],
                    "perturbed_fraction": sum(e > 0 for e in history["eps_norm"]) / len(history["q"]),
                    "vulnerable_draw_fraction": sum(history["group"]) / len(history["group"]),
                    **train_summary(history), "replicates": {}}
            variants[variant]["replicates"][str(seed)] = path
    return {"enabled": True, "strategy": strategy_name(spec.align_sft.model_dump()), "groups": sizes,
            "variants": variants}


def _track_variant(ctx: StageContext, variant: str, history: dict) -> str:
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
