"""Judged decoding: the batched path (KV cache, left padding) against a prompt-by-prompt loop,
same model, prompts and token budget, measured side by side (target: >= 5x)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import alignment_prompts, record, timed, world_model
from jobs.generate import greedy_decode
from jobs.judges import WorldJudge
from jobs.models import save_model


def memory_of_batch(model_dir: str, batch_size: int, prompts: int, max_new_tokens: int) -> float:
    """Peak RSS growth (MiB) of a fresh process that loads the saved model and decodes `prompts`
    at `batch_size`: the activations and KV cache that batch size costs."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from bench.common import SIZES, alignment_prompts\nfrom jobs.safetyworld import generate_corpora\n"
            "from jobs.generate import greedy_decode\nfrom jobs.models import load_model, load_tokenizer\n"
            "import psutil, threading, time\n"
            f"tok, model = load_tokenizer({model_dir!r}), load_model({model_dir!r})\n"
            f"ps = alignment_prompts(tok, generate_corpora(0, SIZES), {prompts})\n"
            "proc = psutil.Process(); before = proc.memory_info().rss; peak = [before]; done = threading.Event()\n"
            "def sample():\n"
            "    while not done.wait(0.002): peak[0] = max(peak[0], proc.memory_info().rss)\n"
            "t = threading.Thread(target=sample); t.start()\n"
            f"greedy_decode(model, ps, tok.pad_token_id, tok.eos_token_id, {max_new_tokens}, batch_size={batch_size})\n"
            "done.set(); t.join(); print((peak[0] - before) / 2**20)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.strip().splitlines()[-1])


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
    model_dir = tempfile.mkdtemp(prefix="saferay-bench-model-")
    save_model(model, tok, model_dir)
    for bs in (1, 16, 128, 512):
        rows.append({"name": f"memory/decode_batch_{bs}",
                     "value": memory_of_batch(model_dir, bs, 512, args.max_new_tokens),
                     "unit": "MiB", "note": "peak RSS above the pre-decoding level (sampled every 2 ms), 512 prompts, demo-sized model"})
    record(rows)


if __name__ == "__main__":
    main()
