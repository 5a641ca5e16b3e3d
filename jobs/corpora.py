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


def is_test(record_id: str, fraction: float) -> bool:
    """A stable split by id hash: the same record lands on the same side in every run."""
    h = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def _train_test(rows: list[dict], cfg: dict) -> tuple[list[dict], list[dict]]:
    """Train rows and (at most max_eval) test rows, by the stable id hash."""
    train, test = [], []
    for r in rows:
        (test if is_test(r["id"], cfg["test_fraction"]) else train).append(r)
    return train, test[: cfg["max_eval"]]


def split_corpora(corpora: dict[str, list[dict]], cfg: dict) -> dict[str, list[dict]]:
    """Named splits for the study. Alignment, harmful and harmful-eval prompts are made disjoint
    (a prompt keeps its first place in that order), task and look-alike sets get train/test halves."""
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for corpus, split in (("alignment", "align_train"), ("harmful", "harmful"), ("harmful_eval", "harmful_eval")):
        kept = [r for r in corpora[corpus] if r["prompt"] not in seen]
        seen.update(r["prompt"] for r in kept)
        splits[split] = kept
    splits["harmful_eval"] = splits["harmful_eval"][: cfg["max_eval"]]
    splits["lookalike_train"], splits["lookalike_eval"] = _train_test(corpora["lookalike"], cfg)
    for name, rows in corpora.items():
        if name.startswith("task_"):
            splits[f"{name}_train"], splits[f"{name}_test"] = _train_test(rows, cfg)
    if "pretrain" in corpora:
        splits["pretrain"] = corpora["pretrain"]
    for name, rows in splits.items():
        if not rows:
            raise CorpusError(f"split '{name}' is empty after splitting (corpus too small?)")
    return splits


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from jobs.models import load_tokenizer

    return load_tokenizer(path)


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
    return pd.read_parquet(Path(data_dir) / split, columns=columns)


def as_rows(df: pd.DataFrame) -> dict[str, list]:
    return {"prompt_ids": [list(x) for x in df["prompt_ids"]], "target_ids": [list(x) for x in df["target_ids"]]}
