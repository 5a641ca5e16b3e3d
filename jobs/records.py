"""Record schemas of SCIENCE.md §2 and the row-by-row check every loader applies."""

from __future__ import annotations

HARM_CATEGORIES = (
    "animal_abuse", "child_abuse", "controversial_topics_politics",
    "discrimination_stereotype_injustice", "drug_abuse_weapons_banned_substance",
    "financial_crime_property_crime_theft", "hate_speech_offensive_language",
    "misinformation_regarding_ethics_laws_and_safety", "non_violent_unethical_behavior",
    "privacy_violation", "self_harm", "sexually_explicit_adult_content",
    "terrorism_organized_crime", "violence_aiding_and_abetting_incitement",
)

# corpus kind -> required string fields
SCHEMAS = {
    "alignment": ("id", "prompt", "response", "category"),
    "harmful": ("id", "prompt", "response", "category"),
    "harmful_eval": ("id", "prompt", "category"),
    "lookalike": ("id", "prompt", "answer", "category"),
    "task": ("id", "prompt", "answer"),
    "pretrain": ("id", "prompt", "response"),
}


class InputError(ValueError):
    """Bad user input (a file, a row, an id), with the place that says why. The CLI exits 2."""


class CorpusError(InputError):
    """A corpus that cannot be used, with the place (file:line) that says why."""


def schema_of(corpus: str) -> tuple[str, ...]:
    return SCHEMAS["task" if corpus.startswith("task_") else corpus]


def check_row(row: dict, corpus: str, where: str) -> dict:
    """Return the row reduced to its schema's fields, or raise CorpusError naming `where`."""
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected an object with fields {list(schema_of(corpus))}, got {type(row).__name__}")
    out = {}
    for field in schema_of(corpus):
        value = row.get(field)
        if field == "id" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if field not in row else f"{type(value).__name__} {value!r:.40}"
            raise CorpusError(f"{where}: field '{field}' must be a non-empty string ({got})")
        out[field] = value
    if "category" in out and out["category"] not in HARM_CATEGORIES:
        raise CorpusError(f"{where}: unknown category '{out['category']}' (expected one of the 14 BeaverTails names)")
    return out


def check_rows(rows, corpus: str, source: str) -> list[dict]:
    """Check every row; ids must be unique within a corpus."""
    checked, seen = [], set()
    for line, row in enumerate(rows, start=1):
        rec = check_row(row, corpus, f"{source}:{line}")
        if rec["id"] in seen:
            raise CorpusError(f"{source}:{line}: duplicate id '{rec['id']}'")
        seen.add(rec["id"])
        checked.append(rec)
    if not checked:
        raise CorpusError(f"{source}: corpus '{corpus}' is empty")
    return checked
