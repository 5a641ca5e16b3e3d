"""Supervised fine-tuning: the one step behind pretraining, alignment and harmful fine-tuning.

Rows are token-id pairs (prompt_ids, target_ids); the loss is on target tokens only.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from jobs.resources import peak_rss_mb

IGNORE = -100


def collate(prompt_ids, target_ids, pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (prompt positions ignored)."""
    seqs, labels = [], []
    for p, t in zip(prompt_ids, target_ids, strict=True):
        p, t = list(p), list(t)
        seq = (p + t)[:max_len]
        seqs.append(seq)
        labels.append(([IGNORE] * len(p) + t)[:max_len])
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    label_ids = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(s)] = torch.tensor(s)
        label_ids[i, : len(y)] = torch.tensor(y)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}


def collate_numpy(batch: dict[str, np.ndarray], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Ray Data's `iter_torch_batches` hands columns as numpy arrays of arrays."""
    return collate(batch["prompt_ids"], batch["target_ids"], pad_id, max_len)


def make_optimizer(model, cfg: dict) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0), betas=(0.9, 0.95))


def make_schedule(optimizer, cfg: dict, total_steps: int):
    """Linear warm-up, then constant or cosine to 10% of the peak."""
    warmup = int(cfg.get("warmup", 0.0) * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.get("schedule", "constant") == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(rows: dict[str, list], batch_size: int, seed: int, drop_last: bool = True):
    """Shuffled index batches over in-memory rows (the single-process path)."""
    order = np.random.default_rng(seed).permutation(len(rows["prompt_ids"]))
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield [rows["prompt_ids"][i] for i in idx], [rows["target_ids"][i] for i in idx]


def finetune(model, rows: dict[str, list], cfg: dict, pad_id: int, seed: int, progress=None, after_step=None) -> dict:
    """Train `model` in this process for cfg['epochs'] epochs; returns the loss history.

    `progress(step, total, loss)` is called every few steps so callers can show it;
    `after_step(step, total, model)` after every step (checkpointing).
    """
    torch.manual_seed(seed)
    model.train()
    steps_per_epoch = len(rows["prompt_ids"]) // cfg["batch_size"]
    total = steps_per_epoch * cfg["epochs"]
    if total == 0:
        raise ValueError(f"{len(rows['prompt_ids'])} rows give no full batch of {cfg['batch_size']}")
    optimizer = make_optimizer(model, cfg)
    schedule = make_schedule(optimizer, cfg, total)
    losses, tokens, step, start = [], 0, 0, time.perf_counter()
    for epoch in range(cfg["epochs"]):
        for prompts, targets in epoch_batches(rows, cfg["batch_size"], seed + epoch):
            batch = collate(prompts, targets, pad_id, cfg["max_len"])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.get("grad_clip", 1.0))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if progress and (step % 10 == 0 or step == total):
                progress(step, total, losses[-1])
            if after_step:
                after_step(step, total, model)
    model.eval()
    return {"losses": losses, "steps": step, "tokens": tokens, "seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb()}
