"""The per-worker loop Ray Train runs for VAA: the group streams, the strategy's backend, and
an epoch checkpoint that carries the sampler's state (q and its random generator)."""

from __future__ import annotations

import time

from jobs.models import load_model
from jobs.resources import peak_rss_mb
from jobs.train_worker import prepare_strategy, report_epoch, resume, sum_over_ranks, worker_setup
from jobs.vaa import GROUP_NAMES, GroupSampler, PlainBackend, ZeroBackend, train_vaa


def stream_seed(seed: int, group: int, epoch: int, cycle: int) -> int:
    return (seed * 1_000_003 + group * 10_007 + epoch * 101 + cycle) % 2**31


def batches_from(datasets: dict, cfg: dict):
    """`batches_for(group, epoch, cycle)` over Ray Data datasets or iterators (one per group).

    Without grouping (plain SAM) the single stream is the whole alignment set."""

    def batches_for(group: int, epoch: int, cycle: int):
        source = datasets["all"] if cfg["mode"] == "none" else datasets[GROUP_NAMES[group]]
        return source.iter_batches(batch_size=cfg["batch_size"], batch_format="numpy", drop_last=True,
                                   local_shuffle_buffer_size=cfg["shuffle_buffer"],
                                   local_shuffle_seed=stream_seed(cfg["seed"], group, epoch, cycle))

    return batches_for


def vaa_loop_per_worker(cfg: dict) -> dict:
    import ray.train

    rank, world, micro = worker_setup(cfg)
    total = cfg["steps_per_epoch"] * cfg["epochs"]
    model, optimizer, schedule, deepspeed = prepare_strategy(cfg, load_model(cfg["model_dir"]), micro, world, total)
    backend = (ZeroBackend(model, cfg["zero_stage"], world) if deepspeed
               else PlainBackend(model, optimizer, schedule, cfg.get("grad_clip", 1.0), world))
    sampler = GroupSampler(cfg["seed"], q=cfg["q0"], mode=cfg["mode"])
    start_epoch, extra = resume(model, optimizer, schedule, deepspeed)
    if extra:
        sampler.load(extra["sampler"])
    seconds_before = extra.get("seconds", 0.0)

    names = ("all",) if cfg["mode"] == "none" else ("vulnerable", "invulnerable")
    shards = {name: ray.train.get_dataset_shard(name) for name in names}
    sum_ranks = sum_over_ranks if world > 1 else (lambda x: x)
    began = time.perf_counter()

    def on_epoch(epoch, history):
        new = history["loss"][-cfg["steps_per_epoch"]:]
        # The checkpoint carries the history so far: a run resumed from it (even from its
        # last epoch, with no step left) returns the whole run's trajectory.
        report_epoch(epoch, {"loss": sum(new) / max(1, len(new)), "q": sampler.q}, rank, deepspeed, model,
                     optimizer, schedule, extra={"sampler": sampler.state(), "history": history,
                                                 "seconds": seconds_before + time.perf_counter() - began})

    model.train()
    history = train_vaa(backend, batches_from(shards, cfg), cfg, sampler, rank, world, start_epoch, sum_ranks,
                        on_epoch, history=extra.get("history"))
    return {**history, "seconds": seconds_before + time.perf_counter() - began, "steps": len(history["loss"]),
            "start_epoch": start_epoch, "peak_rss_mb": peak_rss_mb()}
