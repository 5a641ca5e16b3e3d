"""The per-worker loop that Ray Train runs: DDP or DeepSpeed ZeRO-2/3 over a dataset shard.

Every epoch ends with `ray.train.report` and a checkpoint, so a restarted worker group
resumes from the last finished epoch (`ray.train.get_checkpoint`). The checkpoint carries the
run's history so far (losses, tokens, seconds), so a resumed run returns the whole run's
history, also when it resumed from its final checkpoint and has no step left to take.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from jobs.models import apply_lora, load_model
from jobs.resources import peak_rss_mb
from jobs.train import collate_numpy, make_optimizer, make_schedule

DS_TAG = "ckpt"


def deepspeed_config(cfg: dict, micro_batch: int, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.get("grad_clip", 1.0),
        "zero_optimization": {"stage": cfg["zero_stage"], **_offload(cfg.get("offload", "none"))},
        # One torch AdamW in every strategy, so that strategies compare like for like.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.get("bf16", False)},
        "steps_per_print": 10**9,
    }


def _offload(offload: str) -> dict:
    """The ZeRO-3 CPU-offload presets: optimizer states, or optimizer states and parameters."""
    out = {}
    if offload in ("optimizer", "params"):
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "params":
        out["offload_param"] = {"device": "cpu", "pin_memory": True}
    return out


def _unwrap(model):
    """The plain module: Ray's prepare_model wraps in DDP only when there is more than one worker."""
    return getattr(model, "module", model)


def sum_over_ranks(value: float) -> float:
    import ray.train.torch

    t = torch.tensor([value], dtype=torch.float64, device=ray.train.torch.get_device())  # NCCL: device tensors
    dist.all_reduce(t)
    return t.item()


def worker_setup(cfg: dict) -> tuple[int, int, int]:
    """This worker's rank, the world size and the per-rank micro-batch; threads and seed set."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.get("threads", 1))
    torch.manual_seed(cfg["seed"])
    return rank, world, cfg["batch_size"] // world


def train_loop_per_worker(cfg: dict) -> dict:
    import ray.train

    rank, world, micro = worker_setup(cfg)
    steps_per_epoch = (cfg["rows"] // world) // micro
    total = steps_per_epoch * cfg["epochs"]

    model, optimizer, schedule, deepspeed = prepare_strategy(cfg, load_model(cfg["model_dir"]), micro, world, total)
    start_epoch, extra = resume(model, optimizer, schedule, deepspeed)
    done = extra.get("history", {"losses": [], "tokens_per_rank": 0, "seconds": 0.0})

    shard = ray.train.get_dataset_shard("train")
    collate = partial(collate_numpy, pad_id=cfg["pad_id"], max_len=cfg["max_len"])
    device = ray.train.torch.get_device()
    losses, tokens, began = list(done["losses"]), done["tokens_per_rank"], time.perf_counter()
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        epoch_losses = []
        batches = shard.iter_torch_batches(batch_size=micro, collate_fn=collate, drop_last=True,
                                           local_shuffle_buffer_size=4 * micro, local_shuffle_seed=cfg["seed"] + epoch)
        for step, batch in enumerate(batches):
            if step >= steps_per_epoch:  # every rank takes the same number of steps
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            if deepspeed:
                model.backward(loss)
                model.step()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.get("grad_clip", 1.0))
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
            epoch_losses.append(sum_over_ranks(loss.item()) / world)
            tokens += int(batch["attention_mask"].sum())
        losses += epoch_losses
        history = {"losses": losses, "tokens_per_rank": tokens, "seconds": done["seconds"] + time.perf_counter() - began}
        report_epoch(epoch, {"loss": sum(epoch_losses) / max(1, len(epoch_losses))}, rank, deepspeed, model,
                     optimizer, schedule, extra={"history": history})
    # The history spans the whole run: the epochs before a restart came from the checkpoint.
    return {"losses": losses, "tokens_per_rank": tokens, "seconds": done["seconds"] + time.perf_counter() - began,
            "steps": len(losses), "start_epoch": start_epoch, "peak_rss_mb": peak_rss_mb()}


def prepare_strategy(cfg: dict, model, micro: int, world: int, total_steps: int):
    """The model wrapped for its strategy (DDP, or a DeepSpeed engine), its optimizer and schedule."""
    import ray.train.torch

    if cfg.get("lora", {}).get("enabled"):
        model = apply_lora(model, cfg["lora"])
    optimizer = make_optimizer(model, cfg)
    schedule = make_schedule(optimizer, cfg, total_steps)
    if cfg["strategy"] != "deepspeed":
        return ray.train.torch.prepare_model(model), optimizer, schedule, False
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed as ds

    engine, optimizer, _, schedule = ds.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(cfg, micro, world), dist_init_required=False)
    return engine, optimizer, schedule, True


def resume(model, optimizer, schedule, deepspeed: bool) -> tuple[int, dict]:
    """The epoch to start from and any extra state saved with the last checkpoint."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, {}
    with checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / "meta.json").read_text())
        if deepspeed:
            model.load_checkpoint(d, tag=DS_TAG)
        else:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
            _unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
    return meta["epoch"] + 1, meta.get("extra", {})


def report_epoch(epoch, metrics, rank, deepspeed, model, optimizer, schedule, extra: dict | None = None) -> None:
    """Report the epoch's metrics with a checkpoint a restarted worker group resumes from."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        if deepspeed:  # every rank writes its partition; Ray merges the directories
            model.save_checkpoint(d, tag=DS_TAG)
        elif rank == 0:
            torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict()}, Path(d) / "state.pt")
        if rank == 0:
            (Path(d) / "meta.json").write_text(json.dumps({"epoch": epoch, "deepspeed": deepspeed,
                                                           "extra": extra or {}}))
        has_files = deepspeed or rank == 0
        ray.train.report({"epoch": epoch, **metrics},
                         checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)


def export_checkpoint(checkpoint_dir: str, base_model_dir: str, out_dir: str, tokenizer, lora: dict | None = None) -> None:
    """Write a trained checkpoint as a plain Hugging Face model directory (LoRA adapters merged)."""
    from jobs.models import save_model

    meta = json.loads((Path(checkpoint_dir) / "meta.json").read_text())
    if meta["deepspeed"]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
    else:
        state = torch.load(Path(checkpoint_dir) / "state.pt", weights_only=False)["model"]
    model = load_model(base_model_dir)
    if lora and lora.get("enabled"):
        model = apply_lora(model, lora)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings appear once in a ZeRO checkpoint; anything else missing is a real error.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if lora and lora.get("enabled"):
        model = model.merge_and_unload()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    save_model(model, tokenizer, out_dir)
