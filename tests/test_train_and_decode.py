import pandas as pd
import pytest
import torch

from jobs.generate import greedy_decode
from jobs.models import load_model, load_tokenizer, save_model, tiny_llama, train_tokenizer
from jobs.backends import prepare_strategy
from jobs.steps import make_step
from jobs.train import IGNORE, collate, count_target_tokens, target_tokens
from jobs.train_loop import row_streams, run_epochs

TINY = dict(hidden=32, intermediate=64, layers=2, heads=2, max_len=64)
TEXTS = [f"<|user|> say {w} twice <|assistant|> {w} {w}" for w in ("red", "blue", "green", "moon", "tree")]


def _setup(tmp_path):
    tok = train_tokenizer(TEXTS * 4, 200, tmp_path / "tok")
    torch.manual_seed(0)
    return tiny_llama(TINY, tok), tok


def _rows(tok):
    prompts = [[tok.bos_token_id] + tok(t.split(" <|assistant|> ")[0] + " <|assistant|>", add_special_tokens=False).input_ids
               for t in TEXTS]
    targets = [tok(" " + t.split(" <|assistant|> ")[1], add_special_tokens=False).input_ids + [tok.eos_token_id]
               for t in TEXTS]
    return {"prompt_ids": prompts * 8, "target_ids": targets * 8}


def test_collate_masks_the_prompt_and_padding():
    b = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0, max_len=16)
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert b["labels"].tolist() == [[IGNORE] * 3 + [5, 6], [IGNORE, 7, 8, 9, IGNORE]]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0]]


def test_target_tokens_from_lengths_equal_the_collated_count():
    """The loop counts a global batch's tokens from row lengths (no collective per step)."""
    prompts = [[5, 6, 7], [], [4], [9] * 10, [8, 8]]
    targets = [[1, 2], [3, 3, 3], [], [1] * 6, [2] * 20]
    for max_len in (4, 8, 12, 40):
        for rows in ([0, 1, 2, 3, 4], [1], [2], [3, 4]):
            p, t = [prompts[i] for i in rows], [targets[i] for i in rows]
            assert target_tokens(p, t, max_len) == count_target_tokens(collate(p, t, 0, max_len)), (max_len, rows)


def test_the_loop_learns_sft_in_one_process_and_round_trips(tmp_path):
    model, tok = _setup(tmp_path)
    rows = _rows(tok)
    cfg = dict(lr=1e-2, epochs=8, batch_size=8, max_len=64, seed=0, pad_id=tok.pad_token_id, strategy="ddp")
    backend = prepare_strategy(cfg, model, 8, 1, 40, distributed=False)
    frame = pd.DataFrame({"id": [f"r{i:02d}" for i in range(40)], **rows})
    h = run_epochs(backend, make_step(cfg, 5), row_streams(frame), cfg, steps_per_epoch=5)
    assert len(h["loss"]) == 40 and h["loss"][-1] < 0.3 * h["loss"][0]
    model.eval()
    save_model(model, tok, tmp_path / "m")
    again, tok2 = load_model(tmp_path / "m"), load_tokenizer(tmp_path / "m")
    out = greedy_decode(again, rows["prompt_ids"][:5], tok2.pad_token_id, tok2.eos_token_id, 6, batch_size=5)
    assert tok2.batch_decode(out, skip_special_tokens=True) == ["red red", "blue blue", "green green", "moon moon", "tree tree"]


def test_batched_decoding_equals_one_by_one(tmp_path):
    """Left padding must not change what greedy decoding produces."""
    model, tok = _setup(tmp_path)
    prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids
               for t in ("<|user|> say red <|assistant|>", "<|user|> say twice blue green moon <|assistant|>", "<|user|>")]
    batched = greedy_decode(model, prompts, tok.pad_token_id, tok.eos_token_id, 8, batch_size=3)
    single = [greedy_decode(model, [p], tok.pad_token_id, tok.eos_token_id, 8, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_the_pad_id_read_from_a_saved_tokenizers_files_is_the_loaded_tokenizers(tmp_path, monkeypatch):
    """The driver reads a tokenizer's pad id from its files (`pad_token_id`), without transformers:
    our own tokenizer (a pad token of its own), one without a pad token (eos stands in, as
    `load_tokenizer` has it) and one whose config names the token as a dict give the loaded
    tokenizer's id, without loading it."""
    import json

    from jobs import models

    ours = train_tokenizer(TEXTS * 4, 200, tmp_path / "ours")
    ours.pad_token = None
    ours.save_pretrained(tmp_path / "no-pad")
    (tmp_path / "as-dict").mkdir()
    (tmp_path / "as-dict" / "tokenizer.json").write_bytes((tmp_path / "ours" / "tokenizer.json").read_bytes())
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    config["pad_token"] = {"__type": "AddedToken", "content": "<|user|>", "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}  # the older files' form
    (tmp_path / "as-dict" / "tokenizer_config.json").write_text(json.dumps(config))
    expected = {name: load_tokenizer(tmp_path / name).pad_token_id for name in ("ours", "no-pad", "as-dict")}
    assert len(set(expected.values())) == 3, expected  # three different answers to get right

    def not_loaded(path):
        raise AssertionError(f"{path}: loaded with transformers")

    monkeypatch.setattr(models, "load_tokenizer", not_loaded)
    assert {name: models.pad_token_id(tmp_path / name) for name in expected} == expected
    (tmp_path / "as-dict" / "tokenizer.json").unlink()  # files it cannot read: the full load decides
    with pytest.raises(AssertionError, match="loaded with transformers"):
        models.pad_token_id(tmp_path / "as-dict")
