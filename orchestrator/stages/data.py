"""The data stage: corpora generated or read and checked, split disjoint by normalised prompt,
contamination counted, a tokenizer trained, every split tokenized on Ray Data into parquet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.spec import StudySpec, spec_dict
from orchestrator.stage import StageContext, StageResult

NAME = "data"
VERSION = 1  # bump when the algorithm changes, so cached outputs are redone
NEEDS: tuple[str, ...] = ()


@dataclass(kw_only=True)
class Result(StageResult):
    splits: dict[str, int] = field(default_factory=dict)  # rows per split
    contamination: dict[str, int] = field(default_factory=dict)  # held-out prompts found in training corpora
    tokenizer: str = "tokenizer"


def config(spec: StudySpec) -> dict:
    from jobs.safetyworld import WORLD_VERSION

    d = spec_dict(spec)
    world = {"world_version": WORLD_VERSION} if spec.corpora.source == "safetyworld" else {}
    return {"corpora": d["corpora"], "seed": spec.seed, "model_source": spec.model.source,
            "vocab_size": spec.model.tiny.vocab_size, "template": spec.model.prompt_template, **world}


def load_corpora(spec: StudySpec) -> dict[str, list[dict]]:
    from jobs.records import check_rows
    from jobs.safetyworld import generate_corpora

    if spec.corpora.source == "safetyworld":
        corpora = generate_corpora(spec.seed, spec.corpora.safetyworld.model_dump(),
                                   fractions=(spec.corpora.validation_fraction, spec.corpora.test_fraction))
        return {name: check_rows(rows, name, f"safetyworld:{name}") for name, rows in corpora.items()}
    return {name: read_corpus_file(spec, name) for name in spec.corpora.files}


def read_corpus_file(spec: StudySpec, name: str) -> list[dict]:
    """One corpus from its file or hub id, in our record schema or a real source's format."""
    from jobs.corpora import read_records
    from jobs.loaders import load_corpus

    c = spec.corpora
    fmt = c.formats.get(name, "records")
    rows = (read_records(c.files[name], name) if fmt == "records"
            else load_corpus(c.files[name], name, fmt, c.splits.get(name)))
    return rows[: c.limits[name]] if name in c.limits else rows


def resources(spec: StudySpec) -> str:
    return "Ray Data tasks (CPU)"


def shown(result: Result, location: str) -> dict:
    """Held-out prompts found in training corpora, per held-out split (0 is the pass)."""
    return {"contamination": result.contamination}


def run(ctx: StageContext) -> Result:
    import ray

    from jobs.corpora import contamination, is_held_out, split_corpora, tokenize_batch
    from jobs.models import load_tokenizer, train_tokenizer
    from jobs.storage import publish, remove
    from jobs.records import InputError

    spec = ctx.spec
    ctx.progress("reading and checking corpora")
    splits = split_corpora(load_corpora(spec), spec.corpora.model_dump())
    leaked = contamination(splits)
    if any(leaked.values()):
        counts = ", ".join(f"{name} {n}/{len(splits[name])}" for name, n in leaked.items() if n)
        if spec.corpora.contamination == "error":
            raise InputError(f"corpora: held-out prompts occur in training corpora ({counts}); clean the corpora, "
                             "or set corpora.contamination: warn to report the counts and go on")
        ctx.progress(f"warning: held-out prompts occur in training corpora ({counts})")
    tok_dir = ctx.out / "tokenizer"
    if spec.model.source == "tiny":
        ctx.progress("training the BPE tokenizer")
        texts = (f"{r['prompt']} {r.get('response') or r.get('answer') or ''}" for rows in splits.values() for r in rows)
        train_tokenizer(texts, spec.model.tiny.vocab_size, tok_dir)
    else:
        load_tokenizer(spec.model.source).save_pretrained(str(tok_dir))
    publish(tok_dir, ctx.output("tokenizer"))  # the tokenizing tasks read it, on any node
    counts = {}
    for i, (name, rows) in enumerate(splits.items()):
        ctx.progress(f"tokenizing {name} on Ray Data ({i + 1}/{len(splits)})")
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(8, len(rows) // 2000)))
        ds = ds.map_batches(tokenize_batch, batch_format="pandas", batch_size=1024,
                            fn_kwargs={"tokenizer_dir": ctx.output("tokenizer"), "template": spec.model.prompt_template})
        remove(ctx.output(name))  # Ray Data appends: a killed attempt's files would be rows twice
        ds.write_parquet(ctx.output(name))  # by Ray Data's tasks, on any node: straight to the store
        counts[name] = len(rows)
        context = "eval" if is_held_out(name) else "train"
        ctx.tracker.log_dataset(ctx.run_id, rows, name, ctx.final_location(name), context)
    ctx.tracker.log_metrics(ctx.run_id, {f"rows/{k}": v for k, v in counts.items()})
    ctx.tracker.log_metrics(ctx.run_id, {f"contamination/{k}": v for k, v in leaked.items()})
    return Result(splits=counts, contamination=leaked)
