"""One Ray Tune trial of the tuning search: VAA alignment with the trial's knobs (groups
re-cut at its forgetting threshold τ), harmful fine-tuning on the tuning tasks at ratio p, and
evaluation on the validation prompts (selection never sees test); it reports HS and FA averaged
over the tasks.

Everything runs in the trial's own process (one CPU): at this size a trial is a few minutes,
and Tune runs several side by side.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from jobs.evaluate import evaluate_model
from jobs.models import load_model, load_tokenizer, save_model
from jobs.recipes import cell_seed, harmful_finetune
from jobs.train import make_optimizer, make_schedule
from jobs.vaa import GROUP_NAMES, GroupSampler, PlainBackend, initial_q, train_vaa


class FrameBatches:
    """In-memory rows with Ray Data's `iter_batches` shape (the one-process stand-in for a stream)."""

    def __init__(self, frame: pd.DataFrame):
        self.columns = {c: frame[c].to_numpy() for c in ("id", "prompt_ids", "target_ids")}
        self.n = len(frame)

    def iter_batches(self, batch_size, batch_format="numpy", drop_last=True, local_shuffle_buffer_size=None,
                     local_shuffle_seed=0):
        order = np.random.default_rng(local_shuffle_seed).permutation(self.n)
        stop = self.n - (self.n % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield {c: v[idx] for c, v in self.columns.items()}


def vaa_trial(config: dict, fixed: dict) -> None:
    """`config`: this trial's values by dotted spec path; `fixed`: paths and the rest of the recipe."""
    import ray.tune

    from jobs.vaa_worker import batches_from

    torch.set_num_threads(1)
    began = time.perf_counter()
    context = ray.tune.get_context()
    (Path(context.get_trial_dir()) / "started").open("a").write(f"{time.time()}\n")  # one line per execution
    # Models go to the study store, which every node of a cluster sees (Tune's own trial directory
    # may live on the node that ran the trial).
    out = Path(fixed["trials_dir"]) / context.get_trial_id()
    out.mkdir(parents=True, exist_ok=True)
    vaa = {**fixed["vaa"], **{k.removeprefix("vaa."): v for k, v in config.items() if k.startswith("vaa.")}}
    vaa["epochs"] = int(vaa["epochs"])
    threshold = config.get("vulnerability.threshold", fixed["threshold"])
    mix = pd.read_parquet(fixed["mix"])
    vulnerable = mix["forgot_total"].fillna(-1) > threshold  # rows without an estimate stay invulnerable
    cfg = {**fixed["train"], **vaa, "mode": "dro", "q0": initial_q(vaa, int(vulnerable.sum()), len(mix)),
           "steps_per_epoch": len(mix) // fixed["train"]["batch_size"], "shuffle_buffer": len(mix)}
    for name, rows in (("vulnerable", vulnerable.sum()), ("invulnerable", (~vulnerable).sum())):
        if rows < cfg["batch_size"]:
            ray.tune.report({"hs": 1.0, "fa": 0.0, "score": -1.0, "error": f"{name} group has {rows} rows"})
            return

    torch.manual_seed(cfg["seed"])
    model = load_model(fixed["base"])
    optimizer = make_optimizer(model, cfg)
    backend = PlainBackend(model, optimizer, make_schedule(optimizer, cfg, cfg["steps_per_epoch"] * cfg["epochs"]),
                           cfg.get("grad_clip", 1.0))
    model.train()
    frames = {GROUP_NAMES[1]: FrameBatches(mix[vulnerable]), GROUP_NAMES[0]: FrameBatches(mix[~vulnerable])}
    history = train_vaa(backend, batches_from(frames, cfg), cfg, GroupSampler(cfg["seed"], q=cfg["q0"]))
    save_model(model.eval(), load_tokenizer(fixed["base"]), out / "vaa")

    hs, fa = [], []
    for task in fixed["tasks"]:
        cell = out / f"attack-{task}"
        harmful_finetune(str(out / "vaa"), fixed["data"], task, fixed["p"], fixed["attack"]["n"], fixed["attack"]["train"],
                         cell_seed(fixed["seed"], task, fixed["p"]), fixed["max_len"], str(cell), 1)
        r = evaluate_model(str(cell), fixed["data"], [task], fixed["evaluate"], 1, split="validation")
        if r["hs"] is None:  # the judge parsed no verdict: this trial has no harmful score
            ray.tune.report({"hs": 1.0, "fa": 0.0, "score": -1.0, "error": f"no verdict parsed on {task}"})
            return
        hs.append(r["hs"])
        fa.append(r["fa"][task])
    ray.tune.report({"hs": float(np.mean(hs)), "fa": float(np.mean(fa)), "score": float(np.mean(fa) - np.mean(hs)),
                     "q_final": history["q"][-1], "vulnerable_fraction": float(vulnerable.mean()), "trial_dir": str(out),
                     "trial_seconds": time.perf_counter() - began})
