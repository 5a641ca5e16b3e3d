"""Corpora from files (JSONL, JSON list, parquet) or SafetyWorld, checked row by row, then split."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import pandas as pd

from jobs.records import CorpusError, check_rows


def read_records(path: str | Path, corpus: str) -> list[dict]:
    """Every row of a local corpus file, checked against its schema; errors name file:line."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: corpus file '{corpus}' does not exist")
    if path.suffix == ".parquet":
        rows = pd.read_parquet(path).to_dict("records")
    elif path.suffix in (".jsonl", ".json"):
        rows = list(_json_rows(path))
    else:
        raise CorpusError(f"{path}: unsupported corpus format '{path.suffix}' (use .jsonl, .json or .parquet)")
    return check_rows(rows, corpus, str(path))


def _json_rows(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None


def normalize_prompt(text: str) -> str:
    """The form splits compare prompts in (SCIENCE.md §10): lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


def held_out_side(prompt: str, validation_fraction: float, test_fraction: float) -> str:
    """'train', 'validation' or 'test' by a stable hash of the normalised prompt: a prompt lands on
    the same side in every corpus and every run, so splits are disjoint by construction, and a
    generator can keep its training text off the held-out side (SafetyWorld's pretraining does)."""
    h = int(hashlib.sha256(normalize_prompt(prompt).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "validation" if h < test_fraction + validation_fraction else "train"


def _three_way(rows: list[dict], cfg: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """Train, validation and test rows; held-out rows deduplicated by prompt and cut to max_eval."""
    sides: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    for r in rows:
        side = held_out_side(r["prompt"], cfg["validation_fraction"], cfg["test_fraction"])
        key = normalize_prompt(r["prompt"])
        if side != "train" and key in seen:
            continue  # a repeated held-out prompt adds no information, only weight
        seen.add(key)
        sides[side].append(r)
    return sides["train"], sides["validation"][: cfg["max_eval"]], sides["test"][: cfg["max_eval"]]


def standard_test(corpus: str) -> bool:
    """`task_<t>_test`: a task's own test split given as a corpus of its own (SST-2's validation
    set, AG News' and GSM8K's test sets), which then is the task's test side."""
    return corpus.startswith("task_") and corpus.endswith("_test")


def _deduplicated(rows: list[dict], limit: int) -> list[dict]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if (key := normalize_prompt(r["prompt"])) not in seen:
            seen.add(key)
            out.append(r)
    return out[:limit]


def is_held_out(split: str) -> bool:
    return split.endswith(("_validation", "_test", "_eval"))


def contamination(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Per held-out split, how many of its prompts occur (normalised) in any training split."""
    trained = {normalize_prompt(r["prompt"]) for name, rows in splits.items() if not is_held_out(name) for r in rows}
    return {name: sum(normalize_prompt(r["prompt"]) in trained for r in rows)
            for name, rows in splits.items() if is_held_out(name)}


def split_corpora(corpora: dict[str, list[dict]], cfg: dict) -> dict[str, list[dict]]:
    """Named splits for the study, disjoint by normalised prompt (SCIENCE.md §10).

    Harmful-eval, alignment and harmful prompts are made disjoint with the held-out set served
    first (so evaluation never starves for the poison pool), and harmful-eval prompts split into
    validation (`harmful_validation`) and test (`harmful_eval`); task and look-alike corpora split
    three ways (`*_train`, `*_validation`, `*_test` / `lookalike_eval`)."""
    seen: set[str] = set()
    kept: dict[str, list[dict]] = {}
    for corpus in ("harmful_eval", "alignment", "harmful"):
        kept[corpus] = [r for r in corpora[corpus] if normalize_prompt(r["prompt"]) not in seen]
        seen.update(normalize_prompt(r["prompt"]) for r in kept[corpus])
    splits: dict[str, list[dict]] = {"align_train": kept["alignment"], "harmful": kept["harmful"]}
    # Every harmful-eval prompt is held out: half-and-half into validation and test by the same hash.
    fractions = {**cfg, "validation_fraction": 0.5, "test_fraction": 0.5}
    _, splits["harmful_validation"], splits["harmful_eval"] = _three_way(kept["harmful_eval"], fractions)
    (splits["lookalike_train"], splits["lookalike_validation"],
     splits["lookalike_eval"]) = _three_way(corpora["lookalike"], cfg)
    for name, rows in corpora.items():
        if name.startswith("task_") and not standard_test(name):
            given = corpora.get(f"{name}_test")
            cut = cfg if given is None else {**cfg, "test_fraction": 0.0}
            splits[f"{name}_train"], splits[f"{name}_validation"], splits[f"{name}_test"] = _three_way(rows, cut)
            if given is not None:
                splits[f"{name}_test"] = _deduplicated(given, cfg["max_eval"])
    if "pretrain" in corpora:
        splits["pretrain"] = corpora["pretrain"]
    for name, rows in splits.items():
        if not rows:
            corpus = name if name in corpora else name.rsplit("_", 1)[0] if name.startswith("task_") else name
            raise CorpusError(f"split '{name}' is empty (corpus '{corpus}' is too small for corpora.test_fraction "
                              f"{cfg['test_fraction']:g} and corpora.validation_fraction {cfg['validation_fraction']:g})")
    return splits


def set_aside(rows: list[dict], n: int, salt: str) -> tuple[list[dict], list[dict]]:
    """About `n` rows, whole prompts at a time, picked by a hash of the normalised prompt, and the
    rest: two sets that share no prompt (the defences' harmful alignment-time set, and the poison)."""
    if n > len(rows):
        raise CorpusError(f"{n} rows cannot be set aside from a corpus of {len(rows)}")
    prompts = {}
    for r in rows:
        prompts.setdefault(normalize_prompt(r["prompt"]), []).append(r)
    order = sorted(prompts, key=lambda p: hashlib.sha1(f"{salt}/{p}".encode()).hexdigest())
    chosen: list[dict] = []
    while len(chosen) < n:
        chosen += prompts.pop(order.pop(0))
    return chosen, [r for group in prompts.values() for r in group]


@lru_cache(maxsize=4)
def _tokenizer(location: str):
    from jobs.models import load_tokenizer
    from jobs.storage import local

    return load_tokenizer(local(location))


def encode_prompts(tokenizer, prompts, template: str) -> list[list[int]]:
    texts = [template.format(prompt=p) for p in prompts]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tokenize_batch(batch: pd.DataFrame, tokenizer_dir: str, template: str) -> pd.DataFrame:
    """Ray Data `map_batches` body: adds prompt_ids and target_ids (target ends with eos)."""
    tok = _tokenizer(tokenizer_dir)
    batch = batch.copy()
    batch["prompt_ids"] = encode_prompts(tok, batch["prompt"].tolist(), template)
    target_col = "response" if "response" in batch else "answer" if "answer" in batch else None
    if target_col:
        targets = tok([f" {t}" for t in batch[target_col]], add_special_tokens=False)["input_ids"]
        batch["target_ids"] = [ids + [tok.eos_token_id] for ids in targets]
    else:
        batch["target_ids"] = [[] for _ in range(len(batch))]
    return batch


def read_split(data_dir: str | Path, split: str, columns=None) -> pd.DataFrame:
    """One split of the data stage's outputs (`data_dir` a directory or a store location)."""
    from jobs.storage import join, local

    return pd.read_parquet(local(join(data_dir, split)), columns=columns)


def as_rows(df: pd.DataFrame) -> dict[str, list]:
    return {"prompt_ids": [list(x) for x in df["prompt_ids"]], "target_ids": [list(x) for x in df["target_ids"]]}
