"""Shared set-up for benchmarks: a SafetyWorld tokenizer and a demo-sized tiny Llama."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from jobs.corpora import encode_prompts
from jobs.models import tiny_llama, train_tokenizer
from jobs.safetyworld import generate_corpora

SIZES = dict(alignment=1500, harmful=300, harmful_eval=100, lookalike=100, task_train=200, task_test=50, pretrain=500)
TEMPLATE = "<|user|> {prompt} <|assistant|>"
RESULTS = Path(__file__).with_name("results.json")


def world_model(tiny=None, seed=0):
    """(tokenizer, random-weight tiny Llama, corpora): decoding cost does not depend on training."""
    corpora = generate_corpora(seed, SIZES)
    texts = [f"{r['prompt']} {r.get('response') or r.get('answer') or ''}" for rows in corpora.values() for r in rows]
    tok = train_tokenizer(texts, 1200, tempfile.mkdtemp(prefix="saferay-bench-tok-"))
    torch.manual_seed(seed)
    model = tiny_llama(tiny or dict(hidden=128, intermediate=512, layers=4, heads=4, max_len=128), tok).eval()
    return tok, model, corpora


def alignment_prompts(tok, corpora, n):
    return encode_prompts(tok, [r["prompt"] for r in corpora["alignment"][:n]], TEMPLATE)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "machine": platform.machine()}


def record(rows: list[dict]) -> None:
    """Merge rows (by name) into bench/results.json and print them as a table."""
    existing = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    names = {r["name"] for r in rows}
    merged = [r for r in existing if r["name"] not in names] + [{**r, "environment": environment()} for r in rows]
    RESULTS.write_text(json.dumps({"rows": merged}, indent=2))
    print(f"{'name':<44} {'value':>12} {'unit':<12} {'baseline':>12} {'ratio':>7}")
    for r in rows:
        base = "" if r.get("baseline") is None else f"{r['baseline']:.4g}"
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        print(f"{r['name']:<44} {r['value']:>12.4g} {r['unit']:<12} {base:>12} {ratio:>7}")
