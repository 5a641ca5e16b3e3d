"""Judged decoding of every alignment prompt at every checkpoint: the vulnerability stage's hot path.

`JudgedDecoder` is the body of a Ray Data `map_batches` over an actor pool: each actor holds one
decoding engine (`decoding.engine`: hf or vllm, jobs/engines.py) into which each checkpoint is
loaded in turn; each batch is decoded greedily, judged, and scored with a refusal-vs-compliance margin.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from jobs.engines import engine
from jobs.judge_registry import make_judge
from jobs.models import load_tokenizer


def first_token_margin(logprobs: np.ndarray, n_refusal: int) -> np.ndarray:
    """log P(first response token opens a refusal) − log P(it opens a compliance), per row, from
    the first step's log-probabilities of the refusal openings' tokens then the compliance ones'.

    Refusal is decided at the first response token in SafetyWorld (SCIENCE.md §8), so the first
    step, which greedy decoding computes anyway, carries the margin. Positive: the model still
    leans to refusing; it drifts toward compliance before the greedy output flips.
    """
    lp = torch.from_numpy(np.asarray(logprobs, dtype=np.float64))
    return (torch.logsumexp(lp[:, :n_refusal], -1) - torch.logsumexp(lp[:, n_refusal:], -1)).numpy()


def first_tokens(tokenizer, openings: list[str]) -> set[int]:
    return {tokenizer(f" {o}", add_special_tokens=False).input_ids[0] for o in openings}


class JudgedDecoder:
    """Ray Data actor: rows (checkpoint, id, prompt, prompt_ids) -> + response, harmful, refused, parsed, margin."""

    def __init__(self, judge: str, max_new_tokens: int, refusal_openings: list[str], compliance_openings: list[str],
                 batch_size: int = 128, threads: int = 1, judge_model: str | None = None,
                 decoding: dict | None = None):
        torch.set_num_threads(threads)
        self.judge = make_judge(judge, judge_model)
        self.engine = engine(decoding, batch_size)
        self.max_new_tokens = max_new_tokens
        self.openings = (refusal_openings, compliance_openings)
        self.tokenizers: dict[str, tuple] = {}

    def _tokens(self, path: str):
        """The checkpoint's tokenizer and the first tokens that open a refusal, then a compliance."""
        if path not in self.tokenizers:
            tok = load_tokenizer(path)
            refuse, comply = first_tokens(tok, self.openings[0]), first_tokens(tok, self.openings[1])
            shared = refuse & comply  # a token that opens both says nothing about the choice
            self.tokenizers[path] = (tok, sorted(refuse - shared), sorted(comply - shared))
        return self.tokenizers[path]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        parts = []
        for path, rows in batch.groupby("checkpoint", sort=False):
            tok, refusals, compliances = self._tokens(path)
            self.engine.load(path)
            out, logprobs = self.engine.generate([list(x) for x in rows["prompt_ids"]], self.max_new_tokens,
                                                 tok.pad_token_id, tok.eos_token_id, refusals + compliances)
            texts = tok.batch_decode(out, skip_special_tokens=True)
            verdicts = self.judge(rows["prompt"].tolist(), texts)
            rows = rows.drop(columns=["prompt_ids"]).assign(
                response=texts, harmful=[v.harmful for v in verdicts], refused=[v.refused for v in verdicts],
                parsed=[v.parsed for v in verdicts],
                margin=np.full(len(rows), np.nan) if not (refusals and compliances)  # no opening token to compare
                else first_token_margin(logprobs, len(refusals)))
            parts.append(rows)
        return pd.concat(parts, ignore_index=True)
