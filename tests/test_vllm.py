"""vLLM on CPU against Hugging Face `generate`, on the smoke study's own models: greedy decoding
gives the same tokens, so the vulnerability stage's judged decoding (two checkpoints through one
engine: the second is loaded into the running engine) and the evaluate stage's per-model body give
the same verdicts, margins and rates on either engine."""

import os

import numpy as np
import pandas as pd
import pytest

if not os.environ.get("CI"):  # under CI a missing vLLM fails below rather than skipping
    pytest.importorskip("vllm", reason="the vllm extra is not installed (make test installs it)")

from jobs.corpora import read_split  # noqa: E402
from jobs.evaluate import evaluate_model  # noqa: E402
from jobs.judged_decoding import JudgedDecoder  # noqa: E402
from jobs.safetyworld import COMPLIANCE_OPENINGS, REFUSAL_OPENINGS  # noqa: E402

pytestmark = pytest.mark.slow
EVALUATE = {"judge": "world", "judge_model": None, "max_new_tokens": 24, "answer_tokens": 8, "batch_size": 64}
VLLM = {"engine": "vllm", "kv_cache_gb": 0.25}


@pytest.fixture(scope="module")
def models(smoke_store):
    from jobs.engines import close_all

    stages = smoke_store / "studies/smoke/stages"
    data = next((stages / "data").iterdir())
    sft = next(p for p in (stages / "align_sft").iterdir() if (p / "model").exists()) / "model"
    base = next((stages / "base").glob("*/model"))
    yield str(data), str(base), str(sft)
    close_all()  # the engine's processes go with the tests that started them


def judged(decoding: dict | None, data: str, checkpoints: list[str]) -> pd.DataFrame:
    prompts = read_split(data, "align_train", ["id", "prompt", "prompt_ids"]).head(48)
    decoder = JudgedDecoder("world", 24, list(REFUSAL_OPENINGS), list(COMPLIANCE_OPENINGS), batch_size=64,
                            decoding=decoding)
    return pd.concat([decoder(prompts.assign(checkpoint=c)) for c in checkpoints], ignore_index=True)


def test_judged_decoding_same_on_vllm_across_a_weight_reload(models):
    data, base, sft = models
    # base, then SFT loaded into the running engine, then base again: a stale weight would show.
    checkpoints = [base, sft, base]
    hf, vllm = judged(None, data, checkpoints), judged(VLLM, data, checkpoints)
    assert hf["response"].tolist() == vllm["response"].tolist()
    for column in ("harmful", "refused", "parsed"):
        assert hf[column].tolist() == vllm[column].tolist(), column
    np.testing.assert_allclose(vllm["margin"], hf["margin"], atol=1e-4)
    # The two models differ, so the comparison saw two sets of weights.
    assert hf["response"][:48].tolist() != hf["response"][48:96].tolist()
    assert hf["harmful"][:48].mean() > hf["harmful"][48:96].mean()  # the base answers, SFT refuses


def test_evaluate_same_on_vllm(models):
    data, _, sft = models
    hf = evaluate_model(sft, data, ["sentiment"], EVALUATE)
    vllm = evaluate_model(sft, data, ["sentiment"], {**EVALUATE, "decoding": VLLM})
    assert (hf["engine"], vllm["engine"]) == ("hf", "vllm")
    assert vllm["outcomes"] == hf["outcomes"]
    for key in ("hs", "over_refusal", "fa", "hs_by_category", "samples"):
        assert vllm[key] == hf[key], key
