"""What every training step shares: batches of token-id pairs (prompt_ids, target_ids) with
the loss on target tokens only, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import torch

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


def count_target_tokens(batch: dict) -> int:
    """Tokens the shifted causal-LM loss scores (labels after the first position)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def target_tokens(prompt_ids, target_ids, max_len: int) -> int:
    """`count_target_tokens` of these rows' collated batch, from their lengths alone: the target
    positions that survive truncation to `max_len`, less position 0 (the shift scores none)."""
    return sum(max(0, min(len(p) + len(t), max_len) - max(len(p), 1)) for p, t in zip(prompt_ids, target_ids))
