"""Evaluate a model: its requests to the decode-and-judge pipeline (`jobs/pipeline.py`), and its
harmful score (overall, by category), over-refusal and task accuracy from the verdicts."""

from __future__ import annotations

import json
from typing import NamedTuple

import pandas as pd

from jobs.corpora import read_split
from jobs.judges import Verdict
from jobs.metrics import harmful_score, rate

HELD_OUT = {  # which splits each side reads: selection looks at validation only (SCIENCE.md §10)
    "test": {"harmful": "harmful_eval", "lookalike": "lookalike_eval", "task": "task_{}_test"},
    "validation": {"harmful": "harmful_validation", "lookalike": "lookalike_validation", "task": "task_{}_validation"},
}


class Evaluation(NamedTuple):
    """What to evaluate: a model, on these tasks, with or without TSDI."""

    model: str
    tasks: list[str]
    tsdi: dict | None = None


def requests(target: str, model_dir: str, data_dir: str, tasks: list[str], cfg: dict, split: str = "test",
             tsdi: dict | None = None) -> pd.DataFrame:
    """One model's prompts on the `split` side ("test", or "validation" for selection): the
    harmful prompts, the look-alikes and each task's, as pipeline requests of `target`;
    `tsdi={"bias": file, "alpha": α, "length": L}` decodes with the bias removed (SCIENCE.md §7)."""
    names = HELD_OUT[split]
    parts = [("harmful", names["harmful"], cfg["max_new_tokens"], None),
             ("lookalike", names["lookalike"], cfg["max_new_tokens"], None),
             *(("task", names["task"].format(t), cfg["answer_tokens"], t) for t in tasks)]
    frames = []
    for kind, name, max_new_tokens, task in parts:
        df = read_split(data_dir, name)
        scored = "answer" in df and task not in cfg.get("free_text", ())  # free text: no answer to match
        frames.append(pd.DataFrame({
            "prompt": df["prompt"], "prompt_ids": df["prompt_ids"], "kind": kind, "part": name, "task": task,
            "category": df["category"] if "category" in df else None,
            "answer": df["answer"] if scored else None, "max_new_tokens": int(max_new_tokens)}))
    return pd.concat(frames, ignore_index=True).assign(
        target=target, model=str(model_dir), tsdi=json.dumps(tsdi, sort_keys=True) if tsdi else "", score_first=False)


def rates(judged: pd.DataFrame, tasks: list[str], split: str = "test") -> dict:
    """One target's verdicts as rates: HS (over parsed verdicts, unparsed counted beside it), by
    category, over-refusal and FA per task, with the per-prompt outcomes every interval is
    computed from (in each split's order; None where the judge could not parse, or, for a free-text
    task, where nothing was matched)."""
    harm = judged[judged["kind"] == "harmful"]
    verdicts = [Verdict(harmful=bool(h), refused=bool(r), parsed=bool(p))
                for h, r, p in zip(harm["harmful"], harm["refused"], harm["parsed"])]
    result = harmful_score(verdicts, harm["category"].tolist())
    result["judge"], result["split"] = judged["judge"].iat[0], split
    outcomes = {"hs": [int(v.harmful) if v.parsed else None for v in verdicts],
                "over_refusal": [int(r) for r in judged.loc[judged["kind"] == "lookalike", "refused"]], "fa": {}}
    result["over_refusal"] = rate(outcomes["over_refusal"])
    result["fa"] = {}
    for task in tasks:
        hits = judged.loc[(judged["kind"] == "task") & (judged["task"] == task), "hit"]
        outcomes["fa"][task] = [None if pd.isna(h) else int(h) for h in hits]
        # A free-text task's answers were not matched: its FA is not measured (None), never 0.
        result["fa"][task] = None if any(h is None for h in outcomes["fa"][task]) else rate(outcomes["fa"][task])
    result["outcomes"] = outcomes
    result["samples"] = [{"prompt": p, "response": r} for p, r in zip(harm["prompt"][:3], harm["response"][:3])]
    result["engine"] = judged["engine"].iat[0]
    result["peak_rss_mb"] = float(judged["peak_rss_mb"].max())
    return result


def evaluate_all(evaluations: dict, data_dir: str, cfg: dict, split: str = "test", progress=None) -> dict:
    """Rates of every `Evaluation` of {target: Evaluation} on the `split` side, decoded and judged
    in one pipeline run; `cfg` is the spec's `decode_cfg()`."""
    from jobs.pipeline import decode_and_judge

    by_model: dict[str, list[pd.DataFrame]] = {}  # one block per model: an actor loads it once
    for target, e in evaluations.items():
        by_model.setdefault(e.model, []).append(requests(str(target), e.model, data_dir, e.tasks, cfg, split, e.tsdi))
    blocks = [pd.concat(frames, ignore_index=True) for frames in by_model.values()]
    judged = decode_and_judge(blocks, cfg["decoding"], cfg["judge"], cfg.get("judge_model"), progress)
    by_target = dict(iter(judged.groupby("target", sort=False)))
    return {target: rates(by_target[str(target)], e.tasks, split) for target, e in evaluations.items()}
