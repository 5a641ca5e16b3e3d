"""Training throughput: the align_sft loop under Ray Train (DDP, DeepSpeed ZeRO-2/3, 2 workers)
against a bare single-process PyTorch loop of the same model, data, global batch and steps.

Both sides use the machine's cores (bare: one process with N threads; Ray Train: N workers with
one thread each), so the ratio is throughput per core used. Tokens/s are counted inside the
training loop; the end-to-end figure adds worker start-up, model load and data sharding.
Also the scaling curve: bare-loop tokens/s at widths 64/128/256 and sequence lengths 64/128.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import pandas as pd
import torch

from bench.common import TEMPLATE, record, timed, world_model
from jobs.corpora import tokenize_batch
from jobs.models import save_model, tiny_llama
from jobs.train import finetune


def rows_for(tok, corpora, n: int) -> pd.DataFrame:
    d = tempfile.mkdtemp(prefix="saferay-bench-tok-")
    tok.save_pretrained(d)
    df = pd.DataFrame(corpora["alignment"][:n])
    return tokenize_batch(df, d, TEMPLATE)[["id", "prompt_ids", "target_ids"]]


def bare(model, rows: pd.DataFrame, cfg: dict, pad_id: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    h = finetune(model, {"prompt_ids": [list(x) for x in rows["prompt_ids"]],
                         "target_ids": [list(x) for x in rows["target_ids"]]}, cfg, pad_id, seed=0)
    return {"tokens_per_s": h["tokens"] / h["seconds"], "steps": h["steps"], "seconds": h["seconds"]}


def ray_train(model_dir: str, rows: pd.DataFrame, cfg: dict, pad_id: int, strategy: str, zero: int, workers: int,
              storage: str, threads: int = 1) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train_worker import train_loop_per_worker

    loop = {**cfg, "strategy": strategy, "zero_stage": zero, "seed": 0, "model_dir": model_dir, "rows": len(rows),
            "pad_id": pad_id, "threads": threads}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5 if workers > 1 else 1}),
        datasets={"train": ray.data.from_pandas(rows)},
        run_config=RunConfig(name=f"bench-{strategy}-{zero}-{workers}-{os.getpid()}", storage_path=storage))
    result, wall = timed(trainer.fit)
    h = result.return_value
    tokens = h["tokens_per_rank"] * workers
    return {"tokens_per_s": tokens / h["seconds"], "end_to_end_tokens_per_s": tokens / wall, "steps": h["steps"],
            "seconds": h["seconds"], "wall": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    import ray

    cores = os.cpu_count() or 2
    tok, model, corpora = world_model()
    rows = rows_for(tok, corpora, args.rows)
    cfg = dict(lr=1e-3, epochs=args.epochs, batch_size=16, max_len=128, schedule="constant")
    model_dir = tempfile.mkdtemp(prefix="saferay-bench-model-")
    save_model(model, tok, model_dir)

    out = []
    b = bare(model, rows, cfg, tok.pad_token_id, threads=cores)
    out.append({"name": "train/bare_pytorch", "value": b["tokens_per_s"], "unit": "tokens/s",
                "note": f"1 process x {cores} threads, {b['steps']} steps"})
    ray.init(num_cpus=max(2, cores), include_dashboard=False, log_to_driver=False)
    try:
        storage = tempfile.mkdtemp(prefix="saferay-bench-ray-")
        for strategy, zero in (("ddp", 0), ("deepspeed", 2), ("deepspeed", 3)):
            name = "ddp" if strategy == "ddp" else f"zero{zero}"
            r = ray_train(model_dir, rows, cfg, tok.pad_token_id, strategy, zero or 2, args.workers, storage)
            out.append({"name": f"train/ray_train_{name}", "value": r["tokens_per_s"], "unit": "tokens/s",
                        "baseline": b["tokens_per_s"], "ratio": r["tokens_per_s"] / b["tokens_per_s"],
                        "target": ">= 0.9" if name == "ddp" else None,
                        "note": f"{args.workers} workers x 1 thread, in-loop; {r['steps']} steps"})
            out.append({"name": f"train/ray_train_{name}_end_to_end", "value": r["end_to_end_tokens_per_s"],
                        "unit": "tokens/s", "baseline": b["tokens_per_s"],
                        "ratio": r["end_to_end_tokens_per_s"] / b["tokens_per_s"],
                        "note": f"includes start-up: fit() took {r['wall']:.1f}s for {r['seconds']:.1f}s of training"})
        # The bare loop's layout (one process, every core as threads) under Ray Train: its own
        # overhead, apart from the cost of splitting a tiny model across processes.
        r = ray_train(model_dir, rows, cfg, tok.pad_token_id, "ddp", 2, 1, storage, threads=cores)
        out.append({"name": "train/ray_train_1worker", "value": r["tokens_per_s"], "unit": "tokens/s",
                    "baseline": b["tokens_per_s"], "ratio": r["tokens_per_s"] / b["tokens_per_s"],
                    "note": f"1 worker x {cores} threads, in-loop; fit() {r['wall']:.1f}s for {r['seconds']:.1f}s"})
    finally:
        ray.shutdown()

    for hidden in (64, 128, 256):
        for max_len in (64, 128):
            m = tiny_llama(dict(hidden=hidden, intermediate=4 * hidden, layers=4, heads=4, max_len=max_len), tok)
            r = bare(m, rows, {**cfg, "epochs": 1, "max_len": max_len}, tok.pad_token_id, threads=cores)
            out.append({"name": f"scaling/width{hidden}_len{max_len}", "value": r["tokens_per_s"], "unit": "tokens/s",
                        "note": f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters"})
    record(out)


if __name__ == "__main__":
    main()
