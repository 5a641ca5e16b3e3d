"""One Ray Tune trial of the tuning search: VAA alignment with the trial's knobs (groups re-cut at
its forgetting threshold τ), harmful fine-tuning on the tuning tasks at ratio p, and evaluation
on the validation prompts (selection never sees test); it reports HS and FA averaged over tasks.

The trial's own process only drives: its VAA run and attack cells are Ray Train runs through the
one loop, with the study's alignment and attack scaling (LoRA, DeepSpeed and GPUs included), and
its evaluations are Ray tasks. Run names carry the trial id, so a trial restarted after its driver
was killed resumes its runs from their checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd


def vaa_trial(config: dict, fixed: dict) -> None:
    """`config`: this trial's values by dotted spec path; `fixed`: paths and the rest of the recipe."""
    import ray
    import ray.tune

    from jobs.evaluate import evaluate_model
    from jobs.launch import fit, run_config
    from jobs.recipes import attack_cell, cell_seed
    from jobs.vaa import recipe, step_config

    began = time.perf_counter()
    context = ray.tune.get_context()
    trial = context.get_trial_id()
    (Path(context.get_trial_dir()) / "started").open("a").write(f"{time.time()}\n")  # one line per execution
    # Models go to the study store, which every node of a cluster sees (Tune's own trial directory
    # may live on the node that ran the trial).
    out = Path(fixed["trials_dir"]) / trial
    out.mkdir(parents=True, exist_ok=True)
    vaa = {**fixed["vaa"], **{k.removeprefix("vaa."): v for k, v in config.items() if k.startswith("vaa.")}}
    threshold = config.get("vulnerability.threshold", fixed["threshold"])
    mix = pd.read_parquet(fixed["mix"])
    vulnerable = mix["forgot_total"].fillna(-1) > threshold  # rows without an estimate stay invulnerable
    train = recipe(vaa, fixed["align"])
    for name, rows in (("vulnerable", vulnerable.sum()), ("invulnerable", (~vulnerable).sum())):
        if rows < train["batch_size"]:
            ray.tune.report({"hs": 1.0, "fa": 0.0, "score": -1.0, "error": f"{name} group has {rows} rows"})
            return
    mix.assign(group=np.where(vulnerable, "vulnerable", "invulnerable")).to_parquet(out / "rows.parquet")
    cfg = run_config(train, model_dir=fixed["base"], tokenizer_dir=fixed["tokenizer"], data=str(out / "rows.parquet"),
                     seed=fixed["seed"], pad_id=fixed["pad_id"], max_len=fixed["max_len"], out_dir=str(out / "vaa"),
                     step="vaa", step_config=step_config(vaa, "dro", int(vulnerable.sum()), len(mix)))
    history = fit(cfg, f"{fixed['run_prefix']}-{trial}-vaa", fixed["storage"])

    for task in fixed["tasks"]:
        attack_cell(str(out / "vaa"), fixed["data"], task, fixed["p"], fixed["attack"]["n"], fixed["attack"]["train"],
                    cell_seed(fixed["seed"], task, fixed["p"]), fixed["max_len"], str(out / f"attack-{task}"),
                    f"{fixed['run_prefix']}-{trial}-attack-{task}", fixed["storage"])
    # Tune places a trial's child tasks in the trial's (tiny) placement group unless told otherwise.
    evaluate = ray.remote(evaluate_model).options(num_cpus=1, scheduling_strategy="DEFAULT")
    results = ray.get([evaluate.remote(str(out / f"attack-{task}" / "model"), fixed["data"], [task],
                                       fixed["evaluate"], 1, split="validation") for task in fixed["tasks"]])
    for task, r in zip(fixed["tasks"], results):
        if r["hs"] is None:  # the judge parsed no verdict: this trial has no harmful score
            ray.tune.report({"hs": 1.0, "fa": 0.0, "score": -1.0, "error": f"no verdict parsed on {task}"})
            return
    hs = float(np.mean([r["hs"] for r in results]))
    fa = float(np.mean([r["fa"][task] for task, r in zip(fixed["tasks"], results)]))
    ray.tune.report({"hs": hs, "fa": fa, "score": fa - hs, "q_final": history["q"][-1],
                     "vulnerable_fraction": float(vulnerable.mean()), "trial_dir": str(out),
                     "trial_seconds": time.perf_counter() - began})
