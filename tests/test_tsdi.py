import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jobs.generate import greedy_decode
from jobs.models import tiny_llama, train_tokenizer
from jobs.tsdi import (TSDILogitsProcessor, estimate_bias, load_bias, neutral_pool, processor_factory, random_prompts,
                       save_bias, template_ids)

TEMPLATE = "<|user|> {prompt} <|assistant|>"
TEXTS = [f"<|user|> say {w} twice <|assistant|> {w} {w}" for w in ("red", "blue", "green", "moon", "tree")]


@pytest.fixture()
def tiny(tmp_path):
    tok = train_tokenizer(TEXTS * 4, 200, tmp_path / "tok")
    torch.manual_seed(0)
    model = tiny_llama(dict(hidden=32, intermediate=64, layers=2, heads=2, max_len=64), tok)
    pool = neutral_pool(tok, ["say red twice", "say moon twice"])
    prefix, suffix = template_ids(tok, TEMPLATE, ["say red twice", "say moon twice", "say tree twice"])
    return model, tok, random_prompts(pool, [2, 3, 4], 12, 0, prefix, suffix), pool


def test_bias_of_a_model_against_itself_is_zero(tiny):
    model, tok, prompts, _ = tiny
    b = estimate_bias(model, model, prompts, 4, tok.pad_token_id, tok.eos_token_id)
    assert b.shape == (4, model.config.vocab_size) and b.abs().max().item() < 1e-5


class HandBuilt(torch.nn.Module):
    device = torch.device("cpu")  # where its inputs go, as a transformers model says


class FixedLogits(HandBuilt):
    """A hand-built 'model': the same next-token distribution at every position."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.tensor(probs))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def test_two_hand_built_models_give_the_expected_bias():
    aligned, ref = FixedLogits([0.5, 0.25, 0.25]), FixedLogits([0.25, 0.5, 0.25])
    prompts = [[1, 2], [2, 1, 1]]
    b = estimate_bias(aligned, ref, prompts, 3, 0, 99, continuation="random", pool=np.array([1, 2]))
    expected = torch.tensor([math.log(2), -math.log(2), 0.0]).expand(3, -1)
    assert torch.allclose(b, expected, atol=1e-6)


def test_processor_changes_only_positions_up_to_L():
    bias = torch.arange(12, dtype=torch.float).view(4, 3)
    proc = TSDILogitsProcessor(bias, alpha=0.5, prompt_width=5, length=2)
    scores = torch.zeros(2, 3)
    for generated in range(5):
        out = proc(torch.zeros(2, 5 + generated, dtype=torch.long), scores)
        if generated < 2:
            assert torch.equal(out, -0.5 * bias[generated].expand(2, -1))
        else:
            assert torch.equal(out, scores)


def test_processor_steers_model_generate(tiny):
    """Usable on its own with `model.generate`, and through the study's batched decoding."""
    model, tok, prompts, _ = tiny
    plain = greedy_decode(model, prompts[:4], tok.pad_token_id, tok.eos_token_id, 3)
    same = greedy_decode(model, prompts[:4], tok.pad_token_id, tok.eos_token_id, 3,
                         processors_for=processor_factory(torch.zeros(3, model.config.vocab_size), 1.0, 3))
    assert same == plain
    target = 7  # a bias strongly against token 7 at position 1 makes the first token 7
    bias = torch.zeros(3, model.config.vocab_size)
    bias[0, target] = -1e4
    ids = torch.tensor([prompts[0]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         logits_processor=[TSDILogitsProcessor(bias, 1.0, ids.shape[1])], pad_token_id=tok.pad_token_id)
    assert out[0, ids.shape[1]].item() == target
    steered = greedy_decode(model, prompts[:4], tok.pad_token_id, -1, 3, processors_for=processor_factory(bias, 1.0, 3))
    assert all(row[0] == target for row in steered)


def test_bias_artifact_round_trips(tmp_path):
    bias = torch.randn(4, 10)
    meta = {"aligned": "sft", "reference": "base", "m": 256, "length": 4, "pool": "benign"}
    b, m = load_bias(save_bias(tmp_path / "bias" / "sft.safetensors", bias, meta))
    assert torch.equal(b, bias) and m == meta


def test_random_prompts_sit_in_the_real_template(tiny):
    """They start and end with the very tokens a real prompt does (the joining whitespace included)."""
    from jobs.corpora import encode_prompts

    _, tok, prompts, _ = tiny
    real = encode_prompts(tok, ["say green twice", "say blue twice"], TEMPLATE)
    prefix, suffix = template_ids(tok, TEMPLATE, ["say red twice", "say moon twice"])
    assert all(r[:len(prefix)] == prefix and r[-len(suffix):] == suffix for r in real)
    assert len(suffix) >= 2, "the whitespace before the assistant tag is part of every real prompt"
    assert all(p[:len(prefix)] == prefix and p[-len(suffix):] == suffix for p in prompts)


def test_bias_is_read_at_the_first_response_position():
    """b_1 is log π(· | x̃) at the last prompt token, b_2 after one continuation token: a model whose
    next-token distribution depends on the previous token shows an off-by-one at once."""

    class EchoNext(HandBuilt):  # predicts (previous token + 1) mod V, sharply
        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=10.0 * torch.nn.functional.one_hot((input_ids + 1) % 6, 6).float())

    class Uniform(HandBuilt):
        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 6))

    prompts = [[0, 2]]  # the prompt ends with token 2; the continuation starts with token 4
    b = estimate_bias(EchoNext(), Uniform(), prompts, 2, 0, 99, continuation="random", pool=np.array([4]))
    assert b[0].argmax().item() == 3  # after the prompt's last token 2
    assert b[1].argmax().item() == 5  # after the first continuation token 4
