"""Real corpora mapped to the record schemas of SCIENCE.md §2.

Each source is read with `datasets`: a hub id (where a network exists), a folder written by
`Dataset.save_to_disk`, or a local JSONL / JSON / parquet file. The mappers below turn rows in
the source's own format into our records; every record then goes through `check_rows`, so a
malformed row fails with the file and row number.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable

from jobs.records import HARM_CATEGORIES, CorpusError, check_rows

# BeaverTails joins some words of a category with commas; ours use underscores throughout.
BEAVERTAILS_CATEGORIES = {
    "controversial_topics,politics": "controversial_topics_politics",
    "discrimination,stereotype,injustice": "discrimination_stereotype_injustice",
    "drug_abuse,weapons,banned_substance": "drug_abuse_weapons_banned_substance",
    "financial_crime,property_crime,theft": "financial_crime_property_crime_theft",
    "hate_speech,offensive_language": "hate_speech_offensive_language",
    "misinformation_regarding_ethics,laws_and_safety": "misinformation_regarding_ethics_laws_and_safety",
    "non_violent_unethical_behavior": "non_violent_unethical_behavior",
    "privacy_violation": "privacy_violation", "self_harm": "self_harm", "animal_abuse": "animal_abuse",
    "child_abuse": "child_abuse", "sexually_explicit,adult_content": "sexually_explicit_adult_content",
    "terrorism,organized_crime": "terrorism_organized_crime",
    "violence,aiding_and_abetting,incitement": "violence_aiding_and_abetting_incitement",
}
BEAVERTAILS_CATEGORIES = dict(sorted(BEAVERTAILS_CATEGORIES.items()))  # the dataset's own (alphabetical) order
assert list(BEAVERTAILS_CATEGORIES.values()) == list(HARM_CATEGORIES)
AG_NEWS_LABELS = ("world", "sports", "business", "sci/tech")


def read_source(source: str, split: str | None = None) -> tuple[list[dict], str]:
    """Rows of a dataset and a name for error messages; `split` picks one split of a hub id
    or a saved `DatasetDict`."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise CorpusError(f"{source}: no split '{split}' (has {sorted(ds)})")
                ds = ds[split]
        elif path.suffix in (".jsonl", ".json", ".parquet"):
            if not path.is_file():
                raise CorpusError(f"{source}: corpus file does not exist")
            builder = "parquet" if path.suffix == ".parquet" else "json"
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.exists() or source.startswith(("/", ".")):
            raise CorpusError(f"{source}: not a dataset folder or a .jsonl/.json/.parquet file")
        else:  # a hub id
            name, _, config = source.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
    except CorpusError:
        raise
    except Exception as e:  # a malformed file: datasets names the cause, we name the file
        raise CorpusError(f"{source}: cannot be read as a dataset ({str(e).splitlines()[0][:200]})") from None
    return [dict(r) for r in ds], f"{source}" + (f"[{split}]" if split else "")


def _need(row: dict, fields: Iterable[str], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise CorpusError(f"{where}: missing field(s) {missing} (columns: {sorted(row)})")


def beavertails_category(flags: dict, where: str) -> str | None:
    """The flagged category (the first in BeaverTails' order when several are set)."""
    for key, value in flags.items():
        if value:
            if key not in BEAVERTAILS_CATEGORIES:
                raise CorpusError(f"{where}: unknown BeaverTails category '{key}'")
            return BEAVERTAILS_CATEGORIES[key]
    return None


def beavertails(rows: list[dict], source: str) -> dict[str, list[dict]]:
    """Safe rows → alignment, unsafe rows → harmful (both with the prompt's category).

    A safe row carries no category flags; it takes the category that the same prompt's unsafe
    responses are flagged with most often, and is dropped when the prompt has none (counted in
    `dropped`)."""
    prompt_category: dict[str, Counter] = defaultdict(Counter)
    for i, r in enumerate(rows, start=1):
        where = f"{source}:{i}"
        _need(r, ("prompt", "response", "category", "is_safe"), where)
        if not r["is_safe"]:
            cat = beavertails_category(r["category"], where)
            if cat:
                prompt_category[r["prompt"]][cat] += 1
    out: dict[str, list[dict]] = {"alignment": [], "harmful": [], "dropped": []}
    for i, r in enumerate(rows, start=1):
        cat = beavertails_category(r["category"], f"{source}:{i}") or (
            prompt_category[r["prompt"]].most_common(1)[0][0] if prompt_category[r["prompt"]] else None)
        record = {"id": f"bt-{i}", "prompt": r["prompt"], "response": r["response"], "category": cat}
        out["dropped" if cat is None else "alignment" if r["is_safe"] else "harmful"].append(record)
    return out


def beavertails_eval(rows: list[dict], source: str) -> list[dict]:
    """Harmful eval prompts: the unsafe rows' prompts, each prompt once."""
    seen, out = set(), []
    for i, r in enumerate(rows, start=1):
        _need(r, ("prompt", "category", "is_safe"), f"{source}:{i}")
        cat = beavertails_category(r["category"], f"{source}:{i}")
        if not r["is_safe"] and cat and r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append({"id": f"bte-{i}", "prompt": r["prompt"], "category": cat})
    return out


def sst2(rows: list[dict], source: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows, start=1):
        _need(r, ("sentence", "label"), f"{source}:{i}")
        if r["label"] not in (0, 1):
            raise CorpusError(f"{source}:{i}: SST-2 label must be 0 or 1 (got {r['label']!r})")
        out.append({"id": f"sst2-{r.get('idx', i)}", "prompt": f"Classify the sentiment: {r['sentence'].strip()}",
                    "answer": ("negative", "positive")[r["label"]]})
    return out


def ag_news(rows: list[dict], source: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows, start=1):
        _need(r, ("text", "label"), f"{source}:{i}")
        if r["label"] not in range(4):
            raise CorpusError(f"{source}:{i}: AG News label must be 0-3 (got {r['label']!r})")
        out.append({"id": f"agnews-{i}", "prompt": f"Classify the topic: {r['text'].strip()}",
                    "answer": AG_NEWS_LABELS[r["label"]]})
    return out


def gsm8k(rows: list[dict], source: str) -> list[dict]:
    """The gold answer is the number after '####' in the worked solution."""
    out = []
    for i, r in enumerate(rows, start=1):
        _need(r, ("question", "answer"), f"{source}:{i}")
        if "####" not in r["answer"]:
            raise CorpusError(f"{source}:{i}: GSM8K answer has no '#### <number>' line")
        gold = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        out.append({"id": f"gsm8k-{i}", "prompt": r["question"].strip(), "answer": gold})
    return out


def alpaca(rows: list[dict], source: str) -> list[dict]:
    """Alpaca and AlpacaEval: instruction, optional input, output."""
    out = []
    for i, r in enumerate(rows, start=1):
        _need(r, ("instruction", "output"), f"{source}:{i}")
        prompt = r["instruction"].strip() + (f"\n\n{r['input'].strip()}" if (r.get("input") or "").strip() else "")
        out.append({"id": f"alpaca-{i}", "prompt": prompt, "answer": r["output"]})
    return out


TASK_FORMATS: dict[str, Callable[[list[dict], str], list[dict]]] = {
    "sst2": sst2, "ag_news": ag_news, "gsm8k": gsm8k, "alpaca": alpaca}


def disjoint_safety_sets(alignment: list[dict], harmful: list[dict], harmful_eval: list[dict],
                         sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Alignment, harmful and harmful-eval sets with no prompt in two of them, cut to `sizes`
    (SCIENCE.md §6: e.g. 2,000 alignment, 1,000 eval). Eval prompts are kept first, then
    alignment, so neither loses prompts to the poison pool."""
    taken: set[str] = set()
    out = {}
    for name, rows in (("harmful_eval", harmful_eval), ("alignment", alignment), ("harmful", harmful)):
        kept = [r for r in rows if r["prompt"] not in taken][: sizes.get(name, len(rows))]
        taken |= {r["prompt"] for r in kept}
        out[name] = kept
    return out


def load_corpus(source: str, corpus: str, fmt: str, split: str | None = None) -> list[dict]:
    """One corpus of the study from a real source: `fmt` is beavertails (alignment, harmful),
    beavertails-eval, sst2, ag_news, gsm8k or alpaca."""
    rows, name = read_source(source, split)
    if fmt == "beavertails":
        if corpus not in ("alignment", "harmful"):
            raise CorpusError(f"{name}: the beavertails format feeds alignment or harmful, not {corpus}")
        records = beavertails(rows, name)[corpus]
    elif fmt == "beavertails-eval":
        records = beavertails_eval(rows, name)
    elif fmt in TASK_FORMATS:
        records = TASK_FORMATS[fmt](rows, name)
    else:
        raise CorpusError(f"{name}: unknown format '{fmt}'")
    return check_rows(records, corpus, name)
