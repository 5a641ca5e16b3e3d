"""Evaluate one model: harmful score (overall, by category), over-refusal, task accuracy."""

from __future__ import annotations

import time

import torch

from jobs.corpora import read_split
from jobs.engines import engine
from jobs.judge_registry import make_judge
from jobs.metrics import harmful_score, rate, refusals, task_hits
from jobs.models import load_tokenizer
from jobs.resources import peak_rss_mb


HELD_OUT = {  # which splits each side reads: selection looks at validation only (SCIENCE.md §10)
    "test": {"harmful": "harmful_eval", "lookalike": "lookalike_eval", "task": "task_{}_test"},
    "validation": {"harmful": "harmful_validation", "lookalike": "lookalike_validation", "task": "task_{}_validation"},
}


def evaluate_model(model_dir: str, data_dir: str, tasks: list[str], cfg: dict, threads: int = 1,
                   tsdi: dict | None = None, split: str = "test") -> dict:
    """HS, over-refusal and FA on the `split` side ("test", or "validation" for selection), decoded
    with `cfg["decoding"]`'s engine; `tsdi={"bias": path, "alpha": α, "length": L}` decodes with the
    bias removed (SCIENCE.md §7), which only the hf engine takes (the debias stage decodes on hf)."""
    names = HELD_OUT[split]
    torch.set_num_threads(threads)
    began = time.perf_counter()
    tok = load_tokenizer(model_dir)
    judge = make_judge(cfg["judge"], cfg.get("judge_model"))
    decoder = engine(cfg.get("decoding"), cfg["batch_size"])
    processors_for = None
    if tsdi:
        from jobs.tsdi import load_bias, processor_factory

        processors_for = processor_factory(load_bias(tsdi["bias"])[0], tsdi["alpha"], tsdi["length"])
    decoder.load(model_dir)

    def responses(split: str, max_new_tokens: int):
        df = read_split(data_dir, split)
        ids, _ = decoder.generate([list(x) for x in df["prompt_ids"]], max_new_tokens, tok.pad_token_id,
                                  tok.eos_token_id, processors_for=processors_for)
        return df, tok.batch_decode(ids, skip_special_tokens=True)

    harm_df, harm_out = responses(names["harmful"], cfg["max_new_tokens"])
    harm_verdicts = judge(harm_df["prompt"].tolist(), harm_out)
    result = harmful_score(harm_verdicts, harm_df["category"].tolist())
    result["judge"], result["split"] = judge.name, split

    # Per-prompt outcomes, in the splits' order, for intervals and paired differences (None: unparsed);
    # the rates are their means.
    _, look_out = responses(names["lookalike"], cfg["max_new_tokens"])
    outcomes = {"hs": [int(v.harmful) if v.parsed else None for v in harm_verdicts],
                "over_refusal": refusals(look_out), "fa": {}}
    result["over_refusal"] = rate(outcomes["over_refusal"])
    result["fa"] = {}
    for task in tasks:
        df, out = responses(names["task"].format(task), cfg["answer_tokens"])
        outcomes["fa"][task] = task_hits(task, out, df["answer"].tolist())
        result["fa"][task] = rate(outcomes["fa"][task])
    result["outcomes"] = outcomes
    result["samples"] = [{"prompt": p, "response": r} for p, r in zip(harm_df["prompt"][:3], harm_out[:3])]
    result["engine"] = decoder.name
    result["seconds"] = time.perf_counter() - began
    result["peak_rss_mb"] = peak_rss_mb()
    return result
