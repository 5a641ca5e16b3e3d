"""The one training loop every fine-tune of a study runs: pretraining, alignment (SFT, VAA and its
ablations), the over-aligned model, proxy runs, attack cells and Tune trials.

`train_loop_per_worker` is what each Ray Train worker runs: the model wrapped for its strategy
(one process, DDP, or DeepSpeed ZeRO-2/3, LoRA optional), the rows held in memory (fine-tuning
sets are thousands of rows, and a per-batch Ray Data iterator cost a third of the throughput),
the step the config names (`jobs/steps.py`), a checkpoint at every epoch's end, and the trained
model written to the store by rank 0. `run_epochs` is the loop itself, also callable in one
process (tests, benchmarks).

Global batches: every rank reads the same seeded permutation of a stream and keeps rows
[rank·micro, (rank+1)·micro), and the loss is the token-weighted mean over the global batch, so
a run's numbers do not depend on its world size. A stream's permutation depends only on (seed,
stream, epoch, pass), so a run resumed from an epoch checkpoint continues exactly.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from jobs.train import collate_numpy, target_tokens

COLUMNS = ("id", "prompt_ids", "target_ids")
# Each stream's shuffling seed. VAA's two keep the ids they had since its first version.
STREAM_IDS = {"all": 0, "invulnerable": 0, "vulnerable": 1, "harmful": 3, "alignment": 4}


class RowStream:
    """Rows held in memory, served as shuffled global batches of numpy columns."""

    def __init__(self, frame: pd.DataFrame):
        self.columns = {c: frame[c].to_numpy() for c in COLUMNS}
        self.n = len(frame)

    def batches(self, batch_size: int, seed: int) -> Iterator[dict]:
        order = np.random.default_rng(seed).permutation(self.n)
        for start in range(0, self.n - self.n % batch_size, batch_size):
            idx = order[start:start + batch_size]
            yield {c: v[idx] for c, v in self.columns.items()}


def row_streams(frame: pd.DataFrame) -> dict[str, RowStream]:
    """The streams a step draws batches from: `all` (the rows being trained on), each group of a
    `group` column among them (VAA's vulnerable / invulnerable), and each value of a `stream`
    column, whose rows stay out of `all` (a defence's harmful set, Lisa's alignment rows)."""
    extra = {}
    if "stream" in frame:
        named = frame["stream"].notna()
        extra = {name: RowStream(rows) for name, rows in frame[named].groupby("stream", sort=True)}
        frame = frame[~named]
    streams = {"all": RowStream(frame), **extra}
    if "group" in frame:
        for name, rows in frame.groupby("group", sort=True):
            streams[name] = RowStream(rows)
    return streams


def stream_seed(seed: int, stream: str, epoch: int, cycle: int) -> int:
    return (seed * 1_000_003 + STREAM_IDS.get(stream, 2) * 10_007 + epoch * 101 + cycle) % 2**31


def cycled(streams: dict[str, RowStream], name: str, batch_size: int, seed: int, epoch: int) -> Iterator[dict]:
    """One stream's global batches for one epoch, cycling: pass c reshuffles with its own seed."""
    if name not in streams or streams[name].n < batch_size:
        have = streams[name].n if name in streams else 0
        raise ValueError(f"stream '{name}' has {have} rows, fewer than one batch of {batch_size}")
    cycle = 0
    while True:
        yield from streams[name].batches(batch_size, stream_seed(seed, name, epoch, cycle))
        cycle += 1


def run_epochs(backend, step, streams: dict[str, RowStream], cfg: dict, steps_per_epoch: int, rank: int = 0,
               world: int = 1, start_epoch: int = 0, sum_ranks: Callable[[float], float] = lambda x: x,
               device: torch.device | None = None, on_step=None, on_epoch=None, history: dict | None = None) -> dict:
    """Epochs [start_epoch, epochs) of `step`; returns the history (one value per step for each key
    the step reports), extending `history` (a resumed run's history so far)."""
    micro = cfg["batch_size"] // world
    history = {k: v.copy() if isinstance(v, list) else v for k, v in history.items()} if history else {
        "tokens_per_rank": 0}
    for epoch in range(start_epoch, cfg["epochs"]):
        batches = {name: cycled(streams, name, cfg["batch_size"], cfg["seed"], epoch) for name in step.streams}
        for i in range(steps_per_epoch):
            t = epoch * steps_per_epoch + i
            chosen = step.choose(t)
            local, counts = {}, {}
            for name in (chosen,) if isinstance(chosen, str) else chosen:
                rows = next(batches[name])
                batch = collate_numpy({k: v[rank * micro:(rank + 1) * micro] for k, v in rows.items()},
                                      cfg["pad_id"], cfg["max_len"])
                # Each row's place in the global batch: what makes per-example randomness rank-free.
                batch["position"] = torch.arange(rank * micro, (rank + 1) * micro)
                if device is not None:
                    batch = {k: v.to(device) for k, v in batch.items()}
                # Every rank holds the whole global batch, so each counts its tokens without a collective.
                local[name] = batch
                counts[name] = target_tokens(rows["prompt_ids"], rows["target_ids"], cfg["max_len"])
                history["tokens_per_rank"] += int(batch["attention_mask"].sum())
            if isinstance(chosen, str):
                out = step.take(backend, local[chosen], counts[chosen], sum_ranks)
            else:  # a step that takes a batch of each of several streams (Booster, RepNoise)
                out = step.take(backend, local, counts, sum_ranks)
            for k, v in out.items():
                history.setdefault(k, []).append(v)
            if on_step:
                on_step(t + 1, out)
        if on_epoch:
            on_epoch(epoch, history)
    return history


def steps_per_epoch_of(cfg: dict, streams: dict[str, RowStream]) -> int:
    """Steps per epoch: a pass over all rows (VAA's groups are drawn from, not passed over)."""
    steps = cfg.get("steps_per_epoch") or streams["all"].n // cfg["batch_size"]
    if steps < 1:
        raise ValueError(f"{streams['all'].n} rows give no full batch of {cfg['batch_size']}")
    return steps


def sum_over_ranks(value: float) -> float:
    import ray.train.torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=ray.train.torch.get_device())  # NCCL: device tensors
    dist.all_reduce(t)
    return t.item()


def train_loop_per_worker(config: dict) -> list[dict]:
    """One Ray Train worker of a group that trains `config["runs"]` in turn (`jobs/launch.py`):
    many short fine-tunes (attack cells) pay the group's start-up once. Every run's epoch
    checkpoint names the run, and carries the histories of the runs before it, so a restarted
    group skips the finished runs and resumes the interrupted one. Returns rank 0's histories."""
    from jobs.checkpoints import checkpoint_meta

    meta = checkpoint_meta()
    histories = list(meta["extra"].get("done", [])) if meta else []
    for i in range(len(histories), len(config["runs"])):
        resuming = meta is not None and meta.get("run", 0) == i
        histories.append(train_run(config["runs"][i], i, histories, resuming))
        # Free the run's model, optimizer and DeepSpeed engine before the next is built.
        gc.collect()
    return histories


def train_run(cfg: dict, index: int, done: list[dict], resuming: bool) -> dict:
    """Run `index` of a worker group (cfg: its config, `jobs/launch.py::run_config`); `done`: the
    histories of the runs before it; `resuming`: the last checkpoint is this run's."""
    import ray.train
    import ray.train.torch

    from jobs.backends import prepare_strategy
    from jobs.checkpoints import export_model, report_epoch, resume
    from jobs.models import load_model
    from jobs.resources import peak_rss_mb
    from jobs.steps import make_step
    from jobs.storage import join, local

    # What the run reads, as files on this worker's node (a store location is copied here once).
    cfg = {**cfg, "data": local(cfg["data"]), "model_dir": local(cfg["model_dir"]),
           "tokenizer_dir": local(cfg.get("tokenizer_dir") or cfg["model_dir"])}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.get("threads", 1))
    torch.manual_seed(cfg["seed"])
    streams = row_streams(pd.read_parquet(cfg["data"]))
    steps_per_epoch = steps_per_epoch_of(cfg, streams)
    total = steps_per_epoch * cfg["epochs"]
    backend = prepare_strategy(cfg, load_model(cfg["model_dir"]), cfg["batch_size"] // world, world, total)
    step = make_step(cfg, steps_per_epoch)
    start_epoch, extra = resume(backend) if resuming else (0, {})
    if extra:
        step.load(extra["step"])
        torch.set_rng_state(torch.tensor(extra["torch_rng"], dtype=torch.uint8))
    seconds_before, began = extra.get("seconds", 0.0), time.perf_counter()
    sum_ranks = sum_over_ranks if world > 1 else (lambda x: x)
    # Tokens over all ranks: those before a restart from the checkpoint, this attempt's summed over ranks.
    tokens_before, rank_tokens_before = extra.get("tokens", 0), extra.get("history", {}).get("tokens_per_rank", 0)

    def tokens(history: dict) -> int:  # a collective: every rank calls it
        return tokens_before + int(sum_ranks(float(history["tokens_per_rank"] - rank_tokens_before)))

    saves = {s: i + 1 for i, s in enumerate(cfg.get("save_steps", []))}
    progress, fault = cfg.get("progress"), cfg.get("fault") or {}

    def on_step(t: int, out: dict) -> None:
        if t in saves:  # a collective under ZeRO-3: every rank takes part
            export_model(backend, cfg, rank, join(cfg["save_dir"], f"ckpt-{saves[t]:02d}"))
        if rank == 0 and progress and (t % 10 == 0 or t == total):
            progress(t, total, out["loss"])
        if rank == 0 and t == fault.get("exit_at_step") and not Path(fault["once_file"]).exists():
            Path(fault["once_file"]).touch()  # a worker process that dies once, mid-epoch (tests)
            os._exit(1)

    # Of `seconds`, the time spent writing and reporting epoch checkpoints (the bench tells the
    # two apart: a short run pays proportionally more for them).
    checkpoint_seconds = extra.get("checkpoint_seconds", 0.0)

    def on_epoch(epoch: int, history: dict) -> None:
        nonlocal checkpoint_seconds
        written = time.perf_counter()
        new = history["loss"][-steps_per_epoch:]
        report_epoch(epoch, {"loss": sum(new) / len(new), "run": index}, rank, backend, index, extra={
            "history": history, "step": step.state(), "torch_rng": torch.get_rng_state().tolist(),
            "tokens": tokens(history), "seconds": seconds_before + time.perf_counter() - began, "done": done,
            "checkpoint_seconds": checkpoint_seconds})
        checkpoint_seconds += time.perf_counter() - written

    backend.model.train()
    history = run_epochs(backend, step, streams, cfg, steps_per_epoch, rank, world, start_epoch, sum_ranks,
                         ray.train.torch.get_device(), on_step, on_epoch, extra.get("history"))
    seconds = seconds_before + time.perf_counter() - began  # training, not the export below
    backend.model.eval()
    if cfg.get("out_dir"):
        export_model(backend, cfg, rank, cfg["out_dir"])
    backend.close()
    # The history spans the whole run: the epochs before a restart came from the checkpoint.
    return {**history, "steps": len(history["loss"]), "start_epoch": start_epoch,
            "tokens": tokens(history), "seconds": seconds, "checkpoint_seconds": checkpoint_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "checkpoints": [{"t": i, "step": s, "dir": f"ckpt-{i:02d}"} for s, i in saves.items()]}
