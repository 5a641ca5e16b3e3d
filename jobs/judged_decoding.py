"""Judged decoding of every alignment prompt at every checkpoint: the vulnerability stage's hot path.

`JudgedDecoder` is the body of a Ray Data `map_batches` over an actor pool: each actor keeps
the checkpoints it has loaded, and each batch is decoded greedily in batches per checkpoint,
judged, and scored with a refusal-vs-compliance margin.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pandas as pd
import torch

from jobs.generate import greedy_decode_scored
from jobs.judge_registry import make_judge
from jobs.models import load_model, load_tokenizer


def first_token_margin(logits: torch.Tensor, refusal_first: list[int], compliance_first: list[int]) -> np.ndarray:
    """log P(first response token opens a refusal) − log P(it opens a compliance), per row.

    Refusal is decided at the first response token in SafetyWorld (SCIENCE.md §8), so the first
    step's logits, which greedy decoding computes anyway, carry the margin. Positive: the model
    still leans to refusing; it drifts toward compliance before the greedy output flips.
    """
    logp = torch.log_softmax(logits, dim=-1)
    return (torch.logsumexp(logp[:, refusal_first], -1) - torch.logsumexp(logp[:, compliance_first], -1)).numpy()


def first_tokens(tokenizer, openings: list[str]) -> set[int]:
    return {tokenizer(f" {o}", add_special_tokens=False).input_ids[0] for o in openings}


class JudgedDecoder:
    """Ray Data actor: rows (checkpoint, id, prompt, prompt_ids) -> + response, harmful, refused, parsed, margin."""

    def __init__(self, judge: str, max_new_tokens: int, refusal_openings: list[str], compliance_openings: list[str],
                 batch_size: int = 128, threads: int = 1, cache: int = 2, judge_model: str | None = None):
        torch.set_num_threads(threads)
        self.judge = make_judge(judge, judge_model)
        self.max_new_tokens, self.batch_size, self.cache_size = max_new_tokens, batch_size, cache
        self.openings = (refusal_openings, compliance_openings)
        self.models: OrderedDict[str, tuple] = OrderedDict()

    def _load(self, path: str):
        if path not in self.models:
            tok = load_tokenizer(path)
            refuse, comply = first_tokens(tok, self.openings[0]), first_tokens(tok, self.openings[1])
            shared = refuse & comply  # a token that opens both says nothing about the choice
            self.models[path] = (load_model(path), tok, sorted(refuse - shared), sorted(comply - shared))
            while len(self.models) > self.cache_size:
                self.models.popitem(last=False)
        self.models.move_to_end(path)
        return self.models[path]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        parts = []
        for path, rows in batch.groupby("checkpoint", sort=False):
            model, tok, refusals, compliances = self._load(path)
            prompt_ids = [list(x) for x in rows["prompt_ids"]]
            out, margin = greedy_decode_scored(
                model, prompt_ids, tok.pad_token_id, tok.eos_token_id, self.max_new_tokens,
                lambda logits: first_token_margin(logits, refusals, compliances), self.batch_size)
            texts = tok.batch_decode(out, skip_special_tokens=True)
            verdicts = self.judge(rows["prompt"].tolist(), texts)
            rows = rows.drop(columns=["prompt_ids"]).assign(
                response=texts, harmful=[v.harmful for v in verdicts], refused=[v.refused for v in verdicts],
                parsed=[v.parsed for v in verdicts], margin=margin)
            parts.append(rows)
        return pd.concat(parts, ignore_index=True)
