"""One Ray Tune trial of the tuning search: alignment with the trial's knobs (VAA, its groups
re-cut at its forgetting threshold τ; or the defence being calibrated), harmful fine-tuning on
the tuning tasks at ratio p, and evaluation on the validation prompts (selection never sees
test); it reports HS and FA averaged over tasks.

The trial's own process only drives: its alignment run and attack cells are Ray Train runs through
the one loop, with the study's alignment and attack scaling (LoRA, DeepSpeed and GPUs included),
and its evaluations go through the decode-and-judge pipeline (jobs/pipeline.py). Run names carry
the trial id, so a trial restarted after its driver was killed resumes its runs from their
checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from jobs.storage import join, local, write_parquet


def trial(config: dict, fixed: dict) -> None:
    """`config`: this trial's values by dotted spec path; `fixed`: paths and the rest of the recipe,
    `fixed["model"]` what the trial trains (VAA, or a defence being calibrated)."""
    import ray
    import ray.tune

    from jobs.evaluate import Evaluation, evaluate_all
    from jobs.launch import fit
    from jobs.recipes import attack_cell, cell_seed

    began = time.perf_counter()
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    (Path(context.get_trial_dir()) / "started").open("a").write(f"{time.time()}\n")  # one line per execution
    # Models go to the study store, which every node of a cluster reaches (Tune's own trial
    # directory may live on the node that ran the trial).
    out = join(fixed["trials_dir"], trial_id)
    build = vaa_run if fixed["model"] == "vaa" else defence_run
    cfg, notes = build(config, fixed, out)
    if "error" in notes:
        ray.tune.report({"hs": 1.0, "fa": 0.0, "score": -1.0, **notes})
        return
    history = fit(cfg, f"{fixed['run_prefix']}-{trial_id}-{fixed['model']}", fixed["storage"])

    for task in fixed["tasks"]:
        attack_cell(join(out, "aligned"), fixed["data"], task, fixed["p"], fixed["attack"]["n"],
                    fixed["attack"]["train"], cell_seed(fixed["seed"], task, fixed["p"]), fixed["max_len"],
                    join(out, f"attack-{task}"), f"{fixed['run_prefix']}-{trial_id}-attack-{task}", fixed["storage"],
                    aside=fixed["harmful_rows"])
    # On validation only: selection never sees test (the pipeline's actors are placed outside
    # the trial's small placement group).
    evaluated = evaluate_all({task: Evaluation(join(out, f"attack-{task}", "model"), [task]) for task in fixed["tasks"]},
                             fixed["data"], fixed["evaluate"], "validation")
    results = [evaluated[task] for task in fixed["tasks"]]
    for task, r in zip(fixed["tasks"], results):
        if r["hs"] is None:  # the judge parsed no verdict: this trial has no harmful score
            ray.tune.report({"hs": 1.0, "fa": 0.0, "score": -1.0, "error": f"no verdict parsed on {task}"})
            return
    hs = float(np.mean([r["hs"] for r in results]))
    fa = float(np.mean([r["fa"][task] for task, r in zip(fixed["tasks"], results)]))
    extra = {"q_final": history["q"][-1]} if "q" in history else {}
    ray.tune.report({"hs": hs, "fa": fa, "score": fa - hs, **extra, **notes, "trial_dir": str(out),
                     "trial_seconds": time.perf_counter() - began})


def vaa_knobs(config: dict, vaa: dict, threshold: float) -> tuple[dict, float]:
    """VAA's knobs and the forgetting threshold τ, a trial's values over the spec's."""
    return ({**vaa, **{k.removeprefix("vaa."): v for k, v in config.items() if k.startswith("vaa.")}},
            config.get("vulnerability.threshold", threshold))


def vulnerable_at(mix: pd.DataFrame, threshold: float) -> pd.Series:
    """Rows whose aggregate ForgotNum exceeds τ; rows without an estimate stay invulnerable."""
    return mix["forgot_total"].fillna(-1) > threshold


def defence_knobs(config: dict, name: str, knobs: dict) -> dict:
    """A defence's knobs, a trial's values (`defences.<name>.<knob>`) over the spec's."""
    return {**knobs, **{k.rsplit(".", 1)[1]: v for k, v in config.items() if k.startswith(f"defences.{name}.")}}


def vaa_run(config: dict, fixed: dict, out: str) -> tuple[dict, dict]:
    """The trial's VAA run: groups re-cut at its τ, its DRO knobs; or why it cannot run."""
    from jobs.launch import run_config
    from jobs.vaa import recipe, step_config

    vaa, threshold = vaa_knobs(config, fixed["vaa"], fixed["threshold"])
    mix = pd.read_parquet(local(fixed["mix"]))
    vulnerable = vulnerable_at(mix, threshold)
    train = recipe(vaa, fixed["align"])
    for name, rows in (("vulnerable", vulnerable.sum()), ("invulnerable", (~vulnerable).sum())):
        if rows < train["batch_size"]:
            return {}, {"error": f"{name} group has {rows} rows"}
    write_parquet(mix.assign(group=np.where(vulnerable, "vulnerable", "invulnerable")), join(out, "rows.parquet"))
    cfg = run_config(train, model_dir=fixed["base"], tokenizer_dir=fixed["tokenizer"], data=join(out, "rows.parquet"),
                     seed=fixed["seed"], pad_id=fixed["pad_id"], max_len=fixed["max_len"], out_dir=join(out, "aligned"),
                     step="vaa", step_config=step_config(vaa, "dro", int(vulnerable.sum()), len(mix)))
    return cfg, {"vulnerable_fraction": float(vulnerable.mean())}


def defence_run(config: dict, fixed: dict, out: str) -> tuple[dict, dict]:
    """The trial's run of the defence being calibrated: align_sft's recipe and mix (with the
    defences' harmful set where the defence trains on one), the trial's knobs."""
    from jobs.launch import run_config
    from jobs.recipes import TRAIN_COLUMNS, defence_harmful

    name = fixed["model"]
    knobs = defence_knobs(config, name, fixed["knobs"])
    rows = pd.read_parquet(local(fixed["mix"]))[TRAIN_COLUMNS]
    if name in ("booster", "repnoise"):
        harmful = defence_harmful(fixed["data"], fixed["harmful_rows"]).assign(stream="harmful")
        rows = pd.concat([rows.assign(stream=None), harmful], ignore_index=True)
    write_parquet(rows, join(out, "rows.parquet"))
    cfg = run_config(fixed["align"], model_dir=fixed["base"], tokenizer_dir=fixed["tokenizer"],
                     data=join(out, "rows.parquet"), seed=fixed["seed"], pad_id=fixed["pad_id"],
                     max_len=fixed["max_len"], out_dir=join(out, "aligned"), step=name, step_config=knobs)
    return cfg, {}
