"""Judged decoding: the batched path (KV cache, left padding) against a prompt-by-prompt loop,
same model, prompts and token budget, measured side by side (target: >= 5x)."""

from __future__ import annotations

import argparse

import torch

from bench.common import alignment_prompts, record, timed, world_model
from jobs.generate import greedy_decode
from jobs.judges import WorldJudge


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, model, corpora = world_model()
    prompts = alignment_prompts(tok, corpora, args.prompts)
    texts = [r["prompt"] for r in corpora["alignment"][: args.prompts]]
    judge = WorldJudge()
    # eos never stops generation early here (random weights rarely emit it), so both paths
    # produce the same number of tokens: a like-for-like comparison.
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=args.max_new_tokens)
    greedy_decode(model, prompts[:8], batch_size=8, **kw)  # warm-up
    one, t_one = timed(lambda: [greedy_decode(model, [p], batch_size=1, **kw)[0] for p in prompts])
    batched, t_batch = timed(greedy_decode, model, prompts, batch_size=128, **kw)
    judge(texts, tok.batch_decode(batched, skip_special_tokens=True))
    agree = sum(a == b for a, b in zip(one, batched)) / len(prompts)
    rows = [
        {"name": "decode/prompt_by_prompt", "value": len(prompts) / t_one, "unit": "prompts/s"},
        {"name": "decode/batched_128", "value": len(prompts) / t_batch, "unit": "prompts/s",
         "baseline": len(prompts) / t_one, "ratio": t_one / t_batch, "target": ">= 5"},
        {"name": "decode/batched_agrees_with_one_by_one", "value": agree, "unit": "fraction"},
    ]
    for bs in (16, 64, 256):
        _, t = timed(greedy_decode, model, prompts, batch_size=bs, **kw)
        rows.append({"name": f"decode/batched_{bs}", "value": len(prompts) / t, "unit": "prompts/s",
                     "baseline": len(prompts) / t_one, "ratio": t_one / t})
    record(rows)


if __name__ == "__main__":
    main()
