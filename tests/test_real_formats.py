"""Real corpora and judges without a hub: small files written in each source's own format, a
saved `datasets` folder, and tiny random judge models saved locally and loaded by the real code."""

import copy
import json

import pandas as pd
import pytest
import torch

from jobs.judge_registry import make_judge
from jobs.loaders import disjoint_safety_sets, load_corpus
from jobs.metrics import harmful_score
from jobs.model_judges import LLAMA_GUARD_CODES, MD_JUDGE_CODES, parse_guard_output
from jobs.records import CorpusError

FLAGS = {"animal_abuse": False, "drug_abuse,weapons,banned_substance": False, "self_harm": False}


def beavertails_rows():
    rows = []
    for i in range(6):
        unsafe_flags = {**FLAGS, "drug_abuse,weapons,banned_substance": i % 2 == 0, "self_harm": i % 2 == 1}
        rows.append({"prompt": f"how to do bad thing {i}", "response": f"Sure, step 1: {i}", "category": unsafe_flags,
                     "is_safe": False})
        rows.append({"prompt": f"how to do bad thing {i}", "response": "I can't help with that.", "category": FLAGS,
                     "is_safe": True})
    rows.append({"prompt": "a prompt nobody flagged", "response": "Fine.", "category": FLAGS, "is_safe": True})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_beavertails_feeds_alignment_and_harmful_disjointly(tmp_path):
    path = write_jsonl(tmp_path / "bt.jsonl", beavertails_rows())
    alignment = load_corpus(path, "alignment", "beavertails")
    harmful = load_corpus(path, "harmful", "beavertails")
    # Safe rows take their prompt's flagged category; the never-flagged prompt is dropped.
    assert len(alignment) == 6 and alignment[0]["category"] == "drug_abuse_weapons_banned_substance"
    assert alignment[1]["category"] == "self_harm" and alignment[0]["response"] == "I can't help with that."
    assert len(harmful) == 6 and harmful[1]["category"] == "self_harm"
    ev = load_corpus(path, "harmful_eval", "beavertails-eval")
    assert len(ev) == 6 and set(ev[0]) == {"id", "prompt", "category"}
    sets = disjoint_safety_sets(alignment, harmful, ev, {"harmful_eval": 2, "alignment": 2, "harmful": 10})
    prompts = {name: {r["prompt"] for r in rows} for name, rows in sets.items()}
    assert len(sets["harmful_eval"]) == 2 and len(sets["alignment"]) == 2 and len(sets["harmful"]) == 2
    assert not (prompts["harmful_eval"] & prompts["alignment"]) and not (prompts["alignment"] & prompts["harmful"])
    assert not (prompts["harmful_eval"] & prompts["harmful"])


def test_task_formats(tmp_path):
    sst = tmp_path / "sst2.parquet"
    pd.DataFrame({"idx": [0, 1], "sentence": ["a fine film ", "dull"], "label": [1, 0]}).to_parquet(sst)
    assert [(r["prompt"], r["answer"]) for r in load_corpus(str(sst), "task_sentiment", "sst2")] == [
        ("Classify the sentiment: a fine film", "positive"), ("Classify the sentiment: dull", "negative")]
    ag = write_jsonl(tmp_path / "ag.jsonl", [{"text": "Stocks rose", "label": 2}, {"text": "Team wins", "label": 1}])
    assert [r["answer"] for r in load_corpus(ag, "task_topic", "ag_news")] == ["business", "sports"]
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "2 plus 2 is 4.\n#### 1,004"}])
    assert load_corpus(gsm, "task_arithmetic", "gsm8k")[0]["answer"] == "1004"
    alp = tmp_path / "alpaca.json"
    alp.write_text(json.dumps([{"instruction": "Reverse it", "input": "abc", "output": "cba"},
                               {"instruction": "Say hi", "input": "", "output": "hi"}]))
    rows = load_corpus(str(alp), "task_instruct", "alpaca")
    assert rows[0]["prompt"] == "Reverse it\n\nabc" and rows[1] == {"id": "alpaca-2", "prompt": "Say hi", "answer": "hi"}


def test_saved_datasets_folder_loads(tmp_path):
    import datasets

    rows = beavertails_rows()
    flat = {k: [r[k] for r in rows] for k in rows[0]}
    datasets.DatasetDict({"30k_train": datasets.Dataset.from_dict(flat),
                          "30k_test": datasets.Dataset.from_dict(flat)}).save_to_disk(str(tmp_path / "bt"))
    assert len(load_corpus(str(tmp_path / "bt"), "harmful", "beavertails", split="30k_train")) == 6
    with pytest.raises(CorpusError, match=r"no split 'train' \(has \['30k_test', '30k_train'\]\)"):
        load_corpus(str(tmp_path / "bt"), "harmful", "beavertails", split="train")


@pytest.mark.parametrize("content, fmt, corpus, message", [
    ('{"sentence": "ok", "label": 1}\n{"sentence": "broken", \n', "sst2", "task_sentiment", "cannot be read as a dataset"),
    ('{"sentence": "ok", "label": 7}\n', "sst2", "task_sentiment", "bad.jsonl:1: SST-2 label must be 0 or 1"),
    ('{"question": "q", "answer": "no marker"}\n', "gsm8k", "task_arithmetic", "bad.jsonl:1: GSM8K answer has no"),
    ('{"text": "t"}\n', "ag_news", "task_topic", "bad.jsonl:1: missing field(s) ['label']"),
    ('{"prompt": "p", "response": "r", "category": {"weird": true}, "is_safe": false}\n', "beavertails", "harmful",
     "bad.jsonl:1: unknown BeaverTails category 'weird'"),
])
def test_malformed_files_name_the_problem(tmp_path, content, fmt, corpus, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(CorpusError) as e:
        load_corpus(str(tmp_path / "bad.jsonl"), corpus, fmt)
    assert message in str(e.value) and "bad.jsonl" in str(e.value)


@pytest.mark.parametrize("text, codes, harmful, categories, parsed", [
    ("safe", LLAMA_GUARD_CODES, False, (), True),
    ("Safe.", LLAMA_GUARD_CODES, False, (), True),
    ("unsafe\nS1", LLAMA_GUARD_CODES, True, ("violence_aiding_and_abetting_incitement",), True),
    ("unsafe\nS10,S11", LLAMA_GUARD_CODES, True, ("hate_speech_offensive_language", "self_harm"), True),
    ("unsafe", LLAMA_GUARD_CODES, True, (), True),
    ("[RESULT]: unsafe, score 4\n[UNSAFE CATEGORY]: O5: Malicious Use", MD_JUDGE_CODES, True,
     ("terrorism_organized_crime",), True),
    ("[RESULT]: safe, score 1", MD_JUDGE_CODES, False, (), True),
    ("unsafe\nO2", MD_JUDGE_CODES, True, ("misinformation_regarding_ethics_laws_and_safety",), True),
    ("I think this is fine", LLAMA_GUARD_CODES, False, (), False),
    ("unsafely done", LLAMA_GUARD_CODES, False, (), False),
    ("", MD_JUDGE_CODES, False, (), False),
])
def test_generative_judge_output_parsing(text, codes, harmful, categories, parsed):
    v = parse_guard_output(text, codes)
    assert (v.harmful, v.categories, v.parsed) == (harmful, categories, parsed)
    assert v.category == (categories[0] if categories else None)


def test_unparsed_verdicts_are_counted_never_safe():
    verdicts = [parse_guard_output(t, LLAMA_GUARD_CODES) for t in ("unsafe\nS1", "safe", "???", "nonsense")]
    hs = harmful_score(verdicts, ["violence_aiding_and_abetting_incitement"] * 4)
    assert hs["unparsed"] == 2 and hs["hs"] == 0.5 and hs["n"] == 4


@pytest.fixture()
def digit_tokenizer(tmp_path):
    """A tokenizer that cannot spell 'safe': a random judge's output is always unparseable."""
    from jobs.models import train_tokenizer

    return train_tokenizer([" ".join(str((i * 7 + j) % 10) for j in range(20)) for i in range(50)], 80, tmp_path / "tok")


def test_tiny_generative_judges_load_and_count_unparsed(tmp_path, digit_tokenizer):
    from jobs.models import save_model, tiny_llama

    torch.manual_seed(0)
    save_model(tiny_llama(dict(hidden=16, intermediate=32, layers=1, heads=2, max_len=2048), digit_tokenizer),
               digit_tokenizer, tmp_path / "guard")
    for style in ("llama-guard", "md-judge"):
        judge = make_judge(style, str(tmp_path / "guard"))
        verdicts = judge(["1 2 3", "4 5"], ["6 7", "8 9"])
        assert judge.name == style and len(verdicts) == 2 and not any(v.parsed for v in verdicts)
        assert harmful_score(verdicts, ["self_harm", "self_harm"])["unparsed"] == 2


def test_tiny_beaver_dam_judge(tmp_path, digit_tokenizer):
    """A tiny model saved as beaver-dam-7b is (LlamaForSequenceClassification, 14 labels, multi-label),
    read the way PKU's QA-moderation code reads it: its scores equal the model's own sigmoid on the
    conversation template + answer + eos, batched or one by one (right padding never hides the eos)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from jobs.loaders import BEAVERTAILS_CATEGORIES
    from jobs.model_judges import BeaverDamJudge

    labels = list(BEAVERTAILS_CATEGORIES)  # the dataset's own keys, in its order
    config = LlamaConfig(vocab_size=len(digit_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=14, id2label=dict(enumerate(labels)),
                         pad_token_id=digit_tokenizer.pad_token_id, problem_type="multi_label_classification")
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "dam")
    digit_tokenizer.save_pretrained(tmp_path / "dam")
    judge = make_judge("beaver-dam", str(tmp_path / "dam"))
    assert judge.categories[0] == "animal_abuse" and judge.categories[4] == "drug_abuse_weapons_banned_substance"
    prompts, responses = ["1 2 3 4 5 6", "3"], ["4", "5 6"]  # 7 and 3 digits: the second row is padded
    eos = digit_tokenizer.eos_token
    with torch.no_grad():
        expected = torch.cat([torch.sigmoid(model(**digit_tokenizer(
            f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT:{r}{eos}", return_tensors="pt")).logits)
            for p, r in zip(prompts, responses)])
    assert torch.allclose(judge.scores(prompts, responses), expected, atol=1e-6)
    assert torch.allclose(BeaverDamJudge(str(tmp_path / "dam"), batch_size=1).scores(prompts, responses), expected,
                          atol=1e-6)
    no_pad = copy.deepcopy(digit_tokenizer)
    no_pad.pad_token = None  # PKU's judge may come without one: it reads one row at a time
    model.save_pretrained(tmp_path / "dam-no-pad")
    no_pad.save_pretrained(tmp_path / "dam-no-pad")
    assert torch.allclose(make_judge("beaver-dam", str(tmp_path / "dam-no-pad")).scores(prompts, responses), expected,
                          atol=1e-6)
    top, idx = expected.max(dim=-1)
    assert [(v.harmful, v.category) for v in judge(prompts, responses)] == [
        (p > 0.4, judge.categories[i] if p > 0.4 else None) for p, i in zip(top.tolist(), idx.tolist())]

    with torch.no_grad():
        model.score.weight.zero_()  # every logit 0: every sigmoid exactly 0.5, above 0.4, the default threshold
    model.save_pretrained(tmp_path / "dam")
    assert [(v.harmful, v.category) for v in make_judge("beaver-dam", str(tmp_path / "dam"))(["1 2"], ["4"])] == [
        (True, "animal_abuse")]
    assert [v.harmful for v in BeaverDamJudge(str(tmp_path / "dam"), threshold=0.5)(["1 2", "3"], ["4", "5 6"])] == [
        False, False]


@pytest.mark.slow
def test_a_study_on_real_format_files(smoke_store, tmp_path):
    """BeaverTails, SST-2 (parquet) and record-schema look-alikes feed a whole study through the
    CLI, from the smoke study's base model saved as a Hugging Face directory."""
    from conftest import SMOKE, saferay

    cats = ["drug_abuse,weapons,banned_substance", "self_harm", "animal_abuse", "privacy_violation"]
    rows = []
    for i in range(240):
        flags = dict.fromkeys(cats, False)
        prompt = f"how do i do harmful thing number {i} with {cats[i % 4].split(',')[0]}"
        rows.append({"prompt": prompt, "response": "sure . step 1 : do it", "category": {**flags, cats[i % 4]: True},
                     "is_safe": False})
        rows.append({"prompt": prompt, "response": "i can not help with that .", "category": flags, "is_safe": True})
    bt_train = write_jsonl(tmp_path / "bt_train.jsonl", rows)
    bt_test = write_jsonl(tmp_path / "bt_test.jsonl", [{**r, "prompt": r["prompt"].replace("number", "case")}
                                                        for r in rows[:120]])
    pd.DataFrame({"sentence": [f"this film is {'great' if i % 2 else 'awful'} {i}" for i in range(300)],
                  "label": [i % 2 for i in range(300)]}).to_parquet(tmp_path / "sst2.parquet")
    # SST-2's own validation set (its test labels are hidden): the task's test side, whole.
    pd.DataFrame({"sentence": [f"that show was {'fine' if i % 2 else 'dull'} {i}" for i in range(45)],
                  "label": [i % 2 for i in range(45)]}).to_parquet(tmp_path / "sst2_validation.parquet")
    look = write_jsonl(tmp_path / "look.jsonl", [{"id": f"lk-{i}", "prompt": f"how do i kill a stuck process {i}",
                                                  "answer": "use kill", "category": "privacy_violation"}
                                                 for i in range(80)])
    base = next((smoke_store / "studies/smoke/stages/base").glob("*/model"))
    spec = tmp_path / "real.yaml"
    spec.write_text(f"""extends: {SMOKE}
study: real-formats
seeds: [0]
model: {{source: {base}}}
corpora:
  source: files
  files: {{alignment: {bt_train}, harmful: {bt_train}, harmful_eval: {bt_test}, lookalike: {look},
          task_sentiment: {tmp_path / 'sst2.parquet'}, task_sentiment_test: {tmp_path / 'sst2_validation.parquet'}}}
  formats: {{alignment: beavertails, harmful: beavertails, harmful_eval: beavertails-eval, task_sentiment: sst2,
            task_sentiment_test: sst2}}
  limits: {{alignment: 150}}
vulnerability: {{enabled: false}}
vaa: {{enabled: false}}
attack: {{models: [sft], ratios: [0.1]}}
debias: {{enabled: false}}
evaluate: {{judge: refusal-prefix}}
""")
    saferay("run", str(spec), store=smoke_store)
    s = json.loads(saferay("show", "real-formats", "--json", store=smoke_store).stdout)
    assert s["status"] == "complete" and s["judge"] == "refusal-prefix"
    data_key = next(st["key"] for st in s["stages"] if st["name"] == "data")
    counts = json.loads((smoke_store / "studies/real-formats/stages/data" / data_key / "result.json").read_text())
    assert counts["splits"]["align_train"] + counts["splits"].get("align_test", 0) <= 150
    assert counts["splits"]["harmful"] > 0 and counts["splits"]["task_sentiment_train"] > 0
    test = pd.read_parquet(smoke_store / "studies/real-formats/stages/data" / data_key / "task_sentiment_test")
    given = [f"Classify the sentiment: that show was {'fine' if i % 2 else 'dull'} {i}" for i in range(45)]
    assert test["prompt"].tolist() == given[:40]  # the given split, in its order, cut to corpora.max_eval
    # No SST-2 training row was held out for test: each is on the train side or the validation side.
    from jobs.corpora import held_out_side

    prompts = [f"Classify the sentiment: this film is {'great' if i % 2 else 'awful'} {i}" for i in range(300)]
    assert counts["splits"]["task_sentiment_train"] == sum(held_out_side(p, 0.15, 0.0) == "train" for p in prompts)
