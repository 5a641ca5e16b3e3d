"""The two alignment stages, both on Ray Train: plain SFT, and VAA (group DRO over the
vulnerability stage's groups, SCIENCE.md §5) with its ablations."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from orchestrator.spec import AlignSpec, StudySpec
from orchestrator.stage import StageContext, model_dir, threads, train_summary


def alignment_frame(data_dir: Path, spec: StudySpec, lookalike: bool | None = None, seed: int | None = None):
    """Refusals, plus answered look-alikes and a few task examples per task (utility kept), in the
    order of `seed` (default: the study's seed).

    Alignment sets are thousands of rows, so they are mixed and shuffled in memory once; a
    Ray Data all-to-all shuffle costs far more than it saves here.
    """
    import pandas as pd

    from jobs.corpora import read_split
    from jobs.recipes import TRAIN_COLUMNS

    parts = [read_split(data_dir, "align_train", TRAIN_COLUMNS)]
    if spec.align_sft.lookalike if lookalike is None else lookalike:
        parts.append(read_split(data_dir, "lookalike_train", TRAIN_COLUMNS))
    if spec.align_sft.benign_per_task:
        for split in sorted(p.name for p in data_dir.glob("task_*_train")):
            parts.append(read_split(data_dir, split, TRAIN_COLUMNS).iloc[: spec.align_sft.benign_per_task])
    return pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=spec.seed if seed is None else seed,
                                                     ignore_index=True)


def strategy_name(cfg: AlignSpec) -> str:
    name = f"deepspeed-zero{cfg.zero_stage}" if cfg.strategy == "deepspeed" else cfg.strategy
    return name + ("+lora" if cfg.lora.enabled else "")


def fit(ctx: StageContext, loop, loop_config: dict, datasets: dict, run_name: str, split: bool = True):
    """One Ray Train run with the alignment recipe's scaling; the result's checkpoint and return value.

    The run name carries the stage's key, so a restarted stage resumes from its last epoch."""
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = ctx.spec.align_sft
    resources = None if cfg.use_gpu else {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split="all" if split else []),
        run_config=RunConfig(name=f"{ctx.spec.study}-{run_name}-{ctx.key}", storage_path=str(ctx.ray_storage),
                             failure_config=FailureConfig(max_failures=2)),
    )
    ctx.progress(f"{run_name}: training on {cfg.num_workers} Ray Train workers ({strategy_name(cfg)})")
    return trainer.fit()


def export(result, base: str, out: Path, tokenizer, lora: dict) -> None:
    from jobs.train_worker import export_checkpoint

    # DeepSpeed's checkpoint converter prints to stdout; keep the progress view clean.
    with result.checkpoint.as_directory() as ckpt, contextlib.redirect_stdout(io.StringIO()):
        export_checkpoint(ckpt, base, str(out), tokenizer, lora)


def _loop_config(ctx: StageContext, rows: int, base: str, tokenizer, seed: int) -> dict:
    cfg = ctx.spec.align_sft
    return {**cfg.model_dump(), "seed": seed, "model_dir": base, "rows": rows,
            "pad_id": tokenizer.pad_token_id, "max_len": ctx.spec.model.tiny.max_len,
            "threads": 1 if cfg.num_workers > 1 else threads()}


# --- align_sft -------------------------------------------------------------------------


def align_config(spec: StudySpec) -> dict:
    return {"train": spec.align_sft.model_dump(), "seed": spec.seed, "seeds": spec.replicates,
            "max_len": spec.model.tiny.max_len}


def replicate_path(name: str, seed: int, first: bool) -> str:
    """Where one replicate of a trained model lives in its stage: the first seed's at `[name/]model`
    (what single-seed consumers read), the others beside it."""
    prefix = f"{name}/" if name else ""
    return f"{prefix}model" if first else f"{prefix}seed{seed}/model"


def replicate_name(run_name: str, seed: int, spec: StudySpec) -> str:
    """A Ray Train run name per replicate (a resumed stage finds each run's checkpoints)."""
    return run_name if len(spec.replicates) == 1 else f"{run_name}-s{seed}"


def run_align_sft(ctx: StageContext) -> dict:
    replicates, first = {}, None
    for i, seed in enumerate(ctx.spec.replicates):
        path = replicate_path("", seed, i == 0)
        result = train_sft(ctx, replicate_name("align_sft", seed, ctx.spec), ctx.out / path, seed=seed)
        ctx.tracker.log_series(ctx.run_id, "train/loss" if i == 0 else f"train/loss_seed{seed}", result.pop("losses"))
        replicates[str(seed)] = path
        first = first or result
    return {"model": "model", "replicates": replicates, **first}


def train_sft(ctx: StageContext, run_name: str, out: Path, epochs: int | None = None, lookalike: bool | None = None,
              seed: int | None = None):
    """SFT of the base model on the alignment mix, exported to `out`; align_sft's recipe unless
    `epochs` or `lookalike` say otherwise (the over-aligned model of the debias stage), from `seed`
    (default: the study's seed)."""
    import ray

    from jobs.models import load_tokenizer
    from jobs.train_worker import train_loop_per_worker

    spec, cfg = ctx.spec, ctx.spec.align_sft
    data_dir = ctx.input_dir("data")
    base = model_dir(ctx.input_dir("base"), ctx.input_result("base"))
    seed = spec.seed if seed is None else seed
    ctx.progress(f"{run_name}: mixing the alignment set")
    mix = alignment_frame(data_dir, spec, lookalike, seed)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    loop_config = {**_loop_config(ctx, len(mix), base, tokenizer, seed), "epochs": epochs or cfg.epochs}
    result = fit(ctx, train_loop_per_worker, loop_config, {"train": ray.data.from_pandas(mix)}, run_name)
    history = result.return_value
    export(result, base, out, tokenizer, loop_config["lora"])
    history["tokens"] = history["tokens_per_rank"] * cfg.num_workers
    return {"strategy": strategy_name(cfg), "rows": len(mix), "losses": history["losses"],
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
    import ray

    from jobs.models import load_tokenizer
    from jobs.records import InputError
    from jobs.vaa import SAMPLER_MODES, initial_q
    from jobs.vaa_worker import vaa_loop_per_worker

    spec, vaa = ctx.spec, ctx.spec.vaa
    if not vaa.enabled:
        return {"enabled": False, "variants": {}}
    data_dir = ctx.input_dir("data")
    base = model_dir(ctx.input_dir("base"), ctx.input_result("base"))
    mix = alignment_frame(data_dir, spec)
    is_vulnerable = vaa_groups(ctx, mix)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    sizes = {"vulnerable": int(is_vulnerable.sum()), "invulnerable": int((~is_vulnerable).sum())}
    for name, n in sizes.items():
        if n < spec.align_sft.batch_size and any(SAMPLER_MODES[v] in ("dro", "importance", name) for v in vaa.variants):
            raise InputError(f"vaa: the {name} group has {n} rows, fewer than one batch of {spec.align_sft.batch_size}"
                             " (change vulnerability.threshold or align_sft.batch_size)")
    knobs = vaa.model_dump(include={"rho", "lam", "eta", "q_init", "q_clip"})
    variants = {}
    for i, variant in enumerate(vaa.variants):
        mode = SAMPLER_MODES[variant]
        needed = ("all",) if mode == "none" else ("vulnerable", "invulnerable")
        for k, seed in enumerate(spec.replicates):  # the groups are the study's; order and draws are the seed's
            order = alignment_frame(data_dir, spec, seed=seed)
            vulnerable = order["id"].isin(set(mix.loc[is_vulnerable, "id"]))
            datasets = {"vulnerable": order[vulnerable], "invulnerable": order[~vulnerable], "all": order}
            loop_config = {**_loop_config(ctx, len(mix), base, tokenizer, seed), **knobs,
                           "lr": vaa.lr or spec.align_sft.lr, "epochs": vaa.epochs or spec.align_sft.epochs,
                           "mode": mode, "steps_per_epoch": len(mix) // spec.align_sft.batch_size,
                           "q0": initial_q(knobs, sizes["vulnerable"], len(mix)), "shuffle_buffer": min(len(mix), 4096)}
            ctx.progress(f"{variant} ({i + 1}/{len(vaa.variants)})"
                         + (f", seed {seed} ({k + 1}/{len(spec.replicates)})" if len(spec.replicates) > 1 else ""))
            result = fit(ctx, vaa_loop_per_worker, loop_config,
                         {n: ray.data.from_pandas(datasets[n].reset_index(drop=True)) for n in needed},
                         replicate_name(variant, seed, spec), split=False)
            history = result.return_value
            path = replicate_path(variant, seed, k == 0)
            export(result, base, ctx.out / path, tokenizer, loop_config["lora"])
            history["tokens"] = history["tokens_per_rank"] * spec.align_sft.num_workers
            run_id = _track_variant(ctx, variant if k == 0 else f"{variant}-s{seed}", loop_config, history)
            if k == 0:
                variants[variant] = {
                    "model": path, "mode": mode, "run_id": run_id, "q0": loop_config["q0"], "q_final": history["q"][-1],
                    "perturbed_fraction": sum(e > 0 for e in history["eps_norm"]) / len(history["q"]),
                    "vulnerable_draw_fraction": sum(history["group"]) / len(history["group"]),
                    **train_summary({**history, "losses": history["loss"]}), "replicates": {}}
            variants[variant]["replicates"][str(seed)] = path
    return {"enabled": True, "strategy": strategy_name(spec.align_sft), "groups": sizes, "variants": variants}


def _track_variant(ctx: StageContext, variant: str, loop_config: dict, history: dict) -> str:
    """q, λ_t, ‖ε‖, the step's gradient norm and the per-group losses as MLflow metrics over steps, in a run per variant."""
    t = ctx.tracker
    run_id = t.start_run(variant, parent=ctx.run_id, tags={"saferay.variant": variant})
    t.log_params(run_id, {k: loop_config[k] for k in ("mode", "rho", "lam", "eta", "q_init", "q0", "lr", "epochs",
                                                       "steps_per_epoch", "strategy", "batch_size")})
    t.log_series(run_id, "train/loss", history["loss"])
    for key in ("q", "lambda", "eps_norm", "grad_norm"):
        t.log_series(run_id, f"vaa/{key}", history[key])
    for g, name in ((1, "vulnerable"), (0, "invulnerable")):
        steps = [s for s, drawn in enumerate(history["group"]) if drawn == g]
        t.log_series(run_id, f"vaa/loss_{name}", [history["loss"][s] for s in steps], steps=steps)
    t.end_run(run_id)
    return run_id
