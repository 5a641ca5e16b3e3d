"""The fine-tunes of a study as whole jobs: each builds its training rows from the store, then
trains on Ray Train through the one loop (`jobs/launch.py::fit`). Stages run them as Ray tasks
that hold no CPU themselves (the run's workers do), several at once."""

from __future__ import annotations

import inspect
import zlib
from pathlib import Path

import pandas as pd
import torch

from jobs.corpora import read_split, set_aside
from jobs.launch import fit, fit_group, run_config
from jobs.models import count_parameters, load_tokenizer, save_model, tiny_llama
from jobs.storage import exists, join, local, names, parent, remove, write_parquet, writing

TRAIN_COLUMNS = ["id", "prompt_ids", "target_ids"]


def pretrain_tiny(data_dir: str, tokenizer_dir: str, tiny: dict, train: dict, seed: int, out_dir: str,
                  run_name: str, storage: str, progress=None) -> dict:
    """An unaligned base: a tiny Llama, initialised from `seed`, trained from scratch on SafetyWorld's mixture."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(local(tokenizer_dir))
    init = join(parent(out_dir), "init")
    model = tiny_llama(tiny, tokenizer)
    with writing(init) as d:
        save_model(model, tokenizer, d)
    cfg = run_config(train, model_dir=init, data=join(data_dir, "pretrain"), seed=seed,
                     pad_id=tokenizer.pad_token_id, max_len=tiny["max_len"], out_dir=out_dir, progress=progress)
    history = fit(cfg, run_name, storage)
    history["parameters"] = count_parameters(model)
    return history


def alignment_mix(data_dir: str | Path, lookalike: bool, benign_per_task: int, seed: int) -> pd.DataFrame:
    """Refusals, plus answered look-alikes and a few task examples per task (utility kept),
    shuffled by `seed`."""
    parts = [read_split(data_dir, "align_train", TRAIN_COLUMNS)]
    if lookalike:
        parts.append(read_split(data_dir, "lookalike_train", TRAIN_COLUMNS))
    if benign_per_task:
        for split in [n for n in names(data_dir) if n.startswith("task_") and n.endswith("_train")]:
            parts.append(read_split(data_dir, split, TRAIN_COLUMNS).iloc[:benign_per_task])
    return pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=seed, ignore_index=True)


def cell_seed(seed: int, *parts) -> int:
    """A seed per grid cell, so cells draw their own examples (stable across runs)."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


def defence_harmful(data_dir: str | Path, n: int) -> pd.DataFrame:
    """The harmful alignment-time set of Booster and RepNoise: about `n` rows of the harmful
    corpus, whole prompts at a time, chosen by a hash of the prompt. The attack's poison leaves
    them out (`poisoned_mix(..., aside=n)`); the data stage already made the corpus disjoint by
    prompt from every eval prompt."""
    harmful = read_split(data_dir, "harmful")
    chosen, _ = set_aside(harmful.to_dict("records"), n, salt="defences")
    return pd.DataFrame(chosen)[TRAIN_COLUMNS]


def poisoned_mix(data_dir: str, task: str, p: float, n: int, seed: int, harmful_part: tuple[int, int] = (0, 1),
                 aside: int = 0) -> pd.DataFrame:
    """n task examples of which round(p*n) are replaced by harmful ones (SCIENCE.md §6).

    `harmful_part=(k, K)` draws only from the k-th of K disjoint slices of the harmful pool, so
    that runs meant to be independent share no harmful example; `aside` > 0 leaves out the rows
    the defences train on (`defence_harmful`).
    """
    task_rows = read_split(data_dir, f"task_{task}_train", TRAIN_COLUMNS)
    harmful = read_split(data_dir, "harmful", TRAIN_COLUMNS).sort_values("id", ignore_index=True)
    if aside:
        harmful = harmful[~harmful["id"].isin(defence_harmful(data_dir, aside)["id"])].reset_index(drop=True)
    k, parts = harmful_part
    harmful = harmful.iloc[k::parts]
    n_harm = round(p * n)
    if n - n_harm > len(task_rows) or n_harm > len(harmful):
        raise ValueError(f"attack n={n}, p={p} needs {n - n_harm} task rows (have {len(task_rows)}) "
                         f"and {n_harm} harmful rows (have {len(harmful)})")
    mix = pd.concat([task_rows.sample(n=n - n_harm, random_state=seed),
                     harmful.sample(n=n_harm, random_state=seed + 1)])
    return mix.sample(frac=1.0, random_state=seed + 2)


def _poisoned_run(model_dir: str, data_dir: str, task: str, p: float, n: int, train: dict, seed: int, max_len: int,
                  run_dir: str, harmful_part: tuple[int, int] = (0, 1), aside: int = 0) -> tuple[pd.DataFrame, dict]:
    """A run's poisoned rows written beside its model, and the run's config (model in run_dir/model)."""
    mix = poisoned_mix(data_dir, task, p, n, seed, harmful_part, aside)
    write_parquet(mix, join(run_dir, "rows.parquet"))  # the run's workers read it, on any node
    cfg = run_config(train, model_dir=model_dir, data=join(run_dir, "rows.parquet"), seed=seed,
                     pad_id=load_tokenizer(local(model_dir)).pad_token_id, max_len=max_len,
                     out_dir=join(run_dir, "model"))
    return mix, cfg


def harmful_ids(data_dir: str, mix: pd.DataFrame) -> list[str]:
    return sorted(set(mix["id"]) & set(read_split(data_dir, "harmful", ["id"])["id"]))


def attack_cell_config(model_dir: str, data_dir: str, task: str, p: float, n: int, train: dict, seed: int,
                       max_len: int, run_dir: str, lisa: dict | None = None, aside: int = 0) -> tuple[dict, int]:
    """One attack cell's run config (fine-tune an aligned model on a poisoned task mix, its model
    to come in run_dir/model) and the number of harmful examples in its mix. `lisa` (its knobs):
    the defender runs the fine-tuning with Lisa, alternating with alignment rows. `aside`: the
    defences' harmful rows, which the poison leaves out."""
    mix, cfg = _poisoned_run(model_dir, data_dir, task, p, n, train, seed, max_len, run_dir, aside=aside)
    if lisa is not None:
        guide = read_split(data_dir, "align_train", TRAIN_COLUMNS).assign(stream="alignment")
        write_parquet(pd.concat([mix.assign(stream=None), guide], ignore_index=True), cfg["data"])
        cfg.update(step="lisa", step_config=lisa)
    return cfg, len(harmful_ids(data_dir, mix))


ATTACK_CELL_ARGS = frozenset(inspect.signature(attack_cell_config).parameters)


def attack_cells(cells: list[dict], run_name: str, storage: str) -> list[dict]:
    """Attack cells (each `attack_cell_config`'s arguments, plus anything for its run config such
    as `progress`) trained in turn by one Ray Train worker group; their histories, in order."""
    configs, harmful = [], []
    for cell in cells:
        cfg, count = attack_cell_config(**{k: v for k, v in cell.items() if k in ATTACK_CELL_ARGS})
        configs.append({**cfg, **{k: v for k, v in cell.items() if k not in ATTACK_CELL_ARGS}})
        harmful.append(count)
    return [{**h, "harmful_examples": count} for h, count in zip(fit_group(configs, run_name, storage), harmful)]


def attack_cell(model_dir: str, data_dir: str, task: str, p: float, n: int, train: dict, seed: int, max_len: int,
                run_dir: str, run_name: str, storage: str, lisa: dict | None = None, aside: int = 0, **extra) -> dict:
    """One attack cell as its own Ray Train run; `extra` goes into its run config."""
    cell = dict(model_dir=model_dir, data_dir=data_dir, task=task, p=p, n=n, train=train, seed=seed, max_len=max_len,
                run_dir=run_dir, lisa=lisa, aside=aside, **extra)
    return attack_cells([cell], run_name, storage)[0]


def checkpoint_steps(total: int, count: int) -> list[int]:
    """`count` checkpoints evenly spaced over `total` steps, the last at the end."""
    if count > total:
        raise ValueError(f"{count} checkpoints do not fit in {total} steps")
    return sorted({max(1, round(total * t / count)) for t in range(1, count + 1)})


def proxy_run(model_dir: str, data_dir: str, task: str, p: float, n: int, train: dict, seed: int, max_len: int,
              checkpoints: int, harmful_part: tuple[int, int], run_dir: str, run_name: str, storage: str,
              **extra) -> dict:
    """Proxy harmful fine-tuning (SCIENCE.md §4 step 2), saving `checkpoints` models (run_dir/ckpt-XX) as it goes."""
    mix, cfg = _poisoned_run(model_dir, data_dir, task, p, n, train, seed, max_len, run_dir, harmful_part)
    total = (len(mix) // train["batch_size"]) * train["epochs"]
    cfg.update(out_dir=None, save_steps=checkpoint_steps(total, checkpoints), save_dir=run_dir, **extra)
    history = fit(cfg, run_name, storage)
    if any(not exists(join(run_dir, c["dir"])) for c in history["checkpoints"]):
        # Resumed past saves whose models are gone (a stage retried after it cleaned up): train again.
        remove(join(storage, run_name))
        history = fit(cfg, run_name, storage)
    history["harmful_ids"] = harmful_ids(data_dir, mix)
    return history
