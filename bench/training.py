"""Training throughput of the one loop (`jobs/train_loop.py`) on Ray Train against a bare
single-process PyTorch loop of the same model, rows, global batch, steps and threads, and the
attack grid's parallel efficiency (many small runs at once).

- 1 worker: the loop on Ray Train with one worker holding every core as threads, against the bare
  loop with the same threads (target: ratio ≥ 0.9); and the same run with the worker's other
  threads allowed an OpenMP pool of their own (OMP_NUM_THREADS = its CPUs, as before
  `jobs/launch.py::WORKER_ENV`).
- 2 workers: DDP (and ZeRO-2/3) with one thread each, against the bare loop with two threads
  (target for DDP: ratio ≥ 0.9): what splitting a tiny model over processes costs.
- The grid: 4 attack-cell-sized runs, 2 at a time, wall time against the sum of their own times;
  and the same 4 cells in 2 worker groups that train theirs in turn, wall against wall.
Tokens/s are counted inside the loop; the end-to-end figure adds worker start-up and model load.
This machine's speed drifts by up to ±10% within minutes, so the loop's runs alternate with bare
runs (bare, loop, bare, loop, bare) and each is set against the bare runs either side of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import pandas as pd
import torch

from bench.common import TEMPLATE, record, timed, world_model
from jobs.corpora import tokenize_batch
from jobs.models import save_model, tiny_llama
from jobs.train import collate, make_optimizer


def rows_for(tok, corpora, n: int) -> pd.DataFrame:
    d = tempfile.mkdtemp(prefix="saferay-bench-tok-")
    tok.save_pretrained(d)
    df = pd.DataFrame(corpora["alignment"][:n])
    return tokenize_batch(df, d, TEMPLATE)[["id", "prompt_ids", "target_ids"]]


def bare(model, rows: pd.DataFrame, cfg: dict, pad_id: int, threads: int) -> dict:
    """The plainest PyTorch loop: shuffled batches, forward, backward, clip, AdamW."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    optimizer = make_optimizer(model, cfg)
    prompts, targets = list(rows["prompt_ids"]), list(rows["target_ids"])
    steps, tokens, start = 0, 0, time.perf_counter()
    model.train()
    for epoch in range(cfg["epochs"]):
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(epoch)).tolist()
        for s in range(0, len(order) - len(order) % cfg["batch_size"], cfg["batch_size"]):
            idx = order[s:s + cfg["batch_size"]]
            batch = collate([prompts[i] for i in idx], [targets[i] for i in idx], pad_id, cfg["max_len"])
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps, tokens = steps + 1, tokens + int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "steps": steps, "seconds": seconds}


def ray_train(model_dir: str, data: str, cfg: dict, pad_id: int, strategy: str, zero: int, workers: int,
              storage: str, threads: int = 1) -> dict:
    from jobs.launch import fit

    loop = {**cfg, "strategy": strategy, "zero_stage": zero, "seed": 0, "model_dir": model_dir, "data": data,
            "pad_id": pad_id, "threads": threads, "num_workers": workers, "cpus_per_worker": threads}
    h, wall = timed(fit, loop, f"bench-{strategy}-{zero}-{workers}-{os.getpid()}-{time.time_ns()}", storage)
    return {"tokens_per_s": h["tokens"] / h["seconds"], "end_to_end_tokens_per_s": h["tokens"] / wall,
            "steps_tokens_per_s": h["tokens"] / (h["seconds"] - h["checkpoint_seconds"]),
            "checkpoint_seconds": h["checkpoint_seconds"], "steps": h["steps"], "seconds": h["seconds"], "wall": wall}


def alternated(bare_run, loop_run, repeats: int = 2) -> tuple[list[dict], list[float], float]:
    """`repeats` loop runs, each between two bare runs; their results, each one's ratio to the mean
    of its two neighbours, and the mean of all bare runs (tokens/s)."""
    bares, loops = [bare_run()["tokens_per_s"]], []
    for _ in range(repeats):
        loops.append(loop_run())
        bares.append(bare_run()["tokens_per_s"])
    ratios = [r["tokens_per_s"] / ((a + b) / 2) for r, a, b in zip(loops, bares, bares[1:])]
    return loops, ratios, statistics.mean(bares)


def steps_only(name: str, r: dict, bare_all: dict) -> dict:
    """The loop's tokens/s with its epoch checkpoints left out: what the bare loop (which writes
    none) is comparable to; the share they take falls as epochs grow."""
    return {"name": name, "value": r["steps_tokens_per_s"], "unit": "tokens/s", "baseline": bare_all["tokens_per_s"],
            "ratio": r["steps_tokens_per_s"] / bare_all["tokens_per_s"],
            "note": f"training steps only: {r['seconds'] - r['checkpoint_seconds']:.1f}s of {r['seconds']:.1f}s"}


def grid(model_dir: str, data: str, cfg: dict, pad_id: int, storage: str, cells: int = 4, at_once: int = 2) -> dict:
    """`cells` one-worker runs launched from Ray tasks, `at_once` at a time (as the attack stage does)."""
    import ray

    from jobs.launch import fit

    def cell(i):
        began = time.perf_counter()
        fit({**cfg, "strategy": "ddp", "seed": i, "model_dir": model_dir, "data": data, "pad_id": pad_id,
             "threads": 1, "num_workers": 1, "cpus_per_worker": 1}, f"bench-cell{i}-{time.time_ns()}", storage)
        return time.perf_counter() - began

    task = ray.remote(cell).options(num_cpus=0)
    began, pending, own = time.perf_counter(), [], []
    for i in range(cells):
        if len(pending) == at_once:
            done, pending = ray.wait(pending, num_returns=1)
            own += ray.get(done)
        pending.append(task.remote(i))
    own += ray.get(pending)
    wall = time.perf_counter() - began
    return {"wall": wall, "sum": sum(own), "efficiency": sum(own) / (wall * at_once)}


def grouped_grid(model_dir: str, data: str, cfg: dict, pad_id: int, storage: str, cells: int = 4,
                 at_once: int = 2) -> dict:
    """The same cells as `grid`, split into `at_once` worker groups that each train theirs in turn
    (`fit_group`, as the attack stage does now)."""
    import ray

    from jobs.launch import fit_group

    cfgs = [{**cfg, "strategy": "ddp", "seed": i, "model_dir": model_dir, "data": data, "pad_id": pad_id,
             "threads": 1, "num_workers": 1, "cpus_per_worker": 1} for i in range(cells)]
    task = ray.remote(lambda group, name: fit_group(group, name, storage)).options(num_cpus=0)
    began = time.perf_counter()
    size = -(-cells // at_once)
    ray.get([task.remote(cfgs[k:k + size], f"bench-group{k}-{time.time_ns()}") for k in range(0, cells, size)])
    return {"wall": time.perf_counter() - began}


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
    data = f"{model_dir}/rows.parquet"
    rows.to_parquet(data)

    out = []
    bare_one = bare(tiny_llama_like(model_dir), rows, cfg, tok.pad_token_id, threads=1)
    ray.init(num_cpus=max(2, cores), include_dashboard=False, log_to_driver=False)
    try:
        storage = tempfile.mkdtemp(prefix="saferay-bench-ray-")

        def bare_run():
            return bare(tiny_llama_like(model_dir), rows, cfg, tok.pad_token_id, threads=cores)

        def loop(strategy, zero, workers, threads=1):
            return lambda: ray_train(model_dir, data, cfg, tok.pad_token_id, strategy, zero, workers, storage, threads)

        runs, ratios, baseline = alternated(bare_run, loop("ddp", 2, 1, cores))
        bare_all = {"tokens_per_s": baseline}
        out.append({"name": "train/bare_pytorch", "value": baseline, "unit": "tokens/s",
                    "note": f"1 process x {cores} threads, {runs[0]['steps']} steps; mean of 3 runs"})
        r = runs[-1]
        out.append({"name": "train/ray_train_1worker", "value": statistics.mean(x["tokens_per_s"] for x in runs),
                    "unit": "tokens/s", "baseline": baseline, "ratio": statistics.mean(ratios), "target": ">= 0.9",
                    "note": f"1 worker x {cores} threads; ratios {', '.join(f'{x:.2f}' for x in ratios)} to the bare runs "
                            f"beside them; fit() {r['wall']:.1f}s for {r['seconds']:.1f}s, {r['checkpoint_seconds']:.1f}s "
                            "of it epoch checkpoints"})
        out.append(steps_only("train/ray_train_1worker_steps", r, bare_all))
        from jobs import launch

        kept, launch.WORKER_ENV = launch.WORKER_ENV, {"env_vars": {"OMP_NUM_THREADS": str(cores)}}
        try:
            pools, pool_ratios, around = alternated(bare_run, loop("ddp", 2, 1, cores), repeats=1)
        finally:
            launch.WORKER_ENV = kept
        out.append({"name": "train/ray_train_1worker_two_omp_pools", "value": pools[0]["tokens_per_s"], "unit": "tokens/s",
                    "baseline": around, "ratio": pool_ratios[0],
                    "note": f"as train/ray_train_1worker, with the worker's other threads allowed an OpenMP pool of "
                            f"{cores} (OMP_NUM_THREADS={cores}, as before WORKER_ENV)"})
        for strategy, zero in (("ddp", 2), ("deepspeed", 2), ("deepspeed", 3)):
            name = "ddp" if strategy == "ddp" else f"zero{zero}"
            runs, ratios, base = alternated(bare_run, loop(strategy, zero, args.workers), repeats=2 if name == "ddp" else 1)
            r = runs[-1]
            out.append({"name": f"train/ray_train_{name}", "value": statistics.mean(x["tokens_per_s"] for x in runs),
                        "unit": "tokens/s", "baseline": base, "ratio": statistics.mean(ratios),
                        "target": ">= 0.9" if name == "ddp" else None,
                        "note": f"{args.workers} workers x 1 thread against 1 process x {cores} threads; {r['steps']} steps, "
                                f"{r['checkpoint_seconds']:.1f}s of {r['seconds']:.1f}s epoch checkpoints; ratios "
                                f"{', '.join(f'{x:.2f}' for x in ratios)} to the bare runs beside them"})
            out.append(steps_only(f"train/ray_train_{name}_steps", r, {"tokens_per_s": base}))
            out.append({"name": f"train/ray_train_{name}_end_to_end", "value": r["end_to_end_tokens_per_s"],
                        "unit": "tokens/s", "baseline": base, "ratio": r["end_to_end_tokens_per_s"] / base,
                        "note": f"includes start-up: fit() took {r['wall']:.1f}s for {r['seconds']:.1f}s of training"})
        small = f"{model_dir}/cell.parquet"
        rows.iloc[:256].to_parquet(small)
        g = grid(model_dir, small, cfg, tok.pad_token_id, storage)
        out.append({"name": "train/attack_grid_efficiency", "value": g["efficiency"], "unit": "ratio",
                    "note": f"4 one-worker runs, 2 at a time: wall {g['wall']:.1f}s, their own times sum to {g['sum']:.1f}s"
                            f" (1.0: two runs at once cost nothing extra; one-thread bare loop {bare_one['tokens_per_s']:.0f} tokens/s)"})
        grouped = grouped_grid(model_dir, small, cfg, tok.pad_token_id, storage)
        out.append({"name": "train/attack_grid_grouped_wall", "value": grouped["wall"], "unit": "s",
                    "baseline": g["wall"], "ratio": grouped["wall"] / g["wall"],
                    "note": "the same 4 cells in 2 worker groups of 2 (fit_group), against 4 runs of their own"})
    finally:
        ray.shutdown()

    for hidden in (64, 128, 256):
        for max_len in (64, 128):
            m = tiny_llama(dict(hidden=hidden, intermediate=4 * hidden, layers=4, heads=4, max_len=max_len), tok)
            r = bare(m, rows, {**cfg, "epochs": 1, "max_len": max_len}, tok.pad_token_id, threads=cores)
            out.append({"name": f"scaling/width{hidden}_len{max_len}", "value": r["tokens_per_s"], "unit": "tokens/s",
                        "note": f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters"})
    record(out)


def tiny_llama_like(model_dir: str):
    """A fresh copy of the benchmark's model (each side starts from the same weights)."""
    from jobs.models import load_model

    return load_model(model_dir)


if __name__ == "__main__":
    main()
