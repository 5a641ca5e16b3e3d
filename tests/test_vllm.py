"""vLLM on CPU against Hugging Face `generate`, on the smoke study's own models: greedy decoding
gives the same tokens, so the pipeline's generation actor gives the same verdicts, margins and
rates on either engine, across a weight reload and with TSDI's bias removed; and the smoke
study's evaluate stage, run for real on vLLM, gives the same HS, FA and over-refusal as on hf."""

import json
import os
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

if not os.environ.get("CI"):  # under CI a missing vLLM fails below rather than skipping
    pytest.importorskip("vllm", reason="the vllm extra is not installed (make test installs it)")

from conftest import SMOKE, saferay  # noqa: E402
from jobs.corpora import read_split  # noqa: E402
from jobs.evaluate import rates, requests  # noqa: E402
from jobs.pipeline import Generate, Judge  # noqa: E402
from jobs.tsdi import save_bias  # noqa: E402

pytestmark = pytest.mark.slow
EVALUATE = {"judge": "world", "judge_model": None, "max_new_tokens": 24, "answer_tokens": 8}
HF = {"engine": "hf", "cpus_per_actor": 1, "batch_size": 64}
VLLM = {**HF, "engine": "vllm", "kv_cache_gb": 0.25}


@pytest.fixture(scope="module")
def models(smoke_store):
    from jobs.engines import close_all

    stages = smoke_store / "studies/smoke/stages"
    data = next((stages / "data").iterdir())
    sft = next(p for p in (stages / "align_sft").iterdir() if (p / "model").exists()) / "model"
    base = next((stages / "base").glob("*/model"))
    yield str(data), str(base), str(sft)
    close_all()  # the engine's processes go with the tests that started them


def pipeline(decoding: dict, blocks: list[pd.DataFrame]) -> pd.DataFrame:
    """The pipeline's two actors, called block by block as Ray Data calls them, in this process."""
    generate, judge = Generate(decoding), Judge("world", None)
    return pd.concat([judge(generate(block)) for block in blocks], ignore_index=True)


def judged(decoding: dict, data: str, checkpoints: list[str]) -> pd.DataFrame:
    prompts = read_split(data, "align_train", ["id", "prompt", "category", "prompt_ids"]).head(48)
    return pipeline(decoding, [prompts.assign(model=c, part="align_train", kind="alignment", max_new_tokens=24,
                                              tsdi="", score_first=True) for c in checkpoints])


def test_judged_decoding_same_on_vllm_across_a_weight_reload(models):
    data, base, sft = models
    # base, then SFT loaded into the running engine, then base again: a stale weight would show.
    checkpoints = [base, sft, base]
    hf, vllm = judged(HF, data, checkpoints), judged(VLLM, data, checkpoints)
    assert (hf["engine"].iat[0], vllm["engine"].iat[0]) == ("hf", "vllm")
    assert hf["response"].tolist() == vllm["response"].tolist()
    for column in ("harmful", "refused", "parsed"):
        assert hf[column].tolist() == vllm[column].tolist(), column
    np.testing.assert_allclose(vllm["margin"], hf["margin"], atol=1e-4)
    # The two models differ, so the comparison saw two sets of weights.
    assert hf["response"][:48].tolist() != hf["response"][48:96].tolist()
    assert hf["harmful"][:48].mean() > hf["harmful"][48:96].mean()  # the base answers, SFT refuses


def test_evaluation_same_on_vllm_with_and_without_tsdi(models, tmp_path):
    """One model's prompts through the pipeline's actors on each engine; then with a TSDI bias that
    changes what the model says (a large random bias on the first response positions), through
    vLLM's logits processor (jobs/tsdi_vllm.py) and hf's: the same tokens on every prompt, so a bias
    applied one position off shows, and the same rates."""
    data, _, sft = models
    vocab = json.loads(open(f"{sft}/config.json").read())["vocab_size"]
    bias = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 4
    path = save_bias(tmp_path / "bias.safetensors", bias, {"test": True})
    out = {}
    for name, decoding in (("hf", HF), ("vllm", VLLM)):
        for tsdi in (None, {"bias": str(path), "alpha": 1.0, "length": 3}):
            out[name, bool(tsdi)] = pipeline(decoding, [requests("sft", sft, data, ["sentiment"], EVALUATE, tsdi=tsdi)])
    for with_tsdi in (False, True):
        hf, vllm = out["hf", with_tsdi], out["vllm", with_tsdi]
        assert vllm["response"].tolist() == hf["response"].tolist(), with_tsdi
        hf, vllm = rates(hf, ["sentiment"]), rates(vllm, ["sentiment"])
        assert vllm["outcomes"] == hf["outcomes"], with_tsdi
        for key in ("hs", "over_refusal", "fa", "hs_by_category", "samples"):
            assert vllm[key] == hf[key], (key, with_tsdi)
    changed = (out["hf", True]["response"] != out["hf", False]["response"]).mean()
    assert changed > 0.5, f"the bias changed only {changed:.0%} of the responses"


def _killed_in_flight(call):
    """`call()` in a thread while the engine's core process is stopped (SIGSTOP), so its request is
    surely in flight; then the core killed (SIGKILL, as the kernel's OOM killer would). vLLM 0.32
    alone would leave `call` waiting forever (`jobs/engines.py::_dead_engine_raises`)."""
    import psutil

    cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert cores, "no vLLM engine process to kill"
    for p in cores:
        p.suspend()
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=call()), daemon=True)
    thread.start()
    time.sleep(2)  # the request goes out to the stopped engine
    for p in cores:
        p.kill()
    thread.join(timeout=180)
    assert not thread.is_alive(), "the call waited on an engine that had died"
    return out["result"]


def test_an_engine_that_dies_is_started_again_and_decodes_the_same(models):
    """The vLLM engine killed under a weight reload, then under a batch: each time a new engine is
    started on the checkpoint, and decodes what the first engine decoded on it."""
    from jobs.engines import VLLMEngine
    from jobs.models import load_tokenizer

    data, base, sft = models
    tok, prompts = load_tokenizer(sft), [list(x) for x in read_split(data, "harmful_eval")["prompt_ids"][:32]]
    decode = lambda: engine.generate(prompts, 24, tok.pad_token_id, tok.eos_token_id)[0]  # noqa: E731
    engine = VLLMEngine()
    engine.load(sft)
    before = decode()
    engine.load(base)
    assert decode() != before, "the two checkpoints must decode apart for the reload to show"
    _killed_in_flight(lambda: engine.load(sft))
    assert engine.restarts == 1 and decode() == before
    assert _killed_in_flight(decode) == before and engine.restarts == 2
    engine.close()


def test_the_evaluate_stage_on_vllm_gives_hf_numbers(smoke_store, tmp_path):
    """The smoke study's evaluate stage, run again for real with `decoding.engine: vllm` (its inputs
    hard-linked from the smoke store, where hf evaluated them; the engine is in no stage's key, so
    both results sit under the same key)."""
    from orchestrator.runner import plan
    from orchestrator.spec import load_spec
    from orchestrator.stages.evaluate import Result
    from orchestrator.store import StudyStore

    stages = smoke_store / "studies/smoke/stages"
    store = tmp_path / "store"
    for stage in stages.iterdir():
        if stage.name not in ("evaluate", "debias"):
            shutil.copytree(stage, store / "studies/smoke/stages" / stage.name, copy_function=os.link)
    saferay("run", str(SMOKE), "--set", "decoding.engine=vllm", "--until", "evaluate", store=store)
    key = dict((s.name, k) for s, k in plan(load_spec(SMOKE)))["evaluate"]
    hf, vllm = (Result.from_json(StudyStore(root, "smoke").result("evaluate", key)) for root in (smoke_store, store))
    assert vllm.seconds != hf.seconds, "evaluated again, not adopted"
    for field in ("models", "attack", "attack_table", "comparisons"):
        assert getattr(vllm, field) == getattr(hf, field), field


def test_max_model_len_bounds_the_engine_and_a_longer_request_names_it(models):
    """`decoding.max_model_len` reaches vLLM: its engine holds requests of that length, decodes what
    hf decodes up to it, and refuses a request one token longer with the field's name rather than
    cutting the response short. The KV cache preflight asks for at that length
    (`plan.vllm_context_bytes`) is what vLLM needs on CPU, to the byte: with it the engine starts,
    with 1 KiB less vLLM refuses to start."""
    from jobs.engines import HFEngine, VLLMEngine
    from jobs.models import load_tokenizer
    from jobs.records import InputError
    from orchestrator.plan import GIB, vllm_context_bytes
    from orchestrator.spec import load_spec

    data, _, sft = models
    tok, prompts = load_tokenizer(sft), [list(x) for x in read_split(data, "harmful_eval")["prompt_ids"][:16]]
    limit = max(map(len, prompts)) + 24
    spec = load_spec(SMOKE)
    spec = spec.model_copy(update={"decoding": spec.decoding.model_copy(update={"engine": "vllm", "max_model_len": limit})})
    positions, need = vllm_context_bytes(spec)
    assert positions == limit < 96

    too_small = VLLMEngine(kv_cache_gb=(need - 1024) / GIB, max_model_len=limit)
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        too_small.load(sft)
    too_small.close()

    decode = lambda engine, new: engine.generate(prompts, new, tok.pad_token_id, tok.eos_token_id)[0]  # noqa: E731
    hf = HFEngine(16)
    hf.load(sft)
    engine = VLLMEngine(kv_cache_gb=need / GIB, max_model_len=limit)
    try:
        engine.load(sft)
        assert engine.llm.llm_engine.model_config.max_model_len == limit
        assert decode(engine, 24) == decode(hf, 24)
        with pytest.raises(InputError, match=rf"exceeds decoding.max_model_len \({limit}\)"):
            decode(engine, 25)
    finally:
        engine.close()


def test_the_process_engine_is_kept_only_for_the_same_settings():
    """One vLLM engine per process, reused while the decoding settings that shape it stay the same
    (it starts on its first checkpoint, so nothing starts here)."""
    from jobs.engines import close_all, engine

    shaped = {"engine": "vllm", "max_model_len": 64}
    for changed in ({"max_model_len": 32}, {"max_model_len": None}, {"kv_cache_gb": 0.5}, {"gpus_per_actor": 0.5}):
        first = engine(shaped)
        assert engine(dict(shaped)) is first
        assert engine({**shaped, **changed}) is not first, changed
    close_all()
