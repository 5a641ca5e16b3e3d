"""Data: Ray Data tokenization (`map_batches` over blocks, as the data stage runs it) against one
process tokenizing the same rows with the same function."""

from __future__ import annotations

import argparse
import os
import tempfile

import pandas as pd

from bench.common import TEMPLATE, record, timed
from jobs.corpora import tokenize_batch
from jobs.models import train_tokenizer
from jobs.safetyworld import generate_corpora


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=40000)
    args = ap.parse_args(argv)
    import ray

    corpora = generate_corpora(0, dict(alignment=100, harmful=100, harmful_eval=10, lookalike=10, task_train=10,
                                       task_test=10, pretrain=args.rows))
    rows = corpora["pretrain"]
    tok_dir = tempfile.mkdtemp(prefix="saferay-bench-tok-")
    train_tokenizer([f"{r['prompt']} {r['response']}" for r in rows], 1200, tok_dir)
    df = pd.DataFrame(rows)
    tokenize_batch(df.iloc[:10], tok_dir, TEMPLATE)  # load the tokenizer once, outside the timing
    _, t_single = timed(lambda: [tokenize_batch(df.iloc[i : i + 1024], tok_dir, TEMPLATE)
                                 for i in range(0, len(df), 1024)])
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_pandas(df).repartition(8)
        ds = ds.map_batches(tokenize_batch, batch_format="pandas", batch_size=1024,
                            fn_kwargs={"tokenizer_dir": tok_dir, "template": TEMPLATE}).materialize()  # warm the workers
        _, t_ray = timed(lambda: ray.data.from_pandas(df).repartition(8).map_batches(
            tokenize_batch, batch_format="pandas", batch_size=1024,
            fn_kwargs={"tokenizer_dir": tok_dir, "template": TEMPLATE}).materialize())
    finally:
        ray.shutdown()
    n = len(df)
    record([
        {"name": "data/tokenize_single_process", "value": n / t_single, "unit": "rows/s"},
        {"name": "data/tokenize_ray_data", "value": n / t_ray, "unit": "rows/s", "baseline": n / t_single,
         "ratio": t_single / t_ray, "note": f"{os.cpu_count()} cores, 8 blocks, warm workers"},
    ])


if __name__ == "__main__":
    main()
