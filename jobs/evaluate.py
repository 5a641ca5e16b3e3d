"""Evaluate one model: harmful score (overall, by category), over-refusal, task accuracy."""

from __future__ import annotations

import time

import torch

from jobs.corpora import read_split
from jobs.generate import decode_texts
from jobs.judges import make_judge
from jobs.metrics import harmful_score, over_refusal, task_accuracy
from jobs.models import load_model, load_tokenizer
from jobs.resources import peak_rss_mb


def evaluate_model(model_dir: str, data_dir: str, tasks: list[str], cfg: dict, threads: int = 1,
                   tsdi: dict | None = None) -> dict:
    """`tsdi={"bias": path, "alpha": α, "length": L}` decodes with the bias removed (SCIENCE.md §7)."""
    torch.set_num_threads(threads)
    began = time.perf_counter()
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    judge = make_judge(cfg["judge"], cfg.get("judge_model"))
    processors_for = None
    if tsdi:
        from jobs.tsdi import load_bias, processor_factory

        processors_for = processor_factory(load_bias(tsdi["bias"])[0], tsdi["alpha"], tsdi["length"])

    def responses(split: str, max_new_tokens: int):
        df = read_split(data_dir, split)
        texts = decode_texts(model, tok, [list(x) for x in df["prompt_ids"]], max_new_tokens, cfg["batch_size"],
                             processors_for)
        return df, texts

    harm_df, harm_out = responses("harmful_eval", cfg["max_new_tokens"])
    harm_verdicts = judge(harm_df["prompt"].tolist(), harm_out)
    result = harmful_score(harm_verdicts, harm_df["category"].tolist())
    result["judge"] = judge.name

    _, look_out = responses("lookalike_eval", cfg["max_new_tokens"])
    result["over_refusal"] = over_refusal(look_out)

    result["fa"] = {}
    for task in tasks:
        df, out = responses(f"task_{task}_test", cfg["answer_tokens"])
        result["fa"][task] = task_accuracy(task, out, df["answer"].tolist())
    result["samples"] = [{"prompt": p, "response": r} for p, r in zip(harm_df["prompt"][:3], harm_out[:3])]
    result["seconds"] = time.perf_counter() - began
    result["peak_rss_mb"] = peak_rss_mb()
    return result
