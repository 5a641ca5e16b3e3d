import json

import pandas as pd
import pytest

from jobs.corpora import read_records, split_corpora
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


def test_splits_are_disjoint_and_stable():
    c = generate_corpora(0, dict(alignment=200, harmful=200, harmful_eval=80, lookalike=80, task_train=60,
                                 task_test=20, pretrain=100))
    c["harmful_eval"].append({**c["alignment"][0], "id": "dup"})  # an eval prompt leaking from alignment
    s = split_corpora(c, {"test_fraction": 0.3, "max_eval": 1000})
    prompts = [{r["prompt"] for r in s[k]} for k in ("align_train", "harmful", "harmful_eval")]
    assert not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2]) and "dup" not in {r["id"] for r in s["harmful_eval"]}
    train = {r["id"] for r in s["task_sentiment_train"]}
    test = {r["id"] for r in s["task_sentiment_test"]}
    assert not (train & test) and 0.15 < len(test) / (len(train) + len(test)) < 0.45
    assert split_corpora(c, {"test_fraction": 0.3, "max_eval": 1000}) == s


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
    assert not list((tmp_path / "studies" / "s" / "stages" / "base").iterdir())
    with pytest.raises(RuntimeError, match="no result.json"):
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
