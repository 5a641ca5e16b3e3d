"""Batched greedy decoding with a KV cache (Hugging Face `generate`), never prompt by prompt."""

from __future__ import annotations

import numpy as np
import torch


def _batches(model, prompt_ids, pad_id, eos_id, max_new_tokens, batch_size, processors_for, first_logits):
    # Similar lengths share a batch, so left padding wastes little.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = prompt_ids[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        out = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
            logits_processor=processors_for(width) if processors_for else None, return_dict_in_generate=True, output_logits=first_logits,
        )
        rows = [ids[: ids.index(eos_id)] if eos_id in ids else ids for ids in out.sequences[:, width:].tolist()]
        yield idx, rows, (out.logits[0] if first_logits else None)


@torch.no_grad()
def greedy_decode(model, prompt_ids: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                  batch_size: int = 128, processors_for=None) -> list[list[int]]:
    """Generated token ids per prompt (eos and what follows removed), in the input order.

    `processors_for(width)`, if given, returns the logits processors for a batch whose
    left-padded prompts are `width` tokens wide (TSDI needs to know where responses start)."""
    model.eval()
    out: list[list[int]] = [[] for _ in prompt_ids]
    for idx, rows, _ in _batches(model, prompt_ids, pad_id, eos_id, max_new_tokens, batch_size, processors_for, False):
        for i, ids in zip(idx, rows):
            out[i] = ids
    return out


@torch.no_grad()
def greedy_decode_scored(model, prompt_ids: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                         score, batch_size: int = 128) -> tuple[list[list[int]], np.ndarray]:
    """Greedy decoding plus `score(first_step_logits[B, V]) -> [B, ...]` per prompt, at no extra forward pass."""
    model.eval()
    out: list[list[int]] = [[] for _ in prompt_ids]
    scores = None
    for idx, rows, logits in _batches(model, prompt_ids, pad_id, eos_id, max_new_tokens, batch_size, None, True):
        batch = np.asarray(score(logits.float().cpu()))
        if scores is None:
            scores = np.zeros((len(prompt_ids), *batch.shape[1:]), dtype=batch.dtype)
        scores[idx] = batch
        for i, ids in zip(idx, rows):
            out[i] = ids
    return out, scores
