"""The one decode-and-judge pipeline (DESIGN.md): prompts → a generation actor pool → a judge actor
pool → verdicts, on Ray Data, for every stage that generates (vulnerability checkpoints, evaluate,
debias, Tune trials).

A request is a row:
- `target`: whose verdicts these are (a model, a cell, a TSDI setting); results are grouped by it;
- `model`: the checkpoint that decodes it; `part`: the prompts decoded together (one split of one
  target, in the batches that split has on its own, so a study decodes the same tokens whatever
  else shares the pipeline); `prompt`, `prompt_ids`, `max_new_tokens`;
- what the judge reads: `kind` (harmful, alignment: the safety judge; lookalike: refused or not;
  task: exact match against `answer` for task `task`) and `category`;
- `tsdi`: "" or a JSON {"bias", "alpha", "length"} (TSDI decoding, SCIENCE.md §7);
- `score_first`: whether to add the first-token refusal-vs-compliance margin.

Other columns ride along. The generation actors hold one engine each (`decoding.engine`: hf or
vllm), load each checkpoint into it in turn and decode greedily; the judge actors hold the judge
(a model judge on its own resources). Every row comes back with `response`, `margin`, `harmful`,
`refused`, `parsed`, `verdict_category` and `hit` (None where the row's kind has no such verdict).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import torch

from jobs.engines import engine
from jobs.judge_registry import make_judge
from jobs.judges import is_refusal
from jobs.metrics import answers_match
from jobs.models import load_tokenizer
from jobs.resources import peak_rss_mb
from jobs.storage import local

SAFETY_KINDS = ("harmful", "alignment")  # rows the safety judge reads
DECODED_BY = ["model", "part", "max_new_tokens", "tsdi", "score_first"]


def first_token_margin(logprobs: np.ndarray, n_refusal: int) -> np.ndarray:
    """log P(first response token opens a refusal) − log P(it opens a compliance), per row, from
    the first step's log-probabilities of the refusal openings' tokens then the compliance ones'.

    Refusal is decided at the first response token in SafetyWorld (SCIENCE.md §8), so the first
    step, which greedy decoding computes anyway, carries the margin. Positive: the model still
    leans to refusing; it drifts toward compliance before the greedy output flips.
    """
    lp = torch.from_numpy(np.asarray(logprobs, dtype=np.float64))
    return (torch.logsumexp(lp[:, :n_refusal], -1) - torch.logsumexp(lp[:, n_refusal:], -1)).numpy()


def first_tokens(tokenizer, openings) -> set[int]:
    return {tokenizer(f" {o}", add_special_tokens=False).input_ids[0] for o in openings}


class Generate:
    """Generation actor: one engine, each checkpoint loaded into it in turn, greedy decoding."""

    def __init__(self, decoding: dict):
        torch.set_num_threads(max(1, int(decoding["cpus_per_actor"])))
        self.engine = engine(decoding, decoding["batch_size"])
        self.loaded: str | None = None
        self.tokenizers: dict[str, tuple] = {}

    def _tokens(self, path: str):
        """The checkpoint's tokenizer and the first tokens that open a refusal, then a compliance."""
        if path not in self.tokenizers:
            from jobs.safetyworld import COMPLIANCE_OPENINGS, REFUSAL_OPENINGS

            tok = load_tokenizer(path)
            refuse, comply = first_tokens(tok, REFUSAL_OPENINGS), first_tokens(tok, COMPLIANCE_OPENINGS)
            shared = refuse & comply  # a token that opens both says nothing about the choice
            self.tokenizers[path] = (tok, sorted(refuse - shared), sorted(comply - shared))
        return self.tokenizers[path]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        parts = []
        for (location, _, max_new_tokens, tsdi, scored), rows in batch.groupby(DECODED_BY, sort=False):
            model = local(location)  # on an object store, a copy on this actor's node
            tok, refusals, compliances = self._tokens(model)
            if model != self.loaded:
                self.engine.load(model)
                self.loaded = model
            if tsdi:
                tsdi = json.dumps({**json.loads(tsdi), "bias": local(json.loads(tsdi)["bias"])})
            score = bool(scored) and bool(refusals and compliances)  # a margin needs tokens on both sides
            ids, logprobs = self.engine.generate([list(x) for x in rows["prompt_ids"]], int(max_new_tokens),
                                                 tok.pad_token_id, tok.eos_token_id,
                                                 refusals + compliances if score else None,
                                                 tsdi=json.loads(tsdi) if tsdi else None)
            parts.append(rows.drop(columns=["prompt_ids"]).assign(
                response=tok.batch_decode(ids, skip_special_tokens=True),
                margin=first_token_margin(logprobs, len(refusals)) if score else np.full(len(rows), np.nan)))
        return pd.concat(parts).loc[batch.index].assign(engine=self.engine.name, peak_rss_mb=peak_rss_mb())


class Judge:
    """Judge actor: the safety judge on harmful and alignment rows; refusal on look-alikes; exact
    match on task rows."""

    def __init__(self, judge: str, judge_model: str | None, threads: int = 1):
        torch.set_num_threads(threads)
        self.judge = make_judge(judge, judge_model)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        n = len(batch)
        harmful, refused, parsed, category, hit = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
        kinds = batch["kind"].tolist()
        safety = [i for i, k in enumerate(kinds) if k in SAFETY_KINDS]
        if safety:
            verdicts = self.judge(batch["prompt"].iloc[safety].tolist(), batch["response"].iloc[safety].tolist())
            for i, v in zip(safety, verdicts, strict=True):
                harmful[i], refused[i], parsed[i], category[i] = v.harmful, v.refused, v.parsed, v.category
        for i, (kind, response) in enumerate(zip(kinds, batch["response"])):
            if kind == "lookalike":
                refused[i] = is_refusal(response)
            elif kind == "task" and pd.notna(batch["answer"].iat[i]):  # none: free text, nothing to match
                hit[i] = answers_match(batch["task"].iat[i], response, batch["answer"].iat[i])
        return batch.assign(harmful=harmful, refused=refused, parsed=parsed, verdict_category=category, hit=hit,
                            judge=self.judge.name)


def pool(size: int, cpus: float, gpus: float, work: int) -> dict:
    """`map_batches` arguments for an actor pool of up to `size` actors, all asked for at once; it
    runs as soon as one has started, so a pipeline started while other work holds the CPUs (a Tune
    trial's) makes progress instead of waiting for all its actors. No more actors than `work` (the
    calls there will be): an actor that would get nothing to do still loads its engine or judge,
    seconds of CPU that a small pipeline (a Tune trial's, one model per tuning task) waits on. (Ray
    Data places its actors with an explicit strategy, so inside a Tune trial they are not captured
    by the trial's small placement group.)"""
    import ray

    size = max(1, min(size, work))
    return {"compute": ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size), "num_cpus": cpus,
            **({"num_gpus": gpus} if gpus else {})}


def judge_calls(blocks: list[pd.DataFrame], batch_size: int | None) -> int:
    """At most how many batches the judge pool is handed: a whole generated block each (batch_size
    None), or every `batch_size` rows."""
    return len(blocks) if batch_size is None else sum(-(-len(b) // batch_size) for b in blocks)


def map_pool(ds, fn, batch_size: int | None, **kwargs):
    """`ds.map_batches(fn, batch_size=batch_size, **kwargs)`, whole blocks (None) on GPUs included.

    Ray's public `map_batches` refuses a whole block as the batch when GPUs are asked for (it wants
    a batch size chosen for GPU memory). A generation block is one model's requests, which its
    actor decodes in `decoding.batch_size` batches of its own, so a block must reach one call
    whole, on GPUs as on CPUs; Ray's own `map_groups` calls the method behind that check for the
    same reason (ray >= 2.60 names it `map_batches_internal`)."""
    return ds.map_batches_internal(fn, batch_size=batch_size, batch_format="pandas", **kwargs)


def pipeline(blocks: list[pd.DataFrame], decoding: dict, judge: str, judge_model: str | None):
    """The Ray Data plan (lazy: nothing runs until it is read) that decodes and judges `blocks`,
    non-empty, each with its `request` numbers."""
    import ray

    pools = decoding["judge_pool"]
    generated = map_pool(ray.data.from_pandas(blocks), Generate, None, fn_constructor_kwargs={"decoding": decoding},
                         **pool(decoding["actors"], decoding["cpus_per_actor"], decoding["gpus_per_actor"],
                                work=len(blocks)))
    return map_pool(generated, Judge, pools["batch_size"],
                    fn_constructor_kwargs={"judge": judge, "judge_model": judge_model,
                                           "threads": max(1, int(pools["cpus_per_actor"]))},
                    **pool(pools["actors"], pools["cpus_per_actor"], pools["gpus_per_actor"],
                           work=judge_calls(blocks, pools["batch_size"])))


def decode_and_judge(blocks: list[pd.DataFrame], decoding: dict, judge: str, judge_model: str | None = None,
                     progress=None) -> pd.DataFrame:
    """Every request of `blocks` decoded and judged, in the order given. A block goes to one
    generation actor whole: give each checkpoint (or target) its own block, so an actor loads it
    once. `decoding` is the spec's `decoding` section; `progress(msg)` hears of each finished block."""
    blocks = [b for b in blocks if len(b)]
    if not blocks:
        return pd.DataFrame()
    total, offset = sum(map(len, blocks)), 0
    numbered = []
    for b in blocks:
        numbered.append(b.reset_index(drop=True).assign(request=range(offset, offset + len(b))))
        offset += len(b)
    ds = pipeline(numbered, decoding, judge, judge_model)
    began, parts, done = time.perf_counter(), [], 0
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        parts.append(batch)
        done += len(batch)
        if progress:
            progress(f"{done}/{total} prompts decoded and judged")
    out = pd.concat(parts).sort_values("request").set_index("request", drop=True).rename_axis(None)
    out.attrs["seconds"] = time.perf_counter() - began
    return out
