"""Whole jobs that one Ray task runs in one process: pretraining and one attack cell.

Each is a plain function of its config and input paths, testable without Ray.
"""

from __future__ import annotations

import zlib

import pandas as pd
import torch

from jobs.corpora import as_rows, read_split
from jobs.models import count_parameters, load_model, load_tokenizer, save_model, tiny_llama
from jobs.train import finetune

TRAIN_COLUMNS = ["id", "prompt_ids", "target_ids"]


def pretrain_tiny(data_dir: str, tokenizer_dir: str, tiny: dict, train: dict, seed: int, out_dir: str,
                  threads: int, progress=None) -> dict:
    """An unaligned base: a tiny Llama trained from scratch on SafetyWorld's mixture."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = tiny_llama(tiny, tokenizer)
    history = finetune(model, as_rows(read_split(data_dir, "pretrain", TRAIN_COLUMNS)),
                       {**train, "max_len": tiny["max_len"]}, tokenizer.pad_token_id, seed, progress)
    save_model(model, tokenizer, out_dir)
    history["parameters"] = count_parameters(model)
    return history


def cell_seed(seed: int, *parts) -> int:
    """A seed per grid cell, so cells draw their own examples (stable across runs)."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


def poisoned_mix(data_dir: str, task: str, p: float, n: int, seed: int, harmful_part: tuple[int, int] = (0, 1)) -> pd.DataFrame:
    """n task examples of which round(p*n) are replaced by harmful ones (SCIENCE.md §6).

    `harmful_part=(k, K)` draws only from the k-th of K disjoint slices of the harmful pool, so
    that runs meant to be independent share no harmful example.
    """
    task_rows = read_split(data_dir, f"task_{task}_train", TRAIN_COLUMNS)
    harmful = read_split(data_dir, "harmful", TRAIN_COLUMNS).sort_values("id", ignore_index=True)
    k, parts = harmful_part
    harmful = harmful.iloc[k::parts]
    n_harm = round(p * n)
    if n - n_harm > len(task_rows) or n_harm > len(harmful):
        raise ValueError(f"attack n={n}, p={p} needs {n - n_harm} task rows (have {len(task_rows)}) "
                         f"and {n_harm} harmful rows (have {len(harmful)})")
    mix = pd.concat([task_rows.sample(n=n - n_harm, random_state=seed),
                     harmful.sample(n=n_harm, random_state=seed + 1)])
    return mix.sample(frac=1.0, random_state=seed + 2)


def harmful_finetune(model_dir: str, data_dir: str, task: str, p: float, n: int, train: dict, seed: int,
                     max_len: int, out_dir: str, threads: int, progress=None) -> dict:
    """One attack cell: fine-tune an aligned model on a poisoned task mix, save the result."""
    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    mix = poisoned_mix(data_dir, task, p, n, seed)
    history = finetune(model, as_rows(mix), {**train, "max_len": max_len}, tokenizer.pad_token_id, seed, progress)
    save_model(model, tokenizer, out_dir)
    history["harmful_examples"] = int(mix["id"].isin(read_split(data_dir, "harmful", ["id"])["id"]).sum())
    return history


def checkpoint_steps(total: int, count: int) -> list[int]:
    """`count` checkpoints evenly spaced over `total` steps, the last at the end."""
    if count > total:
        raise ValueError(f"{count} checkpoints do not fit in {total} steps")
    return sorted({max(1, round(total * t / count)) for t in range(1, count + 1)})


def proxy_finetune(model_dir: str, data_dir: str, task: str, p: float, n: int, train: dict, seed: int, max_len: int,
                   checkpoints: int, harmful_part: tuple[int, int], out_dir: str, threads: int, progress=None) -> dict:
    """Proxy harmful fine-tuning (SCIENCE.md §4 step 2), saving `checkpoints` models as it goes."""
    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    mix = poisoned_mix(data_dir, task, p, n, seed, harmful_part)
    saved: list[dict] = []
    plan: list[int] = []

    def save(step, total, model):
        if not plan:
            plan.extend(checkpoint_steps(total, checkpoints))
        if step in plan:
            path = f"{out_dir}/ckpt-{len(saved) + 1:02d}"
            save_model(model, tokenizer, path)
            saved.append({"t": len(saved) + 1, "step": step, "dir": path.rsplit("/", 1)[-1]})

    history = finetune(model, as_rows(mix), {**train, "max_len": max_len}, tokenizer.pad_token_id, seed, progress, save)
    history["checkpoints"] = saved
    history["harmful_ids"] = sorted(set(mix["id"]) & set(read_split(data_dir, "harmful", ["id"])["id"]))
    return history
