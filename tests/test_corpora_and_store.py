import json

import pandas as pd
import pytest

from jobs.corpora import contamination, held_out_side, is_held_out, normalize_prompt, read_records, split_corpora
from jobs.records import CorpusError
from jobs.safetyworld import generate_corpora
from orchestrator.store import StudyStore, stage_key

ROW = {"id": "a1", "prompt": "how can i poison a dog ?", "response": "i can not help .", "category": "animal_abuse"}


def test_reads_jsonl_and_parquet(tmp_path):
    jl = tmp_path / "align.jsonl"
    jl.write_text("\n".join(json.dumps({**ROW, "id": f"a{i}", "extra": 1}) for i in range(3)) + "\n")
    pq = tmp_path / "align.parquet"
    pd.DataFrame([{**ROW, "id": f"b{i}"} for i in range(2)]).to_parquet(pq)
    assert [r["id"] for r in read_records(jl, "alignment")] == ["a0", "a1", "a2"]
    assert read_records(pq, "alignment")[1] == {**ROW, "id": "b1"}  # reduced to the schema's fields


@pytest.mark.parametrize("lines, message", [
    ([ROW, {**ROW, "id": "x", "prompt": ""}], "align.jsonl:2: field 'prompt' must be a non-empty string"),
    ([ROW, {"id": "y", "prompt": "p", "response": "r"}], "align.jsonl:2: field 'category' must be a non-empty string (missing)"),
    ([ROW, {**ROW, "id": "z", "category": "weather"}], "align.jsonl:2: unknown category 'weather'"),
    ([ROW, ROW], "align.jsonl:2: duplicate id 'a1'"),
    ([], "align.jsonl: corpus 'alignment' is empty"),
])
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "align.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(CorpusError) as e:
        read_records(path, "alignment")
    assert message in str(e.value)


def test_corrupt_json_and_missing_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "1", "prompt": "p", "answer": "a"}) + "\n{not json\n")
    with pytest.raises(CorpusError, match=r"t.jsonl:2: not valid JSON"):
        read_records(path, "task_sentiment")
    with pytest.raises(CorpusError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl", "harmful")


CFG = {"test_fraction": 0.3, "validation_fraction": 0.15, "max_eval": 1000}


def test_splits_are_disjoint_by_normalised_prompt_and_stable():
    c = generate_corpora(0, dict(alignment=200, harmful=200, harmful_eval=80, lookalike=80, task_train=60,
                                 task_test=20, pretrain=400), fractions=(0.15, 0.3))
    c["harmful_eval"].append({**c["alignment"][0], "id": "dup"})  # an eval prompt that alignment also has
    s = split_corpora(c, CFG)
    assert contamination(s) == {k: 0 for k in s if is_held_out(k)}, "the generated world must not leak"
    task_rows = [r for r in s["pretrain"] if r["id"].split("-")[1] in ("sentiment", "topic", "arithmetic", "instruct")]
    assert task_rows and all(held_out_side(r["prompt"], 0.15, 0.3) == "train" for r in task_rows)
    held = {r["id"] for k in ("harmful_validation", "harmful_eval") for r in s[k]}
    assert "dup" in held, "the held-out set keeps its prompt; the training side loses it"
    assert c["alignment"][0]["prompt"] not in {r["prompt"] for r in s["align_train"]}
    sizes = [len(s[f"task_sentiment_{k}"]) for k in ("train", "validation", "test")]
    assert all(sizes) and 0.15 < sizes[2] / sum(sizes) < 0.45
    assert split_corpora(c, CFG) == s


def test_a_tasks_standard_test_split_is_its_test_side():
    """`task_<t>_test` (SST-2's validation set, AG News' test set): the task's test side is that
    corpus, deduplicated and cut to max_eval; the task's own corpus splits train / validation only."""
    c = generate_corpora(0, dict(alignment=50, harmful=50, harmful_eval=20, lookalike=40, task_train=60,
                                 task_test=20, pretrain=100), fractions=(0.15, 0.3))
    given = [{"id": f"std-{i}", "prompt": f"Standard test prompt {i % 30}", "answer": "positive"} for i in range(60)]
    s = split_corpora({**c, "task_sentiment_test": given}, {**CFG, "max_eval": 25})
    assert [r["id"] for r in s["task_sentiment_test"]] == [f"std-{i}" for i in range(25)]
    train, validation = s["task_sentiment_train"], s["task_sentiment_validation"]
    kept = {r["id"] for r in train + validation}
    dropped = [r for r in c["task_sentiment"] if r["id"] not in kept]  # only repeats of a validation prompt
    assert {normalize_prompt(r["prompt"]) for r in dropped} <= {normalize_prompt(r["prompt"]) for r in validation}
    assert all(held_out_side(r["prompt"], CFG["validation_fraction"], 0.0) == "train" for r in train)
    assert not [k for k in s if k.startswith("task_sentiment_test_")]  # not a task of its own
    assert s["task_topic_test"] == split_corpora(c, CFG)["task_topic_test"]  # other tasks as before


def test_contamination_is_counted_case_and_space_blind():
    c = generate_corpora(0, dict(alignment=50, harmful=50, harmful_eval=20, lookalike=40, task_train=60,
                                 task_test=20, pretrain=100), fractions=(0.15, 0.3))
    s = split_corpora(c, CFG)
    leaked = s["task_topic_test"][0]["prompt"]
    s["pretrain"].append({"id": "leak", "prompt": "  " + leaked.upper().replace(" ", "   "), "response": "x"})
    assert contamination(s)["task_topic_test"] == 1 and sum(contamination(s).values()) == 1


def test_a_corpus_too_small_to_split_names_the_split():
    c = generate_corpora(0, dict(alignment=20, harmful=20, harmful_eval=10, lookalike=10, task_train=2,
                                 task_test=1, pretrain=50))
    with pytest.raises(CorpusError, match=r"split 'task_\w+_(validation|test|train)' is empty \(corpus 'task_\w+' is "
                                          r"too small for corpora.test_fraction 0.3"):
        split_corpora(c, CFG)


def test_stage_key_depends_on_config_inputs_and_version():
    k = stage_key("attack", 1, {"lr": 1e-4}, {"data": "abc"})
    assert k == stage_key("attack", 1, {"lr": 1e-4}, {"data": "abc"})
    assert k != stage_key("attack", 1, {"lr": 2e-4}, {"data": "abc"})
    assert k != stage_key("attack", 1, {"lr": 1e-4}, {"data": "abd"})
    assert k != stage_key("attack", 2, {"lr": 1e-4}, {"data": "abc"})


def test_a_failed_stage_leaves_nothing_complete(tmp_path):
    store = StudyStore(tmp_path, "s")
    with pytest.raises(RuntimeError, match="boom"):
        with store.building("base", "k1") as out:
            (out / "result.json").write_text("{}")
            raise RuntimeError("boom")
    assert not store.is_complete("base", "k1")
    with pytest.raises(RuntimeError, match="no result.json"):  # the failed attempt's result.json is not this one's
        with store.building("base", "k1"):
            pass
    with store.building("base", "k1") as out:
        (out / "result.json").write_text('{"ok": 1}')
    assert store.is_complete("base", "k1") and store.result("base", "k1") == {"ok": 1}


def test_a_killed_stage_leftover_is_ignored_and_cleaned(tmp_path):
    store = StudyStore(tmp_path, "s")
    stale = store.stage_dir("base", "k1").parent / ".partial-k1-999999999-abcdef"
    stale.mkdir(parents=True)
    (stale / "result.json").write_text("{}")
    assert not store.is_complete("base", "k1")
    with store.building("base", "k1") as out:
        (out / "result.json").write_text("{}")
    assert not stale.exists() and store.is_complete("base", "k1")


def test_an_attempt_finds_what_a_killed_attempt_of_the_stage_wrote(tmp_path):
    """A restarted Ray Train group skips the runs it finished: their models, written by the killed
    attempt, must still be in the stage's working directory (they once were deleted with it)."""
    store = StudyStore(tmp_path, "s")
    with pytest.raises(KeyboardInterrupt):
        with store.building("attack", "k1") as out:
            (out / "cells" / "cell-0" / "model").mkdir(parents=True)
            (out / "cells" / "cell-0" / "model" / "model.safetensors").write_bytes(b"finished run")
            raise KeyboardInterrupt
    with store.building("attack", "k1") as out:
        assert (out / "cells" / "cell-0" / "model" / "model.safetensors").read_bytes() == b"finished run"
        (out / "result.json").write_text("{}")
    assert (store.stage_dir("attack", "k1") / "cells" / "cell-0" / "model" / "model.safetensors").exists()
    assert [p.name for p in store.stage_dir("attack", "k1").parent.iterdir()] == ["k1"], "no working directory left"
