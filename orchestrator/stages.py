"""The stages of a study. Each has one shape: a name, the stages it needs, the slice of the
spec it depends on (its key is a hash of that and its inputs' keys), and a `run` that
writes outputs into a private directory and returns its result.

This module decides where work runs (Ray tasks, Ray Data, Ray Train); the work itself is
in `jobs/`.
"""

from __future__ import annotations

from orchestrator.alignment import align_config, run_align_sft, run_align_vaa, vaa_config
from orchestrator.debias import debias_config, run_debias
from orchestrator.tune import run_tune, tune_config
from orchestrator.spec import StudySpec, spec_dict
from orchestrator.stage import (Stage, StageContext, model_dir, ray_progress, replicate_dir, run_bounded, run_name,
                                train_summary, wait_all)
from orchestrator.store import write_json
from orchestrator.vulnerability import run_vulnerability, vulnerability_config


# --- data ------------------------------------------------------------------------------


def _data_config(spec: StudySpec) -> dict:
    from jobs.safetyworld import WORLD_VERSION

    d = spec_dict(spec)
    world = {"world_version": WORLD_VERSION} if spec.corpora.source == "safetyworld" else {}
    return {"corpora": d["corpora"], "seed": spec.seed, "model_source": spec.model.source,
            "vocab_size": spec.model.tiny.vocab_size, "template": spec.model.prompt_template, **world}


def load_corpora(spec: StudySpec) -> dict[str, list[dict]]:
    from jobs.records import check_rows
    from jobs.safetyworld import generate_corpora

    if spec.corpora.source == "safetyworld":
        corpora = generate_corpora(spec.seed, spec.corpora.safetyworld.model_dump(),
                                   fractions=(spec.corpora.validation_fraction, spec.corpora.test_fraction))
        return {name: check_rows(rows, name, f"safetyworld:{name}") for name, rows in corpora.items()}
    return {name: read_corpus_file(spec, name) for name in spec.corpora.files}


def read_corpus_file(spec: StudySpec, name: str) -> list[dict]:
    """One corpus from its file or hub id, in our record schema or a real source's format."""
    from jobs.corpora import read_records
    from jobs.loaders import load_corpus

    c = spec.corpora
    fmt = c.formats.get(name, "records")
    rows = (read_records(c.files[name], name) if fmt == "records"
            else load_corpus(c.files[name], name, fmt, c.splits.get(name)))
    return rows[: c.limits[name]] if name in c.limits else rows


def run_data(ctx: StageContext) -> dict:
    import ray

    from jobs.corpora import contamination, is_held_out, split_corpora, tokenize_batch
    from jobs.models import load_tokenizer, train_tokenizer
    from jobs.records import InputError

    spec = ctx.spec
    ctx.progress("reading and checking corpora")
    splits = split_corpora(load_corpora(spec), spec.corpora.model_dump())
    leaked = contamination(splits)
    if any(leaked.values()):
        counts = ", ".join(f"{name} {n}/{len(splits[name])}" for name, n in leaked.items() if n)
        if spec.corpora.contamination == "error":
            raise InputError(f"corpora: held-out prompts occur in training corpora ({counts}); clean the corpora, "
                             "or set corpora.contamination: warn to report the counts and go on")
        ctx.progress(f"warning: held-out prompts occur in training corpora ({counts})")
    tok_dir = ctx.out / "tokenizer"
    if spec.model.source == "tiny":
        ctx.progress("training the BPE tokenizer")
        texts = (f"{r['prompt']} {r.get('response') or r.get('answer') or ''}" for rows in splits.values() for r in rows)
        train_tokenizer(texts, spec.model.tiny.vocab_size, tok_dir)
    else:
        load_tokenizer(spec.model.source).save_pretrained(str(tok_dir))
    counts = {}
    for i, (name, rows) in enumerate(splits.items()):
        ctx.progress(f"tokenizing {name} on Ray Data ({i + 1}/{len(splits)})")
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(8, len(rows) // 2000)))
        ds = ds.map_batches(tokenize_batch, batch_format="pandas", batch_size=1024,
                            fn_kwargs={"tokenizer_dir": str(tok_dir), "template": spec.model.prompt_template})
        ds.write_parquet(str(ctx.out / name))
        counts[name] = len(rows)
        context = "eval" if is_held_out(name) else "train"
        ctx.tracker.log_dataset(ctx.run_id, rows, name, str(ctx.key_dir / name), context)
    ctx.tracker.log_metrics(ctx.run_id, {f"rows/{k}": v for k, v in counts.items()})
    ctx.tracker.log_metrics(ctx.run_id, {f"contamination/{k}": v for k, v in leaked.items()})
    return {"splits": counts, "contamination": leaked, "tokenizer": "tokenizer"}


# --- base ------------------------------------------------------------------------------


def _base_config(spec: StudySpec) -> dict:
    if spec.model.source != "tiny":
        return {"source": spec.model.source}
    return {"source": "tiny", "tiny": spec.model.tiny.model_dump(), "train": spec.base.model_dump(), "seed": spec.seed}


def run_base(ctx: StageContext) -> dict:
    from jobs.models import check_vocab, load_tokenizer
    from jobs.recipes import pretrain_tiny

    spec = ctx.spec
    data_dir = ctx.input_dir("data")
    if spec.model.source != "tiny":
        check_vocab(spec.model.source, load_tokenizer(data_dir / "tokenizer"), spec.model.source)
        return {"model": spec.model.source, "model_in_stage": False}
    ctx.progress(f"pretraining on Ray Train ({spec.base.num_workers} worker(s))")
    history = pretrain_tiny(str(data_dir), str(data_dir / "tokenizer"), spec.model.tiny.model_dump(),
                            spec.base.model_dump(), spec.seed, str(ctx.out / "model"), run_name(ctx, "base"),
                            str(ctx.ray_storage), ray_progress(ctx, "base"))
    ctx.tracker.log_series(ctx.run_id, "train/loss", history["loss"])
    return {"model": "model", **train_summary(history)}


def aligned_models(ctx: StageContext, seed: int | None = None) -> dict[str, str]:
    """Every model the attack and evaluation can name: base, sft, and each trained VAA variant, as
    trained from `seed` (the base is shared by every seed; default: the first seed's models)."""
    models = {"base": model_dir(ctx.input_dir("base"), ctx.input_result("base")),
              "sft": replicate_dir(ctx.input_dir("align_sft"), ctx.input_result("align_sft"), seed)}
    vaa_dir = ctx.input_dir("align_vaa")
    for name, v in ctx.input_result("align_vaa").get("variants", {}).items():
        models[name] = replicate_dir(vaa_dir, v, seed)
    return models


SHARED_BY_SEEDS = ("base",)  # models no seed retrains: evaluated once


# --- attack ----------------------------------------------------------------------------


def _attack_config(spec: StudySpec) -> dict:
    return {"attack": spec.attack.model_dump(), "seed": spec.seed, "seeds": spec.replicates,
            "max_len": spec.model.tiny.max_len}


def attack_cells(spec: StudySpec) -> list[dict]:
    """model × task × p, once per seed: cells of different models with the same seed draw the same
    task and harmful examples in the same order (paired comparisons)."""
    tag = (lambda s: f"__s{s}") if len(spec.replicates) > 1 else (lambda s: "")
    return [{"model": m, "task": t, "p": p, "seed": s, "name": f"{m}__{t}__p{p:g}{tag(s)}"}
            for s in spec.replicates for m in spec.attack.models for t in spec.attack.tasks for p in spec.attack.ratios]


def run_attack(ctx: StageContext) -> dict:
    """Every attack cell as its own Ray Train run (attack's scaling), `attack.max_concurrent` at a time."""
    from jobs.recipes import attack_cell, cell_seed

    spec = ctx.spec
    data_dir = str(ctx.input_dir("data"))
    sources = {s: aligned_models(ctx, s) for s in spec.replicates}
    train = spec.attack.model_dump(exclude={"models", "tasks", "ratios", "n", "max_concurrent"})
    cells = attack_cells(spec)
    jobs = {i: (attack_cell, (sources[c["seed"]][c["model"]], data_dir, c["task"], c["p"], spec.attack.n, train,
                              cell_seed(c["seed"], c["task"], c["p"]), spec.model.tiny.max_len,
                              str(ctx.out / "cells" / c["name"]), run_name(ctx, f"attack-{c['name']}"),
                              str(ctx.ray_storage)), {})
            for i, c in enumerate(cells)}
    done = {}
    for i, history in run_bounded(ctx, jobs, spec.attack.max_concurrent, "cells fine-tuned"):
        cell = cells[i]
        run_id = ctx.tracker.start_run(cell["name"], parent=ctx.run_id, tags={"saferay.cell": cell["name"]})
        ctx.tracker.log_params(run_id, {**{k: cell[k] for k in ("model", "task", "p", "seed")}, **train, "n": spec.attack.n})
        ctx.tracker.log_series(run_id, "train/loss", history["loss"])
        ctx.tracker.end_run(run_id)
        done[i] = {**cell, "dir": f"cells/{cell['name']}/model", "run_id": run_id,
                   "harmful_examples": history["harmful_examples"], **train_summary(history)}
    return {"cells": [done[i] for i in range(len(cells))],
            "peak_rss_mb": max(c.get("peak_rss_mb", 0.0) for c in done.values())}


# --- evaluate --------------------------------------------------------------------------


def _evaluate_config(spec: StudySpec) -> dict:
    return {"evaluate": spec.evaluate.model_dump(), "tasks": spec.attack.tasks, "log_texts": spec.tracking.log_texts}


def run_evaluate(ctx: StageContext) -> dict:
    """Every aligned model (per seed) and every attack cell on the test prompts; rates averaged over
    seeds, with 95% intervals over seeds then prompts, and the paired differences against SFT."""
    import ray

    from jobs.evaluate import evaluate_model
    from jobs.intervals import levels, mean_ci, model_intervals, stack_seeds, table_intervals
    from jobs.metrics import average_over_seeds, judge_warnings

    spec = ctx.spec
    data_dir = str(ctx.input_dir("data"))
    targets = {}  # (model or cell, seed) -> (path, tasks)
    for seed in spec.replicates:
        for name, path in aligned_models(ctx, seed).items():
            if name not in SHARED_BY_SEEDS or seed == spec.replicates[0]:
                targets[(name, seed)] = (path, spec.attack.tasks)
    cells = ctx.input_result("attack")["cells"]
    replicates: dict[tuple, list[tuple]] = {}  # (model, task, p) -> its cells' targets, one per seed
    for cell in cells:
        target = (cell["name"], cell.get("seed", spec.seed))
        targets[target] = (str(ctx.input_dir("attack") / cell["dir"]), [cell["task"]])
        replicates.setdefault((cell["model"], cell["task"], cell["p"]), []).append(target)
    task = ray.remote(evaluate_model).options(num_cpus=1)
    refs = {task.remote(path, data_dir, tasks, spec.evaluate.model_dump(), 1): target
            for target, (path, tasks) in targets.items()}
    results = dict(wait_all(ctx, refs, "models evaluated"))
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
    for name in aligned_models(ctx):
        r, o, per_seed = over_seeds([(name, s) for s in spec.replicates if (name, s) in results])
        models[name] = {**_model_metrics(r), **model_intervals(o), "hs_by_seed": [x["hs"] for x in per_seed]}
    attack, paired = [], {}
    first_cells = {(c["model"], c["task"], c["p"]): c for c in reversed(cells)}  # each key's first seed's cell
    for (model, task_name, p), seeded in replicates.items():
        r, o, per_seed = over_seeds(seeded)
        paired[(model, task_name, p)] = o
        attack.append({"model": model, "task": task_name, "p": p, "hs": r["hs"],
                       "hs_ci": mean_ci(o["hs"]), "fa": r["fa"][task_name], "fa_ci": mean_ci(o["fa"][task_name]),
                       "hs_by_seed": [x["hs"] for x in per_seed], "fa_by_seed": [x["fa"][task_name] for x in per_seed],
                       "hs_by_category": r["hs_by_category"], "over_refusal": r["over_refusal"],
                       "attack_run_id": first_cells[(model, task_name, p)]["run_id"]})
    table = attack_table(attack, spec.attack.tasks)
    comparisons = table_intervals(table, paired, spec.attack.tasks)
    for name, m in models.items():
        ctx.tracker.log_metrics(ctx.run_id, {f"{name}/{k}": v for k, v in m.items()})
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
    return {"judge": spec.evaluate.judge, "judge_warnings": warnings, "models": models, "attack": attack,
            "attack_table": table, "comparisons": comparisons, "seeds": spec.replicates,
            "intervals": {"level": 0.95, "resampled": levels(len(spec.replicates)), "method": "percentile bootstrap"},
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results.values())}


def attack_table(attack: list[dict], tasks: list[str]) -> list[dict]:
    """The paper's table: one row per (model, p), HS and FA per task and their average."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in attack):
        for p in dict.fromkeys(r["p"] for r in attack):
            cells = {r["task"]: r for r in attack if r["model"] == model and r["p"] == p}
            if not cells:
                continue
            row = {"model": model, "p": p}
            for t in tasks:
                if t in cells:
                    row[f"{t}/hs"], row[f"{t}/fa"] = cells[t]["hs"], cells[t]["fa"]
            row["avg/hs"] = sum(c["hs"] for c in cells.values()) / len(cells)
            row["avg/fa"] = sum(c["fa"] for c in cells.values()) / len(cells)
            rows.append(row)
    return rows


def _model_metrics(r: dict) -> dict:
    return {"hs": r["hs"], "hs_by_category": r["hs_by_category"], "over_refusal": r["over_refusal"], "fa": r["fa"],
            "unparsed": r["unparsed"]}


STAGES: tuple[Stage, ...] = (
    Stage("data", 1, (), _data_config, run_data),
    Stage("base", 2, ("data",), _base_config, run_base),
    Stage("align_sft", 2, ("data", "base"), align_config, run_align_sft),
    Stage("vulnerability", 3, ("data", "align_sft"), vulnerability_config, run_vulnerability),
    Stage("align_vaa", 3, ("data", "base", "vulnerability"), vaa_config, run_align_vaa),
    Stage("attack", 2, ("data", "base", "align_sft", "align_vaa"), _attack_config, run_attack),
    Stage("evaluate", 2, ("data", "base", "align_sft", "align_vaa", "attack"), _evaluate_config, run_evaluate),
    Stage("debias", 3, ("data", "base", "align_sft", "align_vaa"), debias_config, run_debias),
    Stage("tune", 3, ("data", "base", "vulnerability", "attack", "evaluate"), tune_config, run_tune),
)
